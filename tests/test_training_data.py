"""A worker's data: resident once per process, streamed evaluation covers the split once."""
import contextlib

import pytest

from studies.training import data as worker_data
from studies.training import loop, runner
from tests.helpers import tiny_cfg


def _losses(summary):
    return [h["train_loss"] for h in summary.history]


def test_resident_data_is_loaded_once_per_process_and_runs_stay_identical(tiny_data, monkeypatch):
    import storage

    cfg = tiny_cfg(seed=4, max_steps=8)
    worker_data._RESIDENT.clear()
    first = runner.run_in_process(cfg, tiny_data, quiet=True)
    loads = []
    real = storage.ShardSet.load_split
    monkeypatch.setattr(storage.ShardSet, "load_split", lambda self, *a, **k: loads.append(a) or real(self, *a, **k))
    again = runner.run_in_process(cfg, tiny_data, quiet=True)  # a reused Tune actor's next run
    assert loads == []  # train and val came from this process's device copy
    assert _losses(again) == _losses(first) and again.final_val_acc == first.final_val_acc  # the copy is unharmed


def test_streamed_evaluation_covers_the_split_once_and_matches_resident(tmp_path):
    import nfnet
    import storage

    uri = storage.prepare_dataset("synthetic", str(tmp_path), seed=5, n_train=64, n_val=100, rows_per_shard=16).uri
    data = storage.open_dataset(uri)
    assert len(data.shard_paths("val")) == 7
    cfg = tiny_cfg(loader="streaming")
    ranks = [worker_data.val_chunks(data, cfg, loop.WorkerContext(rank=r, world_size=2))() for r in range(2)]
    seen = [(bytes(x.numpy()), int(y)) for chunks in ranks for xs, ys in chunks for x, y in zip(xs, ys)]
    images, labels = data.load_split("val")
    assert sorted(seen) == sorted((bytes(x.numpy()), int(y)) for x, y in zip(images, labels))  # once each
    model = nfnet.create_model(cfg.model, num_classes=data.manifest.num_classes, **cfg.model_overrides)
    augment = nfnet.Augment(0.0, data.manifest.num_classes)
    one = loop.WorkerContext()
    args = (augment, one, 32, False, contextlib.nullcontext)
    streamed = loop.evaluate(model, worker_data.val_chunks(data, cfg, one)(), *args)
    resident = loop.evaluate(model, worker_data.val_chunks(data, cfg.replace(loader="resident"), one)(), *args)
    assert streamed == pytest.approx(resident, rel=1e-6)

"""Checkpoints: refused under another config; mid-epoch resume is exact."""

import pytest

from studies.training import loop
from tests.helpers import tiny_cfg


def _losses(summary):
    return [h["train_loss"] for h in summary.history]


def test_checkpoint_of_another_config_is_refused(tmp_path, tiny_data):
    saved = {}

    def keep(metrics, ckpt):
        if ckpt:
            saved["dir"] = ckpt

    cfg = tiny_cfg(max_steps=16, checkpoint_every_epochs=1)  # 8 steps per epoch: a checkpoint after epoch 1
    loop.train(cfg, tiny_data, loop.WorkerContext(report=keep, print=lambda s: None))
    resumed = loop.train(cfg, tiny_data, loop.WorkerContext(resume_from=saved["dir"], print=lambda s: None))
    assert resumed.status == "completed" and resumed.steps == 16
    with pytest.raises(ValueError, match="another config"):
        loop.train(cfg.replace(base_lr=0.3), tiny_data, loop.WorkerContext(resume_from=saved["dir"]))


def test_time_based_checkpoints_mid_epoch_resume_exactly(tiny_data):
    # 8 steps per epoch; a checkpoint at every log window (every 3 steps): most of them fall inside an epoch.
    cfg = tiny_cfg(max_steps=20, log_every_steps=3, checkpoint_every_epochs=0, checkpoint_every_minutes=1e-9,
                   gns_every_steps=2)
    saved = []
    ref = loop.train(cfg, tiny_data, loop.WorkerContext(report=lambda m, c: c and saved.append((m["step"], c)),
                                                        print=lambda s: None))
    assert [s for s, _ in saved] == [3, 6, 9, 12, 15, 18]
    for step, ckpt in saved[1::2]:  # steps 6, 12, 18: in the first, second and third epoch
        resumed = loop.train(cfg, tiny_data, loop.WorkerContext(resume_from=ckpt, print=lambda s: None))
        assert resumed.steps == 20 and _losses(resumed) == _losses(ref), step
        assert resumed.final_val_acc == ref.final_val_acc and resumed.final_train_loss == ref.final_train_loss
        assert resumed.gns == pytest.approx(ref.gns, nan_ok=True)

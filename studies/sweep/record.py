"""Before any trial: the checks that refuse a study with one line naming the fix (paths, cells, the data), and the
study's record (study.json): an output holding a study is continued only with --resume and the same settings."""
from __future__ import annotations

import json

import storage
from studies.sweep.design import Study


def check_paths(study: Study) -> None:
    """Paths every trial must reach the same way as the driver; an output the study can write."""
    storage.require_absolute(study.fixed.data_root, "--data-root")
    if study.fixed.dataset not in storage.datasets.SOURCES:
        storage.require_absolute(study.fixed.dataset, "--dataset")
    storage.check_writable(study.study_dir)


def check_cells(study: Study) -> None:
    """Every cell makes a valid TrainConfig and model config (before any data is prepared)."""
    import nfnet

    for cell in study.cells():
        cfg = study.config(cell)
        nfnet.model_config(cfg.model, **cfg.model_overrides)


def validate(study: Study, dataset_uri: str) -> int:
    """Everything the data decides, before any trial starts. Returns the train split's size."""
    n_train = storage.open_dataset(dataset_uri).manifest.splits["train"]
    for cell in study.cells():
        cfg = study.config(cell)
        if cfg.batch_size > n_train:
            raise ValueError(f"batch size {cfg.batch_size} is larger than the training split ({n_train} images of "
                             f"{dataset_uri}); use smaller batch sizes or a bigger dataset")
    return n_train


def check_record(study: Study) -> bool:
    """An output that holds this study is continued only with --resume, and only under the same settings.
    Returns whether the study is new (its record is written once its trials are about to start)."""
    fs, path = storage.resolve(storage.uri.join(study.study_dir, "study.json"))
    try:
        old = json.loads(storage.uri.read_bytes(fs, path).decode())
    except (FileNotFoundError, storage.StorageError, OSError):
        return True
    if not study.resume:
        raise ValueError(f"{study.study_dir} already holds study {study.name!r}; continue it with --resume, or "
                         "choose another --output or --name")
    diff = sorted(_diff(old, study.record()))
    if diff:
        raise ValueError(f"--resume with other settings than the study was started with ({', '.join(diff[:6])}); "
                         "rerun with the original flags, or start a new study with another --name")
    return False


def write_record(study: Study) -> None:
    fs, path = storage.resolve(storage.uri.join(study.study_dir, "study.json"))
    storage.uri.write_bytes_atomic(fs, path, json.dumps(study.record(), sort_keys=True, indent=1).encode())


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in set(a) | set(b) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [f"{prefix[:-1]}: {a} → {b}"] if a != b else []

"""Before any trial: the checks that refuse a study with one line naming the fix (paths, cells, the data), and the
study's record (study.json): an output holding a study is continued only with --resume and the same settings."""
from __future__ import annotations

import json

import pyarrow.fs as pafs

import storage
from studies.sweep.design import Study
from studies.training.config import TrainConfig


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


def read_record(study: Study) -> dict | None:
    """The study.json in the study's folder, or None when there is none. Any other failure to read it (throttling,
    expired credentials, AccessDenied) is raised: it may hold a study, and a new record would overwrite it."""
    fs, path = storage.resolve(storage.uri.join(study.study_dir, "study.json"))
    try:
        blob = storage.uri.read_bytes(fs, path)
    except storage.StorageError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return None
        why = storage.uri.one_line(e.__cause__ or e)
        raise type(e)(f"cannot read {study.study_dir}/study.json, so whether a study is there is unknown ({why}); "
                      "nothing was written: fix the access and rerun") from e
    try:
        old = json.loads(blob.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{study.study_dir}/study.json is not a study record ({e}); move it aside, or choose "
                         "another --output or --name") from None
    if not isinstance(old, dict):
        raise ValueError(f"{study.study_dir}/study.json is not a study record; move it aside, or choose another "
                         "--output or --name")
    return old


def check_record(study: Study) -> str | None:
    """An output that holds this study is continued only with --resume, and only under the same settings, MLflow
    store and code. Returns the study's id when it continues one (None: a new study, whose record is written once
    its trials are about to start)."""
    old = read_record(study)
    if old is None:
        if study.resume:  # a mistyped --output or --name would otherwise cost a whole new study, called a resume
            raise ValueError(f"--resume: there is no study to resume at {study.study_dir} ({what_is_there(study)}); "
                             "check --output and --name, or leave out --resume to start a new study")
        return None
    if not study.resume:
        raise ValueError(f"{study.study_dir} already holds study {study.name!r}; continue it with --resume, or "
                         "choose another --output or --name")
    now = study.record()
    if not old.get("study_id"):
        raise ValueError(f"{study.study_dir}/study.json was written by an older nfnet-lab (no study id, other trial "
                         "keys); start the study anew with another --output or --name")
    if old.get("tracking_uri") != now["tracking_uri"]:
        raise ValueError(f"--resume with another MLflow store ({old.get('tracking_uri')} → {now['tracking_uri']}): "
                         f"its runs are in the first; pass --tracking-uri {old.get('tracking_uri')}")
    if old.get("code_version") != now["code_version"] and not study.allow_code_change:
        raise ValueError(f"--resume under other code than the study's rows were computed with (code version "
                         f"{old.get('code_version')} → {now['code_version']}: nfnet/, storage/ or "
                         "studies/training/ changed); go back to that code, or pass --allow-code-change to mix them "
                         "(each row records its code_version)")
    diff = sorted(_diff(_compared(old), _compared(now)))
    if diff:
        raise ValueError(f"--resume with other settings than the study was started with ({', '.join(diff[:6])}); "
                         "rerun with the original flags, or start a new study with another --name")
    return old["study_id"]


def what_is_there(study: Study, most: int = 6) -> str:
    """What the output holds, for a --resume that finds no study.json: the studies beside the one named (a mistyped
    --name), or the output's absence (a mistyped --output), or what the study's folder holds instead."""
    fs, out = storage.resolve(study.output)
    here = storage.uri.join(out, study.name)

    def names(infos) -> list[str]:
        shown = sorted(i.base_name + ("/" if i.type == pafs.FileType.Directory else "") for i in infos)
        return shown[:most] + ([f"… {len(shown) - most} more"] if len(shown) > most else [])

    try:
        if fs.get_file_info(here).type == pafs.FileType.Directory:
            inside = names(fs.get_file_info(pafs.FileSelector(here)))
            return f"that folder has no study.json; it holds {', '.join(inside)}" if inside else "that folder is empty"
        if fs.get_file_info(out).type != pafs.FileType.Directory:
            return f"{study.output} does not exist"
        entries = fs.get_file_info(pafs.FileSelector(out))
        dirs = [i for i in entries if i.type == pafs.FileType.Directory][:100]
        records = fs.get_file_info([storage.uri.join(d.path, "study.json") for d in dirs])
        studies = sorted(d.base_name for d, r in zip(dirs, records) if r.type == pafs.FileType.File)
        if studies:
            return f"{study.output} holds the studies {', '.join(studies[:most])}" + \
                (f" and {len(studies) - most} more" if len(studies) > most else "")
        return f"{study.output} holds no study: {', '.join(names(entries))}" if entries else f"{study.output} is empty"
    except OSError as e:
        return f"{study.output} cannot be listed: {storage.uri.one_line(e)}"


def write_record(study: Study, study_id: str) -> None:
    fs, path = storage.resolve(storage.uri.join(study.study_dir, "study.json"))
    blob = json.dumps({**study.record(), "study_id": study_id}, sort_keys=True, indent=1).encode()
    storage.uri.write_bytes_atomic(fs, path, blob)


def _compared(rec: dict) -> dict:
    """What must match on --resume: the design and the numeric settings; not where the runs go (placement fields
    may change, e.g. resumed on a cluster with other CPUs per worker), nor what is checked on its own."""
    out = {k: v for k, v in rec.items() if k not in ("study_id", "tracking_uri", "code_version")}
    out["fixed"] = {k: v for k, v in (rec.get("fixed") or {}).items() if k not in TrainConfig.placement_fields()}
    return json.loads(json.dumps(out), parse_float=lambda x: int(float(x)) if float(x).is_integer() else float(x))


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in set(a) | set(b) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [f"{prefix[:-1]}: {a} → {b}"] if a != b else []

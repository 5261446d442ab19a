"""The command lines: every TrainConfig field is a flag (help text below), and the study scripts' shared
command line (preset → flags → Study → run → console summary)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import traceback
import types
import typing
from pathlib import Path
from typing import Any

from studies.config import TrainConfig, parse_lambda

HELP = {
    "model": "model name from nfnet.list_models() (e.g. nf_resnet_cifar, nfnet_f0, bn_resnet_cifar)",
    "model_overrides": 'JSON dict of model config overrides, e.g. \'{"width": 16, "depth": 1}\'',
    "dataset": "built-in source (synthetic, cifar10, cifar100, imagefolder) or the URI of a prepared shard set",
    "dataset_params": 'JSON dict for the source, e.g. \'{"n_train": 5000}\' or \'{"path": "/data/cifar"}\'',
    "data_root": "where prepared shards are kept (local path, s3://, gs://)",
    "loader": "auto (by size), resident (whole split in memory/GPU) or streaming (Ray Data)",
    "image_size": "training resolution in pixels (imagefolder data is resized/cropped to it)",
    "batch_size": "GLOBAL batch size, split evenly across workers",
    "num_workers": "Ray Train workers (DDP ranks)",
    "use_gpu": "GPU workers (NCCL); otherwise CPU workers with gloo",
    "gpus_per_worker": "GPUs per worker with --use-gpu; a fraction (0.25) packs small trials onto one GPU",
    "cpus_per_worker": "CPUs (and torch threads) per worker",
    "optimizer": "only 'sgd' (Nesterov momentum), the paper's optimizer",
    "base_lr": "learning rate per 256 examples; the run uses base_lr * batch_size / 256",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum",
    "weight_decay": "weight decay (never on gains, biases, skip gains)",
    "warmup_epochs": "linear warmup length, then cosine decay to 0",
    "warmup_steps": "linear warmup length in optimizer steps (overrides --warmup-epochs)",
    "schedule_steps": "lr schedule length in steps, when longer than the run",
    "lr_schedule": "cosine (warmup, then cosine decay to 0) or constant (warmup, then the peak lr held: scans)",
    "compile": "torch.compile the model",
    "epochs": "training length in epochs (fractions allowed)",
    "max_steps": "training length in optimizer steps (overrides --epochs)",
    "clipping": "gradient clipping: none, norm (global norm) or agc (adaptive, unit-wise)",
    "clip_threshold": "λ for AGC, max global norm for norm clipping",
    "augment_strength": "0..1: scales RandAugment, MixUp and CutMix together (0 = crops and flips only)",
    "label_smoothing": "label smoothing of the cross-entropy",
    "precision": "fp32 or bf16 (autocast; parameters stay fp32)",
    "channels_last": "channels_last memory format",
    "seed": "seed: same seed, same numbers",
    "log_every_steps": "step metrics and divergence check every N steps",
    "eval_every_epochs": "validate every N epochs and at the end (0 = never)",
    "checkpoint_every_epochs": "checkpoint every N epochs (0 = never)",
    "checkpoint_every_minutes": "also checkpoint mid-epoch every N minutes (a lost worker costs at most that; 0 = off)",
    "max_failures": "worker failures to recover from (restarts from the last checkpoint)",
    "divergence_factor": "diverged when the loss exceeds this multiple of its starting value, or is not finite",
    "gns_every_steps": "measure the gradient noise scale every N steps (0 = off)",
}


def _base_type(tp):
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return typing.get_origin(tp) or tp


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _parse_json_dict(s: str) -> dict:
    try:
        d = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {s!r}") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return d


def add_train_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("training (TrainConfig)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        tp = _base_type(hints[f.name])
        conv = {bool: _parse_bool, dict: _parse_json_dict}.get(tp, tp)
        flag = "--lambda" if f.name == "clip_threshold" else "--" + f.name.replace("_", "-")  # λ on the CLI
        if f.name == "clip_threshold":
            conv = parse_lambda
        group.add_argument(flag, dest=f.name, type=conv, default=None, metavar=tp.__name__.upper(),
                           help=HELP[f.name] + _default_text(f))


def _default_text(f) -> str:
    if f.default is not dataclasses.MISSING:
        return f" (default: {f.default})"
    return ""


def overrides_from_args(args: argparse.Namespace) -> dict:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


# ---- the study scripts' command line ----

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def add_study_args(p: argparse.ArgumentParser, preset_names, grid_flags: dict[str, tuple[Any, str]]) -> None:
    g = p.add_argument_group("study")
    g.add_argument("--preset", default="laptop", choices=preset_names, help="preset of fixed and grid values")
    g.add_argument("--smoke-test", action="store_true", help="tiny model, one trial, a few steps")
    g.add_argument("--name", default=None, help="study name (MLflow experiment and output folder): letters, "
                                                 "digits, '_', '-', '.'")
    g.add_argument("--output", default=None,
                   help="where results go: local path, s3://, gs:// (default <project>/results)")
    g.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                                                        "sqlite:///<project>/mlflow.db)")
    g.add_argument("--seed", dest="study_seed", type=int, default=None,
                   help="seed of the study: trial seeds are seed, seed+1, … (same seed, same numbers)")
    g.add_argument("--seeds", type=int, default=None, help="seeds per learning rate")
    g.add_argument("--best-k", type=int, default=None, help="a setting's score = mean of its best k seeds")
    g.add_argument("--lrs", type=float, nargs="+", default=None, help="the base lrs tried in every cell (per 256)")
    g.add_argument("--lr-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="base lrs on a log grid from LOW to HIGH, a factor 2 apart")
    g.add_argument("--scan-steps", type=int, default=None,
                   help="the stability scan's length after its warmup: at least this many optimizer steps")
    g.add_argument("--scan-examples", type=int, default=None,
                   help="... and at least this many examples (small batches need data to decide)")
    g.add_argument("--full-top", type=int, default=None, help="full runs per cell at the best stable scan lrs")
    g.add_argument("--trials", type=int, default=None, help="TPE trials (hpo)")
    g.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: fits the cluster)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted study (same flags)")
    g = p.add_argument_group("grid (scientific parameters)")
    for axis, (conv, hlp) in grid_flags.items():
        flag = "--lambdas" if axis == "clip_threshold" else f"--{axis.replace('_', '-')}s"
        g.add_argument(flag, dest=f"grid_{axis}", type=conv, nargs="+", default=None, help=hlp)


def owned_fields(preset, grid_axes) -> dict[str, str]:
    """TrainConfig fields the study sets itself, with why: a flag for one would do nothing, so it is refused."""
    owned = {"seed": "the study seeds each trial (use --seed)"}
    if preset.tpe:
        owned.update({k: "searched by TPE" for k in preset.tpe})
    else:
        owned["base_lr"] = "the lr design sets it per trial (use --lrs or --lr-range)"
    for axis in grid_axes:
        if axis == "clip_threshold":
            owned.update(clip_threshold="a grid axis (use --lambdas)", clipping="set by --lambdas ('none' = off)")
        elif axis == "variant":
            owned.update(model="set by --variants", clipping="set by --variants")
        else:
            owned[axis] = f"a grid axis (use --{axis.replace('_', '-')}s)"
    return owned


def build_study(name: str, presets: dict, args: argparse.Namespace, grid_flags, analyze=None):
    import storage
    from studies import runner, search
    from studies.tracking import absolute_tracking_uri, default_tracking_uri

    preset = presets["smoke" if args.smoke_test else args.preset]
    overrides = overrides_from_args(args)
    owned = owned_fields(preset, grid_flags)
    bad = [k for k in overrides if k in owned]
    if bad:
        flag = "--lambda" if bad[0] == "clip_threshold" else "--" + bad[0].replace("_", "-")
        raise ValueError(f"{flag} does nothing in this study: {bad[0]} is {owned[bad[0]]}; remove it")
    study_name = args.name or name
    if not NAME.match(study_name):
        raise ValueError(f"--name {study_name!r}: use letters, digits, '_', '-' and '.' only (it names an MLflow "
                         "experiment, a folder and a filter)")
    lrs = tuple(args.lrs) if args.lrs else search.log_grid(*args.lr_range) if args.lr_range else preset.lrs
    changes = {k: v for k, v in (("lrs", lrs), ("seeds", args.seeds), ("best_k", args.best_k),
                                 ("scan_steps", args.scan_steps), ("scan_examples", args.scan_examples),
                                 ("full_top", args.full_top),
                                 ("trials", args.trials)) if v is not None}
    grid = {axis: getattr(args, f"grid_{axis}") or preset.grid[axis] for axis in grid_flags}
    preset = dataclasses.replace(preset, grid=grid, **changes)
    output = args.output or runner.default_storage_path()
    storage.resolve(output)  # refuses 's3:/bucket' (one slash), which would otherwise become a local folder 's3:'
    if "://" not in output:
        output = str(Path(output).resolve())
    return search.Study(
        name=study_name, preset=preset, fixed=TrainConfig(**{**preset.fixed, **overrides}),
        seed=args.study_seed or 0, output=output,
        tracking_uri=absolute_tracking_uri(args.tracking_uri) if args.tracking_uri else default_tracking_uri(),
        max_concurrent=args.max_concurrent, resume=args.resume, analyze=analyze)


def run_study_cli(name: str, presets: dict, argv: list[str] | None, doc: str,
                  grid_flags: dict[str, tuple[Any, str]], analyze=None) -> dict[str, Any]:
    """`grid_flags` maps a scientific axis to (value parser, help); each becomes --<axis>s V [V ...]."""
    from studies import search
    from studies.tracking import redact

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, list(presets), grid_flags)
    add_train_args(p, skip=("seed",))  # --seed is the study's
    args = p.parse_args(argv)
    try:
        study = build_study(name, presets, args, grid_flags, analyze)
    except ValueError as e:
        p.error(str(e))
    pr = study.preset
    scan = f"≥ {pr.scan_steps} steps" + (f" and ≥ {pr.scan_examples} examples" if pr.scan_examples else "")
    phases = f"scan {scan} × {len(study.lrs())} lrs, refined once, then full runs at the best {pr.full_top} " \
        "and the frontier" \
        if pr.scan_steps else f"{pr.trials} TPE trials" if pr.tpe else f"{len(study.lrs())} lr(s) in full"
    print(f"study {study.name}: {len(study.cells())} cells; {phases}; {pr.seeds} seed(s); output {study.study_dir};"
          f" MLflow {redact(study.tracking_uri)}", flush=True)
    try:
        out = search.run_study(study)
    except (ValueError, ConnectionError, PermissionError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("NFNET_LAB_TRACEBACK") == "1":  # for whoever debugs the platform, not for users
            traceback.print_exc()
        p.exit(2, f"{p.prog}: error: {type(e).__name__ + ': ' if isinstance(e, OSError) else ''}{e}\n")
    print(out["summary"], flush=True)
    return out

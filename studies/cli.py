# TrainConfig <-> command line: every field is a flag, with the help text below.
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing

from studies.config import TrainConfig

HELP = {
    "model": "model name from nfnet.list_models() (e.g. nf_resnet_cifar, nfnet_f0, bn_resnet_cifar)",
    "model_overrides": 'JSON dict of model config overrides, e.g. \'{"width": 16, "depth": 1}\'',
    "dataset": "built-in source (synthetic, cifar10, cifar100, imagefolder) or the URI of a prepared shard set",
    "dataset_params": 'JSON dict for the source, e.g. \'{"num_train": 5000}\' or \'{"path": "/data/cifar"}\'',
    "data_root": "where prepared shards are kept (local path, s3://, gs://)",
    "loader": "auto (by size), resident (whole split in memory/GPU) or streaming (Ray Data)",
    "image_size": "training resolution in pixels (imagefolder data is resized/cropped to it)",
    "batch_size": "GLOBAL batch size, split evenly across workers",
    "num_workers": "Ray Train workers (DDP ranks)",
    "use_gpu": "one GPU per worker (NCCL); otherwise CPU workers with gloo",
    "cpus_per_worker": "CPUs (and torch threads) per worker",
    "optimizer": "only 'sgd' (Nesterov momentum), the paper's optimizer",
    "base_lr": "learning rate per 256 examples; the run uses base_lr * batch_size / 256",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum",
    "weight_decay": "weight decay (never on gains, biases, skip gains)",
    "warmup_epochs": "linear warmup length, then cosine decay to 0",
    "epochs": "training length in epochs (fractions allowed)",
    "max_steps": "training length in optimizer steps (overrides --epochs)",
    "clipping": "gradient clipping: none, norm (global norm) or agc (adaptive, unit-wise)",
    "clip_threshold": "λ for AGC (alias --lambda), max global norm for norm clipping",
    "augment_strength": "0..1: scales RandAugment, MixUp and CutMix together (0 = crops and flips only)",
    "label_smoothing": "label smoothing of the cross-entropy",
    "precision": "fp32 or bf16 (autocast; parameters stay fp32)",
    "channels_last": "channels_last memory format",
    "seed": "seed: same seed, same numbers",
    "log_every_steps": "step metrics and divergence check every N steps",
    "eval_every_epochs": "validate every N epochs (and at the end)",
    "checkpoint_every_epochs": "checkpoint every N epochs (0 = never)",
    "max_failures": "worker failures to recover from (restarts from the last checkpoint)",
    "divergence_factor": "diverged when the loss exceeds this multiple of its starting value, or is not finite",
    "gns_every_steps": "measure the gradient noise scale every N steps (0 = off)",
    "crash_at_step": "testing: kill the worker once at this step",
    "crash_marker": "testing: marker file that makes --crash-at-step fire only once",
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
        flags = ["--" + f.name.replace("_", "-")]
        if f.name == "clip_threshold":
            flags.append("--lambda")
        group.add_argument(*flags, dest=f.name, type=conv, default=None, metavar=tp.__name__.upper(),
                           help=HELP[f.name] + _default_text(f))


def _default_text(f) -> str:
    if f.default is not dataclasses.MISSING:
        return f" (default: {f.default})"
    return ""


def overrides_from_args(args: argparse.Namespace) -> dict:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}

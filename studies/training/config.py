"""TrainConfig: every setting of one training run, validated on construction. The one spelling of each setting
in results tables, MLflow params and tags and (through `flags.py`) the command line is its field name here, except
λ: its field is `clip_threshold` (`lambda` is a Python keyword), and everywhere outside Python code it is `lambda`
(PUBLIC_NAMES). Each field carries its help text and its bounds as field metadata: one place per setting."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[2]

# The name of a field outside Python code (flags, tables, MLflow), where it differs from the field's.
PUBLIC_NAMES = {"clip_threshold": "lambda"}


def public_name(field_name: str) -> str:
    return PUBLIC_NAMES.get(field_name, field_name)


def default_data_root() -> str:
    # Absolute: Ray changes the working directory inside trials and workers.
    return os.environ.get("NFNET_LAB_DATA", str(PROJECT_DIR / "data"))


@dataclass(frozen=True)
class Bound:
    """An interval a numeric setting must lie in (None = unbounded on that side)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, v: float) -> bool:  # written so that NaN never holds
        lo_ok = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        hi_ok = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return bool(lo_ok and hi_ok)

    def text(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


POSITIVE, NON_NEGATIVE, AT_LEAST_1 = Bound(0, lo_open=True), Bound(0), Bound(1)


class ConfigError(ValueError):
    """A refused TrainConfig; `field` names the setting at fault (None when it is the combination), and `detail`
    is the message without its prefix, starting with that field's name, so a command line can name the flag."""

    def __init__(self, detail: str, field: str | None = None):
        super().__init__(f"invalid TrainConfig: {detail}")
        self.detail, self.field = detail, field


def setting(default: Any = dataclasses.MISSING, *, help: str, bound: Bound | None = None,
            choices: tuple[str, ...] | None = None, factory: Any = dataclasses.MISSING, placement: bool = False):
    """A TrainConfig field with its help text (the flag's --help) and what values it accepts. placement: it says
    where or how safely the run goes, not what it computes, so it is no part of the run's identity."""
    return field(default=default, default_factory=factory,
                 metadata={"help": help, "bound": bound, "choices": choices, "placement": placement})


def _normal(v: Any) -> Any:
    """One spelling per value: 2 and 2.0 alike (JSON and argparse give either), nested containers likewise."""
    if isinstance(v, dict):
        return {str(k): _normal(x) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
        return [_normal(x) for x in v]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return int(v) if float(v).is_integer() else float(v)
    return v


@dataclass
class TrainConfig:
    model: str = setting("nf_resnet_cifar", help="model name from nfnet.list_models() (e.g. nf_resnet_cifar, "
                                                 "nfnet_f0, bn_resnet_cifar)")
    model_overrides: dict[str, Any] = setting(
        factory=dict, help='JSON dict of model config overrides, e.g. \'{"width": 16, "depth": 1}\'')
    dataset: str = setting("synthetic", help="built-in source (synthetic, cifar10, cifar100, imagefolder) or the "
                                             "URI of a prepared shard set")
    dataset_params: dict[str, Any] = setting(
        factory=dict, help='JSON dict for the source, e.g. \'{"n_train": 5000}\' or \'{"path": "/data/cifar"}\'')
    data_root: str = setting(factory=default_data_root, help="where prepared shards are kept (local path, s3://, "
                                                             "gs://)", placement=True)
    loader: str = setting("auto", choices=("auto", "resident", "streaming"),
                          help="auto (by size), resident (whole split in memory/GPU) or streaming (Ray Data)")
    image_size: int | None = setting(None, bound=POSITIVE, help="training resolution in pixels (required for "
                                                                "variable-size sources such as imagefolder)")

    batch_size: int = setting(256, bound=POSITIVE, help="GLOBAL batch size, split evenly across workers")
    num_workers: int = setting(1, bound=AT_LEAST_1, help="Ray Train workers (DDP ranks)")
    use_gpu: bool = setting(False, help="GPU workers (NCCL); otherwise CPU workers with gloo")
    gpus_per_worker: float = setting(1.0, help="GPUs per worker with --use-gpu; a fraction (0.25) packs small "
                                               "trials onto one GPU", placement=True)
    cpus_per_worker: float = setting(1.0, bound=POSITIVE, help="CPUs (and torch threads) per worker", placement=True)

    optimizer: str = setting("sgd", choices=("sgd",), help="only 'sgd' (Nesterov momentum), the paper's optimizer")
    base_lr: float = setting(0.1, bound=POSITIVE, help="learning rate per 256 examples; the run uses "
                                                       "base_lr * batch_size / 256 (linear scaling rule)")
    momentum: float = setting(0.9, bound=Bound(0, 1, hi_open=True), help="SGD momentum")
    nesterov: bool = setting(True, help="Nesterov momentum")
    weight_decay: float = setting(5e-5, bound=NON_NEGATIVE, help="weight decay (never on gains, biases, skip gains)")
    warmup_epochs: float = setting(1.0, bound=NON_NEGATIVE, help="linear warmup length, then the schedule")
    warmup_steps: int | None = setting(None, bound=NON_NEGATIVE, help="linear warmup length in optimizer steps "
                                                                      "(overrides --warmup-epochs)")
    epochs: float = setting(5.0, bound=POSITIVE, help="training length in epochs (fractions allowed)")
    max_steps: int | None = setting(None, bound=POSITIVE, help="training length in optimizer steps (overrides "
                                                               "--epochs)")
    schedule_steps: int | None = setting(None, bound=AT_LEAST_1, help="lr schedule length in steps, when longer "
                                                                      "than the run (the cosine ends past its end)")
    lr_schedule: str = setting("cosine", choices=("cosine", "constant"),
                               help="cosine (warmup, then cosine decay to 0) or constant (warmup, then the peak lr "
                                    "held: stability scans reach the lr they are labelled with)")

    clipping: str = setting("agc", choices=("none", "norm", "agc"),
                            help="gradient clipping: none, norm (global norm) or agc (adaptive, unit-wise)")
    clip_threshold: float | None = setting(0.02, help="λ for AGC, max global norm for norm clipping")
    augment_strength: float = setting(0.0, bound=Bound(0, 1), help="0..1: scales RandAugment, MixUp and CutMix "
                                                                   "together (0 = crops and flips only)")
    label_smoothing: float = setting(0.0, bound=Bound(0, 1, hi_open=True), help="label smoothing of the "
                                                                                "cross-entropy")
    precision: str = setting("fp32", choices=("fp32", "bf16"), help="fp32 or bf16 (autocast; parameters stay fp32)")
    channels_last: bool = setting(False, help="channels_last memory format")
    compile: bool = setting(False, help="torch.compile the model")

    seed: int = setting(0, help="seed: same seed, same numbers")
    log_every_steps: int = setting(10, bound=AT_LEAST_1, help="step metrics and divergence check every N steps "
                                                              "(one host sync each)")
    eval_every_epochs: int = setting(1, bound=NON_NEGATIVE, help="validate every N epochs and at the end "
                                                                 "(0 = never: stability scans)")
    checkpoint_every_epochs: int = setting(1, bound=NON_NEGATIVE, placement=True,
                                           help="checkpoint every N epochs (0 = never)")
    checkpoint_every_minutes: float = setting(0.0, bound=NON_NEGATIVE, help="also checkpoint mid-epoch every N "
                                                                            "minutes (a lost worker costs at most "
                                                                            "that; 0 = off)", placement=True)
    max_failures: int = setting(0, bound=NON_NEGATIVE, help="worker failures to recover from (restarts from the "
                                                            "last checkpoint)", placement=True)
    stall_timeout: float | None = setting(None, bound=POSITIVE, placement=True,
                                          help="seconds without a training step after which a run counts as hung "
                                               "and is ended (then retried as a lost worker; when its retries are "
                                               "spent, recorded failed); default: 600 until the run's pace is known, "
                                               "then the larger of 120 and 50x its median step time")
    divergence_factor: float = setting(5.0, bound=Bound(1, lo_open=True), help="diverged when the loss exceeds "
                                       "this multiple of its starting value, or is not finite")
    gns_every_steps: int = setting(10, bound=NON_NEGATIVE, help="measure the gradient noise scale every N steps "
                                                                "(0 = off)")

    def __post_init__(self):
        from nfnet import list_models

        def bad(msg: str, name: str | None = None):
            raise ConfigError(msg, name)

        for f in dataclasses.fields(self):
            v, bound, choices = getattr(self, f.name), f.metadata["bound"], f.metadata["choices"]
            if choices and v not in choices:
                bad(f"{f.name} must be one of {', '.join(choices)}, got {v!r}", f.name)
            if isinstance(v, float) and not math.isfinite(v):  # inf passes a bound open above, and any unbounded field
                bad(f"{f.name} must be a finite number, got {v}", f.name)
            if bound and v is not None and not bound.holds(v):
                bad(f"{f.name} must be {bound.text()}, got {v}", f.name)
        if self.model not in list_models():
            bad(f"unknown model {self.model!r}; choose one of {', '.join(list_models())}")
        if self.batch_size % self.num_workers:
            bad(f"batch_size {self.batch_size} is not divisible by num_workers {self.num_workers}; "
                f"use a multiple of {self.num_workers}", "batch_size")
        if self.clipping != "none" and not (self.clip_threshold or 0) > 0:
            bad(f"clip_threshold (λ for AGC) must be > 0, got {self.clip_threshold}; use clipping='none' to disable",
                "clip_threshold")
        if self.nesterov and self.momentum == 0:  # the SGD would refuse it inside the first trial
            bad("nesterov needs a momentum > 0, got momentum 0.0; turn nesterov off or use a momentum in (0, 1)",
                "nesterov")
        g = self.gpus_per_worker
        if not (0 < g <= 1 or float(g).is_integer()):
            bad(f"gpus_per_worker must be a fraction in (0, 1] or a whole number, got {g}", "gpus_per_worker")
        if self.clipping == "none":
            self.clip_threshold = None  # no clipping: no λ, so none is logged or stored

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.num_workers

    @property
    def lambda_label(self) -> str:
        return lambda_label(self.clip_threshold if self.clipping != "none" else None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def placement_fields() -> set[str]:
        return {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("placement")}

    def identity(self) -> dict[str, Any]:
        """What decides the run's numbers: every field but placement ones, None left out (a new field that
        defaults to None keeps every key), values normalised. The code is the other half (tracking.code_version)."""
        return {f.name: _normal(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.metadata.get("placement") and getattr(self, f.name) is not None}

    def fingerprint(self) -> str:
        """Hash of identity(): a checkpoint or a results row belongs to exactly this computation."""
        return hashlib.sha1(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def flat(self) -> dict[str, str]:
        """MLflow params: public names, nested dicts flattened with dots, everything as text; λ as its label
        ('none' without clipping), and the peak lr the run used (base_lr scaled to its batch)."""
        out: dict[str, str] = {}
        for k, v in self.to_dict().items():
            if v is None:
                continue
            if isinstance(v, dict):
                for kk, vv in v.items():
                    out[f"{k}.{kk}"] = json.dumps(vv) if isinstance(vv, (dict, list)) else str(vv)
            else:
                out[public_name(k)] = str(v)
        out["lambda"] = self.lambda_label
        out["peak_lr"] = str(self.lr)
        return out


def lambda_label(clip_threshold: float | None) -> str:
    """λ as text, the one formatter for tables, tags and plots: '0.01', or 'none' without clipping."""
    return "none" if clip_threshold is None else f"{clip_threshold:g}"


def parse_lambda(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "no") else float(text)

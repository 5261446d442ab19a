"""TrainConfig: every setting of one training run, validated on construction. The one spelling of each setting
in config, results tables and MLflow params is its field name here; λ is `clip_threshold`."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLIPPING_MODES = ("none", "norm", "agc")
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("cosine", "constant")
PROJECT_DIR = Path(__file__).resolve().parent.parent


def default_data_root() -> str:
    # Absolute: Ray changes the working directory inside trials and workers.
    return os.environ.get("NFNET_LAB_DATA", str(PROJECT_DIR / "data"))


@dataclass
class TrainConfig:
    model: str = "nf_resnet_cifar"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # A source name known to storage (synthetic, cifar10, cifar100, imagefolder) or a shard-set URI.
    dataset: str = "synthetic"
    dataset_params: dict[str, Any] = field(default_factory=dict)
    data_root: str = field(default_factory=default_data_root)
    loader: str = "auto"  # auto | resident | streaming
    image_size: int | None = None  # train resolution; required for variable-size sources (imagefolder)

    batch_size: int = 256  # GLOBAL batch, split evenly over workers
    num_workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # a fraction packs small trials onto one GPU (0.25: four trials share it)
    cpus_per_worker: float = 1.0

    optimizer: str = "sgd"  # SGD with Nesterov momentum, as in the paper
    base_lr: float = 0.1  # per 256 examples; lr = base_lr * batch_size / 256 (linear scaling rule)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-5  # never applied to gains, biases and skip gains
    warmup_epochs: float = 1.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    epochs: float = 5.0
    max_steps: int | None = None  # overrides epochs when set
    # Length of the lr schedule when longer than the run (the cosine's end lies past the run's last step).
    schedule_steps: int | None = None
    # cosine: warmup, then cosine decay to 0 (training). constant: warmup, then the peak lr held (a stability
    # scan: it reaches the lr it is labelled with and stays there).
    lr_schedule: str = "cosine"

    clipping: str = "agc"
    clip_threshold: float | None = 0.02  # λ for AGC, max global norm for "norm"; None without clipping
    augment_strength: float = 0.0
    label_smoothing: float = 0.0
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False  # torch.compile the model

    seed: int = 0
    log_every_steps: int = 10  # divergence check + step metrics; one host sync per this many steps
    eval_every_epochs: int = 1  # 0 = never (stability scans)
    checkpoint_every_epochs: int = 1
    checkpoint_every_minutes: float = 0.0  # also mid-epoch, at the first log window this long after the last; 0 = off
    max_failures: int = 0
    divergence_factor: float = 5.0  # diverged if loss > factor * initial loss (or non-finite)
    gns_every_steps: int = 10  # gradient noise scale measurement cadence; 0 disables

    def __post_init__(self):
        from nfnet import list_models

        def bad(msg: str):
            raise ValueError(f"invalid TrainConfig: {msg}")

        if self.model not in list_models():
            bad(f"unknown model {self.model!r}; choose one of {', '.join(list_models())}")
        if self.batch_size <= 0:
            bad(f"batch_size must be positive, got {self.batch_size}")
        if self.num_workers < 1:
            bad(f"num_workers must be >= 1, got {self.num_workers}")
        if self.batch_size % self.num_workers:
            bad(
                f"batch_size {self.batch_size} is not divisible by num_workers {self.num_workers}; "
                f"use a multiple of {self.num_workers}"
            )
        if self.clipping not in CLIPPING_MODES:
            bad(f"clipping must be one of {CLIPPING_MODES}, got {self.clipping!r}")
        if self.clipping != "none" and not (self.clip_threshold or 0) > 0:
            bad(f"clip_threshold (λ for AGC) must be > 0, got {self.clip_threshold}; use clipping='none' to disable")
        if self.precision not in PRECISIONS:
            bad(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            bad(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.optimizer != "sgd":
            bad(f"optimizer {self.optimizer!r} is not supported; use 'sgd'")
        if not self.base_lr > 0:
            bad(f"base_lr must be > 0, got {self.base_lr}")
        if not 0.0 <= self.augment_strength <= 1.0:
            bad(f"augment_strength must be in [0, 1], got {self.augment_strength}")
        if not 0.0 <= self.label_smoothing < 1.0:
            bad(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_steps is None and not self.epochs > 0:
            bad(f"epochs must be > 0 (or set max_steps), got {self.epochs}")
        if self.max_steps is not None and self.max_steps <= 0:
            bad(f"max_steps must be positive, got {self.max_steps}")
        if self.warmup_epochs < 0:
            bad(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.loader not in ("auto", "resident", "streaming"):
            bad(f"loader must be auto, resident or streaming, got {self.loader!r}")
        if self.log_every_steps < 1 or self.eval_every_epochs < 0 or self.checkpoint_every_epochs < 0:
            bad("log_every_steps must be >= 1, eval_every_epochs and checkpoint_every_epochs >= 0")
        for name in ("warmup_steps", "schedule_steps"):
            v = getattr(self, name)
            if v is not None and v < (0 if name == "warmup_steps" else 1):
                bad(f"{name} must be {'>= 0' if name == 'warmup_steps' else 'positive'}, got {v}")
        if self.gns_every_steps < 0:
            bad(f"gns_every_steps must be >= 0 (0 = off), got {self.gns_every_steps}")
        if self.checkpoint_every_minutes < 0:
            bad(f"checkpoint_every_minutes must be >= 0 (0 = off), got {self.checkpoint_every_minutes}")
        if self.max_failures < 0:
            bad(f"max_failures must be >= 0, got {self.max_failures}")
        if self.image_size is not None and self.image_size <= 0:
            bad(f"image_size must be positive, got {self.image_size}")
        g = self.gpus_per_worker
        if not (0 < g <= 1 or float(g).is_integer()):
            bad(f"gpus_per_worker must be a fraction in (0, 1] or a whole number, got {g}")
        if self.cpus_per_worker <= 0:
            bad(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.clipping == "none":
            self.clip_threshold = None  # no clipping: no λ, so none is logged or stored
        if not self.divergence_factor > 1:
            bad(f"divergence_factor must be > 1, got {self.divergence_factor}")

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

    def fingerprint(self) -> str:
        """Hash of every field: a checkpoint or a results row belongs to exactly this config."""
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]

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
        # MLflow params: nested dicts flattened with dots, everything as text.
        out: dict[str, str] = {}
        for k, v in self.to_dict().items():
            if v is None:
                continue
            if isinstance(v, dict):
                for kk, vv in v.items():
                    out[f"{k}.{kk}"] = json.dumps(vv) if isinstance(vv, (dict, list)) else str(vv)
            else:
                out[k] = str(v)
        out["lr"] = str(self.lr)
        return out


def lambda_label(clip_threshold: float | None) -> str:
    """λ as text, the one formatter for tables, tags and plots: '0.01', or 'none' without clipping."""
    return "none" if clip_threshold is None else f"{clip_threshold:g}"


def parse_lambda(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "no") else float(text)

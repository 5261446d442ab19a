"""The state a worker's training run carries, as types: where it runs (`WorkerContext`), one step's outputs
(`Step`), an epoch's device-side sums (`EpochTally`) and the whole run (`Training`: model, optimizer, schedule,
monitors, history).

A module of its own so that the loop (studies/training/loop.py) and the modules it calls, checkpoints
(checkpoint.py) and data (data.py), all import these types from here: none of them imports another for its types,
so no circle remains, not even a type-only one (tests/test_layout.py checks)."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

import nfnet
from studies.training.config import TrainConfig
from studies.training.monitors import DivergenceMonitor, GradNoiseScale


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # report(metrics, checkpoint_dir or None): once per epoch and at the end, on every rank (Ray's barrier).
    report: Callable[[dict[str, Any], str | None], None] = lambda metrics, ckpt: None
    # Step metrics every log_every_steps (rank 0 only, e.g. to MLflow).
    log_step: Callable[[dict[str, float], int], None] = lambda metrics, step: None
    resume_from: str | None = None  # a checkpoint directory
    print: Callable[[str], None] = print
    on_step: Callable[[int], None] | None = None  # test hook: called before each step (fault injection)
    # Progress for the watchdog (studies/training/watchdog.py): the step and where the run is now.
    beat: Callable[[int, str], None] = lambda step, where: None

    def step_where(self) -> str:
        # With DDP a step waits on every rank in its gradient all-reduce: a stuck peer shows up here.
        return "step" if self.world_size == 1 else "step or its gradient all-reduce"


@dataclass
class Step:
    loss: torch.Tensor
    logits: torch.Tensor
    grad_sq_small: torch.Tensor | None = None  # gradient noise scale inputs, when measured this step
    grad_sq_big: torch.Tensor | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class EpochTally:
    """Device-side sums over one epoch (no sync until the epoch ends)."""

    device: torch.device
    loss: torch.Tensor = None
    correct: torch.Tensor = None
    seen: int = 0
    t0: float = field(default_factory=time.perf_counter)
    last: dict[str, Any] = field(default_factory=dict)  # the last logged step metrics

    def __post_init__(self):
        self.loss = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device)

    def add(self, s: Step, labels: torch.Tensor) -> None:
        self.loss += s.loss
        self.correct += (s.logits.argmax(1) == labels).sum()
        self.seen += len(labels)


@dataclass
class Training:
    """One worker's training run: what the loop, its log windows, end_of_epoch and checkpoints share."""

    cfg: TrainConfig
    ctx: WorkerContext
    model: torch.nn.Module
    net: torch.nn.Module  # the model as trained: DDP-wrapped and/or compiled
    opt: torch.optim.SGD | nfnet.optim.SGD  # torch's fused SGD on CUDA, its multi-tensor update as nfnet.optim on CPU
    augment: nfnet.Augment
    val: Callable[[], Iterable] | None  # -> this rank's (images, labels) chunks of the validation split
    total: int  # steps to run
    schedule: int  # lr schedule length
    warmup: int
    n_epochs: int
    gns_on: bool = False  # measure the gradient noise scale (never for BatchNorm models: splitting changes them)
    gns: GradNoiseScale = field(default_factory=GradNoiseScale)
    monitor: DivergenceMonitor = None
    last_checkpoint: float = field(default_factory=time.monotonic)
    state: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "step": 0, "history": [],
                                                           "best_val_acc": math.nan, "best_val_loss": math.nan})

    def __post_init__(self):
        self.monitor = self.monitor or DivergenceMonitor(self.cfg.divergence_factor, self.ctx.world_size)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.agc_params = nfnet.agc_parameters(self.model) if self.cfg.clipping == "agc" else None

    def amp(self):
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

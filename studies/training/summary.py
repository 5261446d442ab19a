"""What one training run returns: RunSummary, its status and verdict, and the objective searches maximise. The
results table's columns are derived from these fields (studies/sweep/tables.py)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from studies.training.verdict import judge

STATUSES = ("completed", "diverged", "failed", "stopped")
OBJECTIVE = "objective"  # the metric name Tune and Optuna see: RunSummary.objective()


@dataclass
class RunSummary:
    status: str  # one of STATUSES
    steps: int = 0
    epochs: int = 0
    diverged_step: int | None = None
    diverged_reason: str | None = None
    error: str | None = None
    best_val_acc: float | None = None
    final_val_acc: float | None = None
    best_val_loss: float | None = None
    final_val_loss: float | None = None
    initial_train_loss: float | None = None  # the first step's loss: the loss at initialisation
    final_train_loss: float | None = None  # mean over the last tenth of the steps run
    final_train_loss_se: float | None = None  # its standard error (spread of those steps' losses / √steps)
    lowest_train_loss: float | None = None  # lowest mean over any tenth of the steps: how far the curve fell
    highest_train_loss: float | None = None  # highest such mean: how far it rose
    verdict: str | None = None  # trained | stalled | collapsed | diverged (studies/training/verdict.py); None:
    # failed or stopped
    images_per_sec: float | None = None
    train_time_s: float | None = None
    wall_time_s: float | None = None
    gns: float | None = None  # gradient noise scale B_simple (McCandlish et al. 2018)
    node_id: str | None = None
    mlflow_run_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)  # per epoch; the epochs table

    def __post_init__(self):
        if self.verdict is None:
            self.verdict = judge(self.status, self.initial_train_loss, self.final_train_loss,
                                 self.final_train_loss_se, self.lowest_train_loss, self.highest_train_loss)

    def scalars(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "history"}

    @classmethod
    def from_scalars(cls, d: dict[str, Any]) -> RunSummary:
        names = {f.name for f in dataclasses.fields(cls)} - {"history"}
        return cls(**{k: v for k, v in d.items() if k in names})

    def objective(self) -> float:
        """What searches maximise: best validation top-1; 0 for a run that diverged, failed or never evaluated."""
        v = self.best_val_acc
        if self.status in ("diverged", "failed") or v is None or not math.isfinite(v):
            return 0.0
        return float(v)

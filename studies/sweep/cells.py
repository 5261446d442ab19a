"""A cell: one combination of a study's scientific axes, a typed value built once from the preset's grid.

Everything else about it is derived from its axes: its label ('batch_size=256 lambda=0.01', the tables' `cell`
column and the MLflow `cell` tag), its short name in run names ('b256 λ0.01'), the TrainConfig changes it makes
(λ also sets `clipping`; a variant sets the model) and its `axes` column: the axes' values as JSON, typed (256 an
int, 0.01 a float, null without clipping), named as the tables name them (`lambda` for clip_threshold). The layout,
the figures and the findings read `axes`; a label is parsed only in a table written before it had that column."""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from studies.training.config import lambda_label, public_name

# Named config variants a study can use as a scientific axis (batch_scaling.py: the paper's Fig. 2a).
VARIANTS: dict[str, dict[str, Any]] = {
    "bn_resnet": {"model": "bn_resnet_cifar", "clipping": "none"},
    "nf_resnet": {"model": "nf_resnet_cifar", "clipping": "none"},
    "nf_resnet+agc": {"model": "nf_resnet_cifar", "clipping": "agc"},
}
# Short axis names, the one spelling for run names ('b1024 λ0.16') and metric-name prefixes ('b1024', 'aug0.5').
SHORT = {"batch_size": "b", "augment_strength": "aug", "base_lr": "lr", "seed": "s"}


@dataclass(frozen=True)
class Cell:
    axes: tuple[tuple[str, Any], ...]  # (grid axis: a TrainConfig field or "variant", value), in the grid's order

    @classmethod
    def grid(cls, grid: dict[str, list[Any]]) -> list[Cell]:
        """Every combination of the grid's values, the first axis slowest."""
        return [cls(tuple(zip(grid, values))) for values in itertools.product(*grid.values())]

    def value(self, axis: str) -> Any:
        return dict(self.axes)[axis]

    def changes(self) -> dict[str, Any]:
        """The TrainConfig changes the cell makes."""
        out: dict[str, Any] = {}
        for k, v in self.axes:
            if k == "clip_threshold":  # λ; None = the no-clipping control
                out.update(clipping="none" if v is None else "agc", clip_threshold=v)
            elif k == "variant":
                out.update(VARIANTS[v])
            else:
                out[k] = v
        return out

    @property
    def label(self) -> str:
        """'batch_size=256 lambda=0.01': the tables' `cell`, the MLflow tag."""
        def text(k, v):
            if k == "clip_threshold":
                return f"lambda={lambda_label(v)}"
            return f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}"

        return " ".join(text(k, v) for k, v in self.axes)

    @property
    def order(self) -> list[str]:
        """The cell's axis values as texts that sort as the values do (the `order` tag's first part)."""
        return [sortable(lambda_label(v)) if k == "clip_threshold" and v is None else sortable(v)  # 'none', as labelled
                for k, v in self.axes]

    @property
    def short(self) -> str:
        """The cell as a run name spells it, readable in a narrow column: 'b1024 λ0.16', 'b256 aug0.5'."""
        def text(k, v):
            if k == "variant":
                return str(v)
            if k == "clip_threshold":
                return f"λ{lambda_label(v)}"
            if k in SHORT:
                return f"{SHORT[k]}{v:.3g}" if isinstance(v, float) else f"{SHORT[k]}{v}"
            return f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, (dict, list)) else v}"

        return " ".join(text(k, v) for k, v in self.axes)

    @property
    def column(self) -> str:
        """The tables' `axes` column: {"batch_size": 256, "lambda": 0.01} (JSON, in the grid's order)."""
        return json.dumps({public_name(k): v for k, v in self.axes})


def sortable(value: Any) -> str:
    """A value as text that sorts as the value does: numbers by size (a fixed-width decimal), then anything else
    as its label spells it ('none', no clipping: last, as in the tables)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        return f"{v:024.9f}" if v >= 0 else f"-{-v:023.9f}"
    return "~" + (json.dumps(value) if isinstance(value, (dict, list)) else str(value))


_PART = re.compile(r" (?=[A-Za-z_][A-Za-z0-9_]*=)")  # a label's "axis=value" parts (a JSON value may hold spaces)


def axes_of(row: dict[str, Any]) -> dict[str, Any]:
    """A table row's cell axes, typed, by their column names ({'batch_size': 256, 'lambda': None}): its `axes`
    column; a row written before that column existed falls back to its label, each value read as JSON where it is
    one ('none' → None, '256' → 256), else kept as text."""
    if row.get("axes"):
        return json.loads(row["axes"])
    out = {}
    for part in _PART.split(str(row["cell"]).strip()):
        if "=" in part:
            k, text = part.split("=", 1)
            out[k] = None if k == "lambda" and text == lambda_label(None) else _json_or_text(text)
    return out


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text

"""The map a study's cells are shown as, a pure function of their axes (cells.axes_of; no Ray, no plotting):
rows (the batch size, else the first other axis that varies: augmentation in studies/augmentation.py), columns
(λ, 'no clipping' last), and a map per value of any further axis (a facet), for the tables, the words, the figures
and the MLflow metric names of the cells."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from studies.sweep.cells import SHORT, axes_of
from studies.training.config import lambda_label


def rows_of(table: pa.Table | list[dict]) -> list[dict[str, Any]]:
    return table.to_pylist() if isinstance(table, pa.Table) else list(table)


ROW_WORDS = {"batch_size": ("batch", "as the batch grows"),
             "augment_strength": ("augmentation", "as augmentation grows")}
NO_LAMBDA = lambda_label(None)  # 'none': λ's label without clipping, as cell labels and tables store it
NO_CLIPPING = "no clipping"  # that column as the maps, tables and words name it


def axis_text(axis: str, v) -> str:
    """An axis value as the cell's label writes it: '256', '0.5', 'none' (λ without clipping), JSON for a dict."""
    if axis == "lambda":
        return lambda_label(v)
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _value(v):
    """An axis value for sorting: numbers as they are (0.5 before 1.0), None (no clipping) last, else as text."""
    if v is None:
        return math.inf
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else axis_text("", v)


def value_text(v) -> str:
    """A row's value as tables, words and figures write it: '1024', '0.5', '0', or the label's text."""
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def sort_key(v) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def lambda_column(text: str) -> str:
    return NO_CLIPPING if text.lower() == NO_LAMBDA else f"λ={text}"


@dataclass(frozen=True)
class Layout:
    """How a study's cells are drawn and tabled: the map's rows (the batch size, else the first axis that varies
    but λ), its columns (λ, with 'no clipping' last; else the other axes), and one map per value of any further
    axis that varies (a facet: e.g. augment_strength=0.5 in a batch × λ × augmentation grid). Axes of one value
    are left out. A pure function of the cells' axes."""

    row_axis: str = "batch_size"
    col_axes: tuple[str, ...] = ()
    facet_axes: tuple[str, ...] = ()

    @staticmethod
    def of(cells: pa.Table | list[dict]) -> Layout:
        rows = rows_of(cells)
        labels = [axes_of(c) for c in rows]
        axes = list(dict.fromkeys(k for lab in labels for k in lab))
        varying = [a for a in axes if len({json.dumps(lab.get(a), sort_keys=True) for lab in labels}) > 1]
        if "batch_size" in varying or not [a for a in varying if a != "lambda"]:
            row = "batch_size"
        else:
            row = next(a for a in varying if a != "lambda")
        rest = [a for a in varying if a != row]
        if "lambda" in axes and row != "lambda":
            cols = ("lambda",)
        elif rest:
            cols = (rest[-1],)
        else:  # nothing else varies: the column names the cell's other axes
            cols = tuple(a for a in axes if a != row)
        return Layout(row, cols, tuple(a for a in rest if a not in cols))

    @property
    def row_name(self) -> str:
        """The rows as the words say them: 'batch', 'augmentation', else the axis's name."""
        return ROW_WORDS.get(self.row_axis, (self.row_axis, ""))[0]

    @property
    def row_title(self) -> str:
        """The rows' axis as a figure labels it: 'batch size', 'augmentation (augment_strength)'."""
        return "batch size" if self.row_axis == "batch_size" else f"{self.row_name} ({self.row_axis})"

    @property
    def grows(self) -> str:
        return ROW_WORDS.get(self.row_axis, ("", f"as {self.row_axis} grows"))[1]

    def row(self, c: dict):
        if self.row_axis == "batch_size":
            return int(c["batch_size"])
        return _value(axes_of(c).get(self.row_axis, "-"))

    def col(self, c: dict) -> str:
        if self.col_axes == ("lambda",):  # the row's own λ (null: no clipping)
            return lambda_column(lambda_label(c["lambda"] if "lambda" in c else axes_of(c)["lambda"]))
        axes = axes_of(c)
        return " ".join(f"{a}={axis_text(a, axes[a])}" for a in self.col_axes if a in axes)

    def facet(self, c: dict) -> str:
        axes = axes_of(c)
        return " ".join(f"{a}={axis_text(a, axes[a])}" for a in self.facet_axes if a in axes)

    def coords(self, c: dict) -> tuple[str, Any, str]:
        return self.facet(c), self.row(c), self.col(c)

    def order(self, c: dict) -> tuple:
        axes = axes_of(c)
        return (*(sort_key(_value(axes.get(a, ""))) for a in self.facet_axes), sort_key(self.row(c)),
                *(sort_key(_value(axes.get(a, ""))) for a in self.col_axes))


@dataclass(frozen=True)
class Grid:
    """One map (a facet's): its rows, column labels and cells by (row, column)."""

    facet: str
    rows: list
    cols: list[str]
    at: dict[tuple[Any, str], dict]
    layout: Layout


def grids_of(cells: pa.Table | list[dict]) -> list[Grid]:
    """The maps of a cells table, one per facet (one when no third axis varies), each rows × columns."""
    rows = rows_of(cells)
    lay = Layout.of(rows)
    rows = sorted(rows, key=lay.order)
    out = []
    for facet in dict.fromkeys(lay.facet(c) for c in rows):
        mine = [c for c in rows if lay.facet(c) == facet]
        out.append(Grid(facet, list(dict.fromkeys(lay.row(c) for c in mine)),
                        list(dict.fromkeys(lay.col(c) for c in mine)),
                        {(lay.row(c), lay.col(c)): c for c in mine}, lay))
    return out


CELL_METRICS = ("max_stable_lr", "max_stable_lr_min", "max_stable_lr_max", "stable_fraction", "lr_sensitivity",
                "best_val_acc", "best_val_acc_sd")


def _slug(text: str) -> str:
    """A name part MLflow takes (letters, digits and _ - . /): 'λ=0.01' -> 'lambda_0.01'."""
    text = text.replace("λ=", "lambda_").replace(NO_CLIPPING, f"lambda_{NO_LAMBDA}").replace("=", "_")
    return "".join(ch if ch.isalnum() and ch.isascii() or ch in "_-." else "_" for ch in text)


def metric_path(lay: Layout, c: dict, with_row: bool = True) -> str:
    """A cell as an MLflow metric name's tail: 'b1024/lambda_0.01', 'aug0.5/lambda_none',
    'b1024/augment_strength_0.5/lambda_0.01' (row, facet, column); without the row, a column's series name."""
    facet, row, col = lay.coords(c)
    row_part = f"{SHORT.get(lay.row_axis, lay.row_axis + '_')}{value_text(row)}" if isinstance(row, (int, float)) \
        else f"{lay.row_axis}_{row}"
    parts = ([_slug(row_part)] if with_row else []) + ([_slug(facet)] if facet else []) + [_slug(col) or "all"]
    return "/".join(parts)


def cell_metrics(cells: pa.Table) -> list[tuple[str, float, int]]:
    """(metric name, value, step) of the frontier as MLflow metrics: one flat metric per cell at step 0
    (`max_stable_lr/b1024/lambda_0.01`: the run's overview and the runs table show every cell; a facet's value
    between the row and the column), and, when the rows are batch sizes, one series per column of each map with
    step = batch size (`max_stable_lr/lambda_0.01`: a chart over batch sizes; MLflow steps are integers). A
    frontier at the largest lr tried ('≥') is a lower bound: `max_stable_lr_at_edge/…` says which (1) are. The
    spread over seeds: `max_stable_lr_min/…`, `max_stable_lr_max/…` (the seeds' own frontiers), `best_val_acc_sd/…`."""
    rows = cells.to_pylist()
    lay = Layout.of(rows)
    # a series over the rows where they are whole numbers (batch sizes; not augmentation's 0.5): MLflow steps
    steps = all(isinstance(lay.row(c), int) for c in rows)
    out = []
    for c in rows:
        cell, row = metric_path(lay, c), lay.row(c)
        series = metric_path(lay, c, with_row=False) if steps and isinstance(row, int) else None
        for k in CELL_METRICS:
            if c[k] is not None:
                out.append((f"{k}/{cell}", float(c[k]), 0))
                if series:
                    out.append((f"{k}/{series}", float(c[k]), row))
        if c["max_stable_lr"] is not None:
            out.append((f"max_stable_lr_at_edge/{cell}", float(bool(c["max_stable_lr_at_edge"])), 0))
    return out

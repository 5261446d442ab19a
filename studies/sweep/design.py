"""A study's design as plain data (no Ray): what it holds fixed, its scientific grid of cells, the nuisance lr
design, and the trials of each phase as Specs, a pure function of the design (and of the scan's results):

  scan    short runs of every lr × seed, past the warmup at a constant lr: where does the cell train at all?
  refine  one more lr per cell, the geometric midpoint between its frontier and the first lr that fails (√2); in
          a cell whose smallest lr already fails by an instability, the lr √2 below it
  replicate  the lrs that decide each cell (best, frontier, first failure) rerun until each has `replicates`
          seeds; rounds repeat while the majority moves the frontier onto lrs that have fewer
  full    the whole budget at the cell's best lrs that train, and at its frontier (does it hold?), at every
          replicate seed: how well, and how much that varies?

A study without a scan (the paper's protocol) runs every lr of its design in full; hpo searches with TPE. The lr
grid is the Deep Learning Tuning Playbook's exploration phase: the design never depends on completion order."""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import storage
from studies.sweep import frontier, knobs, tables
from studies.sweep.cells import VARIANTS, Cell, sortable  # noqa: F401  (VARIANTS re-exported)
from studies.sweep.knobs import Also, at_least, knob
from studies.training.config import TrainConfig, lambda_label, public_name
from studies.training.flags import grid_flag
from studies.training.schedule import run_length
from studies.training.tracking import code_version, redact


def log_grid(low: float, high: float, per_octave: float = 1) -> tuple[float, ...]:
    if not 0 < low <= high < math.inf:  # else a ZeroDivisionError, or () (the lr design silently falls back)
        raise ValueError(f"a log grid needs finite 0 < low <= high, got {low:g} .. {high:g}")
    n = round(math.log2(high / low) * per_octave)
    return tuple(float(f"{low * 2 ** (i / per_octave):.4g}") for i in range(n + 1))


def lr_range(low_high: list[float]) -> tuple[float, ...]:
    """`--lr-range LOW HIGH`: base lrs on a log grid from LOW to HIGH, a factor 2 apart; a bad range is refused in
    one line naming the fix."""
    low, high = low_high
    given = f"--lr-range {low:g} {high:g}"
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{given}: LOW and HIGH must be finite numbers, e.g. --lr-range 0.05 0.8")
    if not low > 0:
        raise ValueError(f"{given}: a log grid cannot start at {low:g}; LOW must be > 0, e.g. --lr-range 0.05 0.8")
    if low > high:
        raise ValueError(f"{given}: LOW is above HIGH; use --lr-range {high:g} {low:g}")
    return log_grid(low, high)


def _lrs_problem(preset: Preset, lrs: tuple[float, ...]) -> str | None:
    if any(not 0 < lr < math.inf for lr in lrs):
        return f"must be finite numbers > 0, got {list(lrs)}"
    if len(set(lrs)) < len(lrs):  # the same trials twice: one result counted as two
        return f"lists a value twice ({list(lrs)}); list each once"
    return None


_scans = lambda p: bool(p.scan_steps)  # a knob of the scan's phases: its param is logged when the study scans


@dataclass(frozen=True)
class Preset:
    """What a study holds fixed, what it varies (grid: scientific) and how it explores the nuisance lr. Each design
    knob is declared once (knobs.knob): its flag, its check (Study) and its MLflow param (design_params)."""

    grid: dict[str, list[Any]]  # axes: TrainConfig fields, "variant" (VARIANTS), clip_threshold None = no clipping
    fixed: dict[str, Any]  # TrainConfig overrides held fixed
    seeds: int = knob(1, check=at_least(1), param="design.seeds", help="seeds per learning rate")
    replicates: int = knob(1, check=at_least(1, " (1 = no replication)"), param="design.replicates", logged=_scans,
                           help="seeds at the lrs that decide each cell (its frontier, the first lr that fails, its "
                                "best lr) and in the full phase: reruns until each rests on a majority of this many; "
                                "1 = none")
    # A setting's score: mean of its best k seeds (the paper: best 4 of 5).
    best_k: int | None = knob(None, param="design.best_k", help="a setting's score = mean of its best k seeds",
                              check=lambda p, v: None if v is None or 1 <= v <= p.seeds else
                              f"must be in [1, seeds={p.seeds}], got {v}")
    # The base lr design (per 256 examples), every lr in every cell; () = the fixed config's base_lr.
    lrs: tuple[float, ...] = knob((), help="the base lrs tried in every cell (per 256)", check=_lrs_problem,
                                  param="design.base_lrs", logged=lambda p: not p.tpe,
                                  shown=lambda study: ", ".join(f"{lr:g}" for lr in study.lrs()),
                                  also=Also("--lr-range", lr_range, type=float, nargs=2, metavar=("LOW", "HIGH"),
                                            help="base lrs on a log grid from LOW to HIGH, a factor 2 apart"))
    # The stability scan's budget after its warmup: at least scan_steps optimizer steps AND scan_examples examples
    # (small batches need data, large ones steps); never cut by the full run's length. None = no scan.
    scan_steps: int | None = knob(None, check=at_least(1), param="design.scan_steps",
                                  help="the stability scan's length after its warmup: at least this many optimizer "
                                       "steps")
    scan_examples: int = knob(0, check=at_least(0), param="design.scan_examples", logged=_scans,
                              help="... and at least this many examples (small batches need data to decide)")
    full_top: int = knob(2, check=at_least(1), param="design.full_top", logged=_scans,
                         help="full runs per cell at the best stable scan lrs")
    tpe: dict[str, tuple[float, float, bool]] | None = None  # hpo: name -> (low, high, log), searched with TPE
    trials: int = knob(0, param="design.trials", logged=lambda p: bool(p.tpe), help="TPE trials (hpo)",
                       check=lambda p, v: at_least(1)(p, v) if p.tpe is not None else None)
    target_acc: float | None = None  # batch_scaling: the accuracy whose steps-to-reach it counts


@dataclass
class Analysis:
    """What a study's analysis makes of its tables."""

    cells: Any  # a pyarrow Table: cells.parquet: one row per scientific cell
    text: str = ""  # its words, in summary.txt and printed
    figures: dict[str, Any] = field(default_factory=dict)  # file name -> matplotlib figure
    extra: dict[str, Any] = field(default_factory=dict)  # study-specific values returned to the caller


@dataclass
class Study:
    name: str
    preset: Preset
    fixed: TrainConfig
    seed: int = knob(0, param="study.seed", dest="study_seed",  # --seed: the study's, not a TrainConfig's
                     help="seed of the study: trial seeds are seed, seed+1, … (same seed, same numbers)")
    output: str = "results"
    tracking_uri: str = ""
    experiment: str | None = None
    # None: fitted to the cluster when the study runs (run.py); its param is the concurrency it ran at
    max_concurrent: int | None = knob(None, check=at_least(1), param="study.max_concurrent",
                                      help="trials at once (default: fits the cluster)")
    trial_retries: int = 2  # infrastructure failures (lost worker or node) retried per trial
    resume: bool = False
    allow_code_change: bool = False  # --resume under other numeric code (rows record their code_version)
    analyze: Callable[[Study, Any, Any], Analysis] | None = None  # (study, results, epochs); default: the frontier
    about: str = ""  # what the study is, in words (its script's docstring): the MLflow experiment's description
    script: str | None = None  # the study's script: MLflow's Source of its runs (default: the running program)

    def __post_init__(self):
        p = self.preset
        if not p.grid or any(not v for v in p.grid.values()):
            raise ValueError(f"study {self.name!r}: every scientific axis needs at least one value")
        for axis, values in p.grid.items():
            if len({json.dumps(v, sort_keys=True) for v in values}) < len(values):
                raise ValueError(f"{grid_flag(axis)} lists a value twice ({values}); list each once")
            if axis == "clip_threshold" and any(v is not None and not v > 0 for v in values):
                raise ValueError(f"study {self.name!r}: λ must be > 0 (use 'none' for no clipping), got {values}")
        knobs.refuse_bad(p)
        knobs.refuse_bad(self)
        if self.trial_retries < 0:
            raise ValueError(f"trial retries must be >= 0, got {self.trial_retries}")
        self.experiment = self.experiment or self.name

    def cells(self) -> list[Cell]:
        return Cell.grid(self.preset.grid)

    @property
    def study_dir(self) -> str:
        return storage.uri.join(self.output, self.name)

    def lrs(self) -> tuple[float, ...]:
        return self.preset.lrs or (self.fixed.base_lr,)

    def config(self, cell: Cell, **changes) -> TrainConfig:
        return self.fixed.replace(**cell.changes(), **changes)

    def table(self) -> storage.ResultsTable:
        return tables.open_table(storage.uri.join(self.study_dir, "results"))

    def record(self) -> dict[str, Any]:
        """What makes two runs the same study: compared on --resume."""
        return {"fixed": self.fixed.to_dict(), "seed": self.seed,
                "preset": json.loads(json.dumps(dataclasses.asdict(self.preset), default=str)),
                "tracking_uri": redact(self.tracking_uri), "code_version": code_version()}


def design_params(study: Study, concurrency: int) -> dict[str, str]:
    """The study run's MLflow params: its design (grid axes, lr design, budgets, seeds, TPE ranges) and the values
    it holds fixed — none that a cell, the lr design, TPE or the seeding sets per trial (those are each trial's
    own params)."""
    p = study.preset
    out: dict[str, str] = {}
    for axis, values in p.grid.items():
        out[f"grid.{public_name(axis)}"] = ", ".join(lambda_label(v) if axis == "clip_threshold" else
                                                     json.dumps(v) if isinstance(v, (dict, list)) else str(v)
                                                     for v in values)
    if p.tpe:
        out.update({f"tpe.{public_name(k)}": f"{lo:g} .. {hi:g}" + (" (log)" if log else "")
                    for k, (lo, hi, log) in p.tpe.items()})
    out.update(knobs.params(study, max_concurrent=concurrency))  # the design's knobs, then the study's
    varied = {"seed", "base_lr", *(p.tpe or {})}
    for cell in study.cells()[:1]:
        varied |= set(cell.changes())
    varied = {public_name(k) for k in varied}
    if varied & {"base_lr", "batch_size"}:
        varied.add("peak_lr")  # base_lr × batch / 256
    out.update({f"fixed.{k}": v for k, v in study.fixed.flat().items() if k.split(".")[0] not in varied})
    return out


# ---- the trials of each phase: plain data, a pure function of the study (and the scan's results) ----

PHASE_ORDER = ("scan", "refine", "replicate", "full", "tpe")
STUDY_ORDER = "!"  # the study run's `order` tag: before every trial's (theirs start with a digit or '~')


@dataclass(frozen=True)
class Spec:
    """One training run of the study: built once, on the driver; it reaches the loop as this TrainConfig."""

    phase: str
    cell: Cell
    config: TrainConfig = field(repr=False)
    key: str = ""  # the run's identity in the tables: phase + config fingerprint
    short: str = ""  # the cell's part of the run name; "" = the cell's short name (Cell.short)

    def __post_init__(self):
        if not self.key:
            object.__setattr__(self, "key", f"{self.phase}-{self.config.fingerprint()}")

    @property
    def label(self) -> str:
        """The run's name, what differs first: 'b1024 λ0.16 lr3.2 scan s0' (MLflow's run column is narrow; the
        verdict's mark goes in front once the run ends, runner.train_and_track). The lr with the 4 digits the
        tables and findings write (lr0.5657, not lr0.566): a name is found by the number a table gives."""
        return f"{self.short or self.cell.short} lr{self.config.base_lr:.4g} {self.phase} s{self.config.seed}"

    @property
    def order(self) -> str:
        """The run's MLflow `order` tag: its cell's values (in the grid's order), its base lr, phase and seed.
        Sorted by it, a study's runs table lists each cell together, its runs in lr order (a full run beside its
        scan)."""
        rank = PHASE_ORDER.index(self.phase) if self.phase in PHASE_ORDER else len(PHASE_ORDER)
        return " ".join([*self.cell.order, sortable(self.config.base_lr), str(rank), f"{self.config.seed:06d}"])

    def identity(self, study: str) -> dict[str, str]:
        """The row's identity columns (tables.IDENTITY): which study, run, phase and cell, the cell's axes typed."""
        return {"study": study, "trial_key": self.key, "phase": self.phase, "cell": self.cell.label,
                "axes": self.cell.column}


def steps_per_epoch(cfg: TrainConfig, n_train: int) -> int:
    return max(1, n_train // cfg.batch_size)


def scan_length(preset: Preset, batch_size: int) -> int:
    """Steps a scan runs after its warmup: at least scan_steps, and enough to see scan_examples examples."""
    return max(preset.scan_steps or 0, -(-preset.scan_examples // batch_size))


def scan_config(study: Study, full: TrainConfig, n_train: int) -> TrainConfig:
    """A scan of a full run's config: the full run's warmup (in steps), then its peak lr held for scan_length
    steps, so the scan reaches the lr it is labelled with; no evaluation, no checkpoints."""
    warmup = run_length(full, steps_per_epoch(full, n_train))[2]
    return full.replace(max_steps=warmup + scan_length(study.preset, full.batch_size), warmup_steps=warmup,
                        lr_schedule="constant", schedule_steps=None, eval_every_epochs=0,
                        checkpoint_every_epochs=0, checkpoint_every_minutes=0)


def scan_specs(study: Study, n_train: int) -> list[Spec]:
    if not study.preset.scan_steps:
        return []
    return [Spec("scan", cell, scan_config(study, study.config(cell, base_lr=lr, seed=study.seed + s), n_train))
            for cell in study.cells() for lr in study.lrs() for s in range(study.preset.seeds)]


def refine_specs(study: Study, scan_rows, n_train: int) -> list[Spec]:
    """One more scan lr per cell whose frontier lies inside the grid or below it, every seed: a pure function of
    the scan."""
    mid = frontier.refine_lrs(scan_rows)
    return [Spec("refine", cell, scan_config(study, study.config(cell, base_lr=mid[cell.label], seed=study.seed + s),
                                             n_train))
            for cell in study.cells() if cell.label in mid for s in range(study.preset.seeds)]


def replicate_seeds(study: Study) -> int:
    """Seeds per lr where the study replicates: the deciding lrs of a scan, and the full runs after a scan."""
    return max(study.preset.seeds, study.preset.replicates)


def replicate_specs(study: Study, rows, n_train: int) -> list[Spec]:
    """The next replication round: every deciding lr of every cell (frontier.replication_needed) at the seeds it
    lacks. [] once the frontier and its first failure rest on `replicates` seeds each. A pure function of the
    rows (the scan's, the refinement's and earlier rounds'): the same at any concurrency."""
    if not study.preset.scan_steps:
        return []
    need = frontier.replication_needed(rows, replicate_seeds(study))
    return [Spec("replicate", cell, scan_config(study, study.config(cell, base_lr=lr, seed=study.seed + s), n_train))
            for cell in study.cells() for lr, have in sorted(need.get(cell.label, {}).items())
            for s in range(replicate_seeds(study)) if study.seed + s not in have]


def full_specs(study: Study, scan_rows) -> list[Spec]:
    """Every lr of the design without a scan; else each cell's best lrs that train, and its frontier, each at
    every replicate seed (so that 'holds' and the accuracy rest on a majority and have a spread)."""
    chosen = frontier.full_phase_lrs(scan_rows, study.preset.full_top) if study.preset.scan_steps else None
    seeds = study.preset.seeds if chosen is None else replicate_seeds(study)
    out = []
    for cell in study.cells():
        lrs = study.lrs() if chosen is None else chosen.get(cell.label, [])
        out += [Spec("full", cell, study.config(cell, base_lr=lr, seed=study.seed + s))
                for lr in lrs for s in range(seeds)]
    return out


HANDFUL = 4  # fewer batches per epoch than this and an epoch budget means almost nothing


def budget_notes(study: Study, n_train: int) -> list[str]:
    """What the data and budgets cannot decide, said before the first trial (and in the summary)."""
    notes, seen = [], set()
    for cfg in sorted((study.config(cell) for cell in study.cells()), key=lambda c: c.batch_size):
        b, spe = cfg.batch_size, steps_per_epoch(cfg, n_train)
        total = run_length(cfg, spe)[0]
        if (b, total) in seen:
            continue
        seen.add((b, total))
        if spe < HANDFUL:
            notes.append(f"batch {b} gives {spe} step(s) per epoch of the {n_train} training images ({total} steps "
                         "in the full run): too few to learn from; use more data or smaller batches")
        elif study.preset.scan_steps and total < scan_length(study.preset, b):
            notes.append(f"at batch {b} the full run ({total} steps) is shorter than its scan "
                         f"({scan_length(study.preset, b)} steps after warmup): raise --epochs so the full run can "
                         "confirm the frontier")
    return notes


def group_specs(specs: list[Spec], size: int) -> list[list[Spec]]:
    """Consecutive runs of the same cell, `size` at a time (a Tune trial each: fewer, longer trials, as each costs
    a scheduling round); the costliest groups first (longest-processing-time order packs a phase's end)."""
    groups: list[list[Spec]] = []
    for s in specs:
        if groups and len(groups[-1]) < size and groups[-1][0].cell == s.cell:
            groups[-1].append(s)
        else:
            groups.append([s])
    return sorted(groups, key=lambda g: -sum(s.config.batch_size * (s.config.max_steps or 0) for s in g))

"""A grid study's phases as an explicit sequence (plain data, no Ray): scan → refine → replicate (in rounds) → full.

Each phase's runs are a pure function of the study and of the rows of the phases before it. The `Plan` computes a
phase once, at its boundary (every run handed out before has ended), from ONE read of the results table, and says
which of three things holds there:
  Step      the phase's runs that lack a row (and how many have one already): hand them out;
  Blocked   runs handed out before have no row (lost to infrastructure after their retries): the next phase
            cannot be computed yet; the study ends incomplete and --resume reruns them;
  FINISHED  every phase has run: nothing is left.
`complete` asks the same question of a finished table: is every phase's every run recorded?"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from studies.sweep.design import Spec, Study, full_specs, refine_specs, replicate_specs, scan_specs

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Phase:
    name: str
    specs: Callable[[Study, Rows, int], list[Spec]]  # (study, rows of the phases before, n_train) -> its runs
    rounds: bool = False  # asked again after each round until it has nothing left to run (replication)
    runs_per_trial: int = 1  # runs of one cell in a row per Tune trial (short runs: fewer scheduling rounds)


def _scan(study: Study, rows: Rows, n_train: int) -> list[Spec]:
    return scan_specs(study, n_train)


def _refine(study: Study, rows: Rows, n_train: int) -> list[Spec]:
    return refine_specs(study, rows, n_train) if study.preset.scan_steps else []


def _full(study: Study, rows: Rows, n_train: int) -> list[Spec]:
    return full_specs(study, rows)


SCAN_RUNS_PER_TRIAL = 4  # a stability run (scan, refine, replicate) lasts seconds: 4 in a row per trial
PHASES: tuple[Phase, ...] = (
    Phase("scan", _scan, runs_per_trial=SCAN_RUNS_PER_TRIAL),
    Phase("refine", _refine, runs_per_trial=SCAN_RUNS_PER_TRIAL),
    # replication rounds until every deciding lr has its seeds (replicate_specs gives [] then)
    Phase("replicate", replicate_specs, rounds=True, runs_per_trial=SCAN_RUNS_PER_TRIAL),
    Phase("full", _full),
)


@dataclass(frozen=True)
class Step:
    """A phase's runs to hand out now: those without a row; `done` of the phase's runs have one already."""
    phase: Phase
    todo: list[Spec]
    done: int = 0


@dataclass(frozen=True)
class Blocked:
    """Runs of `phase` handed out before lack a row: what comes next depends on them."""
    phase: str
    missing: list[Spec]


class _Finished:
    def __repr__(self) -> str:
        return "FINISHED"


FINISHED = _Finished()


def recorded(rows: Rows) -> set[str]:
    return {r["trial_key"] for r in rows}


@dataclass
class Plan:
    """Walks PHASES for one study: `next(rows)` at each boundary, rows read once by the caller."""

    study: Study
    n_train: int
    at: int = 0  # index into PHASES of the phase computed next
    handed: list[Spec] = field(default_factory=list)  # the runs of the last Step
    handed_phase: str = ""

    def next(self, rows: Rows) -> Step | Blocked | _Finished:
        done = recorded(rows)
        missing = [s for s in self.handed if s.key not in done]
        if missing:
            return Blocked(self.handed_phase, missing)
        while self.at < len(PHASES):
            phase = PHASES[self.at]
            specs = phase.specs(self.study, rows, self.n_train)
            todo = [s for s in specs if s.key not in done]
            if not (phase.rounds and todo):  # a phase of rounds stays until a round has nothing to run
                self.at += 1
            if todo:
                self.handed, self.handed_phase = todo, phase.name
                return Step(phase, todo, len(specs) - len(todo))
        return FINISHED


def complete(study: Study, rows: Rows, n_train: int) -> bool:
    """True when every run of every phase has its row (the phases recomputed from `rows`, one read)."""
    done = recorded(rows)
    return all(all(s.key in done for s in phase.specs(study, rows, n_train)) for phase in PHASES)

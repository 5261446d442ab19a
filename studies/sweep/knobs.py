"""A study's design knobs, each declared once: `knob(default, help=..., check=..., param=...)` on a field of Preset
(the design: seeds, replicates, best_k, the lr design, the scan's budget, full_top, TPE trials) or of Study (how it
runs: its seed, max_concurrent). From that one declaration come

  the flag     `--` + the field name with dashes (flags.flag: `scan_examples` → `--scan-examples`), its type and
               nargs from the field's type, its help; the value a given flag puts in the preset (or the study)
  the check    Study refuses a bad value in one line naming the flag: `--seeds must be >= 1, got 0`
  the param    the study run's MLflow param (design_params), when it applies to the study: `design.scan_examples`

as TrainConfig's `setting` gives each training setting its flag, check and place in the fingerprint. A field without
a knob (grid, fixed, tpe, target_acc) is set by the study script alone."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from studies.training.flags import flag

# (the preset or study, the value) -> what is wrong with it, worded to follow the flag; None = nothing is.
Check = Callable[[Any, Any], "str | None"]


@dataclass(frozen=True)
class Also:
    """A second flag that gives a knob's value another way (`--lr-range LOW HIGH` for `--lrs`); the knob's own flag
    wins when both are given. `read` makes the knob's value of the flag's, raising ValueError (one line, the fix)."""

    flag: str
    read: Callable[[Any], Any]
    help: str
    type: Callable[[str], Any] = str
    nargs: int | str | None = None
    metavar: str | tuple[str, ...] | None = None


@dataclass(frozen=True)
class Knob:
    help: str  # the flag's --help
    check: Check | None = None
    param: str | None = None  # the study run's MLflow param
    logged: Callable[[Any], bool] | None = None  # (preset or study) -> the param applies; default: the value is set
    shown: Callable[[Any], str] | None = None  # (study) -> the param's text; default: str(value)
    dest: str | None = None  # the args attribute, where the field's name is taken (--seed: a TrainConfig field's)
    also: Also | None = None


def knob(default: Any = dataclasses.MISSING, *, help: str, check: Check | None = None, param: str | None = None,
         logged: Callable[[Any], bool] | None = None, shown: Callable[[Any], str] | None = None,
         dest: str | None = None, also: Also | None = None):
    """A Preset or Study field that is a design knob: its flag, check and MLflow param, declared once."""
    return dataclasses.field(default=default, metadata={"knob": Knob(help, check, param, logged, shown, dest, also)})


def at_least(lo: int, note: str = "") -> Check:
    """Refuses a value below `lo`; None (where a field allows it: unset) passes."""
    return lambda owner, v: None if v is None or v >= lo else f"must be >= {lo}{note}, got {v}"


def declared(cls) -> Iterator[tuple[str, Knob]]:
    """(field name, Knob) of every knob of a Preset or Study class, in field order."""
    for f in dataclasses.fields(cls):
        if "knob" in f.metadata:
            yield f.name, f.metadata["knob"]


def _flag_type(cls, name: str) -> tuple[Callable[[str], Any], str | None]:
    """How one value is read (int, float, …) and nargs ('+' for a tuple field), from the field's type."""
    tp = typing.get_type_hints(cls)[name]
    if isinstance(tp, types.UnionType):  # `int | None`: the optional is the unset default
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) in (tuple, list):
        return typing.get_args(tp)[0], "+"
    return tp, None


def add_flags(group, *classes) -> None:
    """Every knob of each class as a flag (default None: not given, the preset's or the study's value stays)."""
    for cls in classes:
        for name, k in declared(cls):
            conv, nargs = _flag_type(cls, name)
            group.add_argument(flag(name), dest=k.dest or name, type=conv, nargs=nargs, default=None, help=k.help)
            if k.also:
                a = k.also
                group.add_argument(a.flag, type=a.type, nargs=a.nargs, default=None, metavar=a.metavar, help=a.help)


def given(cls, args: argparse.Namespace) -> dict[str, Any]:
    """The knobs of `cls` the command line gives, field name → value (ValueError from an `Also` flag's read)."""
    out = {}
    for name, k in declared(cls):
        v = getattr(args, k.dest or name, None)
        if v is None and k.also and getattr(args, _dest(k.also.flag), None) is not None:
            v = k.also.read(getattr(args, _dest(k.also.flag)))
        if v is not None:
            out[name] = tuple(v) if isinstance(v, list) else v
    return out


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def refuse_bad(owner) -> None:
    """Raises ValueError naming the flag of the first knob of a Preset or Study whose value its check refuses."""
    for name, k in declared(type(owner)):
        problem = k.check(owner, getattr(owner, name)) if k.check else None
        if problem:
            raise ValueError(f"{flag(name)} {problem}")


def params(study, **resolved) -> dict[str, str]:
    """The MLflow params of the knobs of a study (its preset's, then its own) that have one and apply to it.
    `resolved`: a knob's value as the run settled it (max_concurrent: the concurrency fitted to the cluster)."""
    out = {}
    for owner in (study.preset, study):
        for name, k in declared(type(owner)):
            value = resolved.get(name, getattr(owner, name))
            if k.param and (k.logged(owner) if k.logged else value is not None):
                out[k.param] = k.shown(study) if k.shown else str(value)
    return out

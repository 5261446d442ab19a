"""TrainConfig <-> command-line flags. The one rule that spells a field as a flag: `--` + the field name with
dashes (`batch_size` → `--batch-size`), except λ, which the command line calls `--lambda` (`clip_threshold` is
its field). A study's grid axis is the plural (`--batch-sizes`, `--lambdas`). Help text and defaults come from
the field itself (config.py)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing

from studies.training.config import PUBLIC_NAMES, ConfigError, TrainConfig, parse_lambda, public_name


def flag(name: str) -> str:
    """The flag of a TrainConfig field (or of a study's own axis such as 'variant')."""
    return "--" + public_name(name).replace("_", "-")


def flag_message(e: ConfigError) -> str:
    """A refused TrainConfig as the command line says it: the setting at fault named by its flag
    ('--momentum must be in [0, 1), got 1.0'); the field name stays where no single field is at fault."""
    if e.field and e.detail.startswith(e.field):
        return flag(e.field) + e.detail[len(e.field):]
    return str(e)


def grid_flag(axis: str) -> str:
    """The flag that lists a grid axis's values: the plural of the field's flag."""
    return flag(axis) + "s"


def _base_type(tp):
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) or tp


def parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def parse_json_dict(s: str) -> dict:
    def finite_only(c: str):  # json.loads takes NaN / Infinity, which would pass every bound unchecked
        raise argparse.ArgumentTypeError(f"{c} is not a number this setting can hold: {s!r}")

    try:
        d = json.loads(s, parse_constant=finite_only)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {s!r}") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return d


def parser_of(name: str):
    """How one value of a field is read from the command line."""
    if name == "clip_threshold":
        return parse_lambda  # 'none' = no clipping
    tp = _base_type(typing.get_type_hints(TrainConfig)[name])
    return {bool: parse_bool, dict: parse_json_dict}.get(tp, tp)


def _not_finite(c: str):
    raise ValueError(f"{c} is not a number a setting can hold")


def field_of(name: str) -> str:
    """A TrainConfig field from how a user may spell it: 'augment-strength', '--augment-strength', 'lambda'."""
    name = name.strip().lstrip("-").replace("-", "_")
    return {v: k for k, v in PUBLIC_NAMES.items()}.get(name, name)


def parse_grid_axis(text: str) -> tuple[str, list]:
    """`--grid FIELD=V1,V2,…` → (field, values): any TrainConfig field as a scientific axis of a grid study, its
    values read as its flag reads one (λ: 'none' = no clipping; a dict field: JSON objects, comma-separated).
    Raises ValueError with one line naming the problem and the fix."""
    given = f"--grid {text}"
    name, sep, values = text.partition("=")
    field = field_of(name)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if not sep or not name.strip() or not values.strip():
        raise ValueError(f"{given}: write FIELD=V1,V2,… e.g. --grid augment_strength=0,0.5,1")
    if field not in fields:
        raise ValueError(f"{given}: {name.strip()!r} is not a training setting; use a TrainConfig field, e.g. "
                         "augment_strength, weight_decay, model (the training flags in --help, without '--')")
    if fields[field].metadata.get("placement"):
        raise ValueError(f"{given}: {field} says where a run goes, not what it computes, so its cells would be the "
                         f"same runs; set it once with {flag(field)}")
    conv = parser_of(field)
    try:
        if conv is parse_json_dict:  # JSON objects hold commas: read the list as JSON
            vals = [parse_json_dict(json.dumps(v)) for v in json.loads(f"[{values}]", parse_constant=_not_finite)]
        else:
            vals = [conv(v.strip()) for v in values.split(",")]
    except (ValueError, json.JSONDecodeError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"{given}: not values of {field} ({e}); e.g. --grid augment_strength=0,0.5,1") from None
    if len({json.dumps(v, sort_keys=True) for v in vals}) < len(vals):
        raise ValueError(f"{given}: lists a value twice; list each once")
    return field, vals


def add_train_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Every TrainConfig field as a flag; an unset flag leaves no attribute (the preset's or the field's default
    applies), so a value that parses to None (`--lambda none`) is still a value given."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("training (TrainConfig)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        default = f" (default: {f.default})" if f.default is not dataclasses.MISSING else ""
        group.add_argument(flag(f.name), dest=f.name, type=parser_of(f.name), default=argparse.SUPPRESS,
                           metavar=_base_type(hints[f.name]).__name__.upper(), help=f.metadata["help"] + default)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line. `--lambda none` means no clipping, as in `--lambdas`."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {k: v for k, v in vars(args).items() if k in names}
    if "clip_threshold" in out and out["clip_threshold"] is None:
        out.setdefault("clipping", "none")
    return out

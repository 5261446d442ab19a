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

from studies.training.config import ConfigError, TrainConfig, parse_lambda, public_name


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

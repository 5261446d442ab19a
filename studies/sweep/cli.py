"""The study scripts' shared command line: preset → flags → Study → run_study → console summary, and its exit
codes (2: refused before any trial, with one line naming the fix; the scripts exit 130 when interrupted). Each
design knob's flag comes from its declaration on Preset or Study (knobs.py). Every TrainConfig field is a flag too
(training/flags.py); one a study sets itself is refused, with why."""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import traceback
from pathlib import Path
from typing import Any

import storage
from studies.sweep import knobs
from studies.sweep.cells import VARIANTS, Cell
from studies.sweep.design import Preset, Study
from studies.sweep.run import run_study
from studies.training import runner
from studies.training.config import PROJECT_DIR, ConfigError, TrainConfig, public_name
from studies.training.flags import (
    add_train_args,
    flag,
    flag_message,
    grid_flag,
    overrides_from_args,
    parse_grid_axis,
)
from studies.training.tracking import redact, resolve_tracking_uri

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # fullmatch: '$' would also match before a trailing newline


def add_study_args(p: argparse.ArgumentParser, preset_names, grid_flags: dict[str, tuple[Any, str]]) -> None:
    g = p.add_argument_group("study")
    g.add_argument("--preset", default="laptop", choices=preset_names, help="preset of fixed and grid values")
    g.add_argument("--smoke-test", action="store_true", help="tiny model, one trial, a few steps")
    g.add_argument("--name", default=None, help="study name (MLflow experiment and output folder): letters, "
                                                 "digits, '_', '-', '.'")
    g.add_argument("--output", default=None,
                   help="where results go: local path, s3://, gs:// (default <project>/results)")
    g.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                                                        "sqlite:///<project>/mlflow.db)")
    knobs.add_flags(g, Study, Preset)  # the design's knobs (--seeds, --lrs, --scan-steps …): knobs.py
    g.add_argument("--resume", action="store_true", help="continue an interrupted study (same flags)")
    g.add_argument("--dry-run", action="store_true",
                   help="print every phase's runs (count, or the most there can be; steps and examples each) and the "
                        "time they would take here, then stop: nothing is written")
    g.add_argument("--allow-code-change", action="store_true",
                   help="with --resume: continue under other code than the study started with (refused otherwise; "
                        "each row records its code_version)")
    g = p.add_argument_group("grid (scientific parameters)")
    for axis, (conv, hlp) in grid_flags.items():
        g.add_argument(grid_flag(axis), dest=f"grid_{axis}", type=conv, nargs="+", default=None, help=hlp)
    g.add_argument("--grid", dest="grid_axes", action="append", default=None, metavar="FIELD=V1,V2,...",
                   help="one more scientific axis: any training setting (a TrainConfig field) and its values, e.g. "
                        "--grid augment_strength=0,0.5,1; repeat for more. A cell is one combination of every "
                        "axis: the tables and figures get a map (table, panel row) per value of a third axis")


def owned_fields(preset, grid_axes, grid_flags=None) -> dict[str, str]:
    """TrainConfig fields the study sets itself, with why: a flag for one would do nothing, so it is refused.
    `grid_flags`: the study's own axis flags (an axis without one came from --grid)."""
    owned = {"seed": "the study seeds each trial (use --seed)"}
    if preset.tpe:
        owned.update({k: "searched by TPE" for k in preset.tpe})
    else:
        owned["base_lr"] = "the lr design sets it per trial (use --lrs or --lr-range)"
    for axis in grid_axes:  # every field a cell of this axis sets (λ also sets clipping; a variant, the model)
        given = grid_flag(axis) if grid_flags is None or axis in grid_flags else f"--grid {public_name(axis)}=…"
        for k in Cell(((axis, preset.grid[axis][0]),)).changes():
            owned[k] = f"a grid axis (use {given})" if k == axis else f"set by {given}"
    return owned


def grid_axes(args: argparse.Namespace, preset: Preset, grid_flags) -> dict[str, list[Any]]:
    """The study's scientific axes: the preset's, each replaced by its own flag (--batch-sizes …), then every
    --grid FIELD=V1,V2 (a new axis, or one of the preset's replaced). A field the study sets itself (seed, the lr
    design, a TPE range) or given twice is refused."""
    grid = {axis: getattr(args, f"grid_{axis}", None) or preset.grid[axis] for axis in grid_flags}
    given = {axis for axis in grid_flags if getattr(args, f"grid_{axis}", None)}  # by their own flags
    owned = owned_fields(preset, [])
    for text in args.grid_axes or []:
        axis, values = parse_grid_axis(text)
        if axis in owned:
            raise ValueError(f"--grid {text}: {axis} cannot be a grid axis here ({owned[axis]}); remove it")
        if axis in given:
            raise ValueError(f"--grid {text}: {axis} is given twice; give its values once")
        given.add(axis)
        grid[axis] = values
    if preset.tpe and len(list(itertools.product(*grid.values()))) > 1:
        raise ValueError("a TPE search runs in one cell; give each grid axis one value (or use a grid study)")
    return grid


def build_study(name: str, presets: dict[str, Preset], args: argparse.Namespace, grid_flags, analyze=None,
                about: str = "") -> Study:
    preset = presets["smoke" if args.smoke_test else args.preset]
    overrides = overrides_from_args(args)
    grid = grid_axes(args, preset, grid_flags)
    owned = owned_fields(dataclasses.replace(preset, grid=grid), grid, grid_flags)
    bad = [k for k in overrides if k in owned]
    if bad:
        raise ValueError(f"{flag(bad[0])} does nothing in this study: {bad[0]} is {owned[bad[0]]}; remove it")
    study_name = args.name or name
    if not NAME.fullmatch(study_name):
        raise ValueError(f"--name {study_name!r}: use letters, digits, '_', '-' and '.' only (it names an MLflow "
                         "experiment, a folder and a filter)")
    preset = dataclasses.replace(preset, grid=grid, **knobs.given(Preset, args))
    output = args.output or runner.default_storage_path()
    storage.resolve(output)  # refuses 's3:/bucket' (one slash), which would otherwise become a local folder 's3:'
    if "://" not in output:
        output = str(Path(output).resolve())
    try:
        fixed = TrainConfig(**{**preset.fixed, **overrides})
    except ConfigError as e:
        raise ValueError(flag_message(e)) from None
    for axis, values in grid.items():  # every value of every axis makes a valid config, before anything is written
        for v in values if axis != "clip_threshold" else ():  # λ: Study says 'use none for no clipping'
            if axis == "variant" and v not in VARIANTS:
                raise ValueError(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
            try:
                fixed.replace(**Cell(((axis, v),)).changes())
            except ConfigError as e:
                raise ValueError(f"{grid_flag(axis) if axis in grid_flags else '--grid ' + public_name(axis)}: "
                                 f"{e.detail if e.field == axis else flag_message(e)}") from None
    return Study(
        name=study_name, preset=preset, fixed=fixed, **knobs.given(Study, args), output=output,
        tracking_uri=resolve_tracking_uri(args.tracking_uri), resume=args.resume,
        allow_code_change=args.allow_code_change, analyze=analyze, about=about,
        script=str(PROJECT_DIR / "studies" / f"{name}.py"))


def run_study_cli(name: str, presets: dict, argv: list[str] | None, doc: str,
                  grid_flags: dict[str, tuple[Any, str]], analyze=None) -> dict[str, Any]:
    """`grid_flags` maps a scientific axis to (value parser, help); each becomes --<axis>s V [V ...]."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, list(presets), grid_flags)
    add_train_args(p, skip=("seed",))  # --seed is the study's
    args = p.parse_args(argv)
    try:
        study = build_study(name, presets, args, grid_flags, analyze, about=doc or "")
    except ValueError as e:
        p.error(str(e))
    pr = study.preset
    scan = f"≥ {pr.scan_steps} steps" + (f" and ≥ {pr.scan_examples} examples" if pr.scan_examples else "")
    rep = f", its deciding lrs replicated to {pr.replicates} seeds" if pr.replicates > 1 else ""
    phases = f"scan {scan} × {len(study.lrs())} lrs, refined once{rep}, then full runs at the best {pr.full_top} " \
        "and the frontier" \
        if pr.scan_steps else f"{pr.trials} TPE trials" if pr.tpe else f"{len(study.lrs())} lr(s) in full"
    print(f"study {study.name}: {len(study.cells())} cells; {phases}; {pr.seeds} seed(s); output {study.study_dir};"
          f" MLflow {redact(study.tracking_uri)}", flush=True)
    if args.dry_run:
        from studies.sweep.dry_run import dry_run

        try:
            print(dry_run(study), flush=True)
        except (ValueError, storage.StorageError, RuntimeError) as e:
            p.error(str(e))
        return {"complete": True, "dry_run": True}
    try:
        out = run_study(study)
    except (ValueError, ConnectionError, PermissionError, FileNotFoundError, RuntimeError) as e:
        err, line = e, f"{type(e).__name__ + ': ' if isinstance(e, OSError) else ''}{e}"
    except OSError as e:  # no space, read-only, outside storage's own writes (a full temp folder): one line too
        full = storage.uri.refused_write(e, e.filename or "a file")
        if full is None:
            raise
        err, line = e, f"{full}, then rerun (with --resume if the study had begun)"
    else:
        print(out["summary"], flush=True)
        return out
    if os.environ.get("NFNET_LAB_TRACEBACK") == "1":  # for whoever debugs the platform, not for users
        traceback.print_exception(err)
    p.exit(2, f"{p.prog}: error: {line}\n")

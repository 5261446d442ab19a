"""What a training run says about itself on its MLflow page: a description (MLflow's note) whose first line is its
verdict and the reason in numbers, then its learning rate (base and peak named as such), its phase and what its
charts show; a short `reason` tag for the runs table; and the params that took effect. Pure functions of the config, the
summary and the run's tags. (A study's trials also carry an `order` tag, from the sweep: design.Spec.order.)"""
from __future__ import annotations

import math
from typing import Any

from studies.training.config import TrainConfig
from studies.training.summary import RunSummary
from studies.training.tracking import MARKS
from studies.training.verdict import NOISE_Z, RELATIVE_MARGIN, margin

# What each phase of a study is, as a trial's description says it (studies/sweep/design.py makes them).
PHASES = {
    "scan": "a short run at a constant lr (the full run's warmup, then the lr it is named after, held), without "
            "evaluation: does this lr train in this cell?",
    "refine": "one more scan, at the midpoint between the cell's frontier and the first lr that failed",
    "replicate": "a scan at another seed, at an lr that decides the cell (its best lr, its frontier or the first "
                 "lr that fails)",
    "full": "the whole budget (warmup, cosine decay, evaluation every epoch) at one of the cell's best lrs or at "
            "its frontier",
    "tpe": "a trial of the TPE search",
}


def _g(v: float | None) -> str:
    return "?" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _needed(s: RunSummary) -> tuple[float, str]:
    """The margin that counts as moving (verdict.margin) and what sets it, in words."""
    s0, se = s.initial_train_loss, s.final_train_loss_se
    rel, noise = RELATIVE_MARGIN * abs(s0), NOISE_Z * (se if _finite(se) else 0.0)
    why = (f"{RELATIVE_MARGIN:.0%} of the start" if rel >= noise else
           f"{NOISE_Z:g} standard errors of the final loss, larger than {RELATIVE_MARGIN:.0%} of the start "
           f"({_g(rel)})")
    return margin(s0, se), why


def reason(s: RunSummary) -> str:
    """The verdict's reason in a few characters, for the runs table: '2.303→2.181 fell 0.122 > 0.115'."""
    v = s.verdict or s.status
    if v == "diverged":
        return f"step {s.diverged_step}: {s.diverged_reason or 'non-finite loss'}"
    if s.status == "failed":
        return (s.error or "failed")[:80]
    if not (_finite(s.initial_train_loss) and _finite(s.final_train_loss)):
        return s.status
    m, _ = _needed(s)
    fell = s.initial_train_loss - s.final_train_loss
    move = f"fell {_g(fell)}" if fell >= 0 else f"rose {_g(-fell)}"
    return f"{_g(s.initial_train_loss)}→{_g(s.final_train_loss)} {move} {'>' if fell > m else '<'} {_g(m)}"


def verdict_line(cfg: TrainConfig, s: RunSummary) -> str:
    """The description's first line: the verdict, and the numbers that decided it."""
    v = s.verdict or s.status
    head = f"**{MARKS[v]} {v}**" if v in MARKS else f"**{v}**"
    if v == "diverged":
        of = f" of {cfg.max_steps}" if cfg.max_steps else ""
        return (f"{head} at step {s.diverged_step}{of}: {s.diverged_reason or 'non-finite loss'} (a run diverges "
                f"when its loss passes {cfg.divergence_factor:g}× the first step's or is not finite). A result, not "
                "an error: MLflow shows the run Finished.")
    if s.status == "failed":
        return f"{head}: {s.error or 'no error recorded'} (a bad config or data; see traceback.txt)."
    if s.status == "stopped" or not (_finite(s.initial_train_loss) and _finite(s.final_train_loss)):
        return f"{head}: the run ended before it could be judged ({s.steps} steps)."
    m, why = _needed(s)
    s0, s1 = s.initial_train_loss, s.final_train_loss
    fell = s0 - s1
    se = f" ± {_g(s.final_train_loss_se)}" if _finite(s.final_train_loss_se) else ""
    start_end = (f"training loss {_g(s0)} at the start (the first step, before any update) → {_g(s1)}{se} at the "
                 f"end (mean of the last tenth of the steps)")
    bar = f"the {_g(m)} that counts as learning ({why})"
    if v == "trained":
        return f"{head}: {start_end}: it fell {_g(fell)}, more than {bar}."
    moved = f"it fell only {_g(fell)}" if fell >= 0 else f"it rose {_g(-fell)}"
    line = f"{head}: {start_end}: {moved}, not more than {bar}."
    low, high = getattr(s, "lowest_train_loss", None), getattr(s, "highest_train_loss", None)
    if v == "collapsed" and _finite(low) and _finite(high):
        line += (f" Its curve left its start (a tenth of its steps averaged between {_g(low)} and {_g(high)}): an "
                 "instability that stayed finite, not an lr too small.")
    return line


def lr_line(cfg: TrainConfig) -> str:
    steps = cfg.warmup_steps
    warmup = (f"climbs to it over {steps} warmup steps" if steps else "starts at it" if steps == 0 else
              f"climbs to it over {cfg.warmup_epochs:g} warmup epoch{'s' if cfg.warmup_epochs != 1 else ''}")
    then = "held" if cfg.lr_schedule == "constant" else "decayed to 0 on a cosine"
    return (f"Learning rate: **base lr {_g(cfg.base_lr)}** per 256 examples (param `base_lr`, the `lr` of the "
            f"run's name) × batch {cfg.batch_size} / 256 = **peak lr {_g(cfg.lr)}** (param `peak_lr`): the "
            f"`opt/lr` chart {warmup}, then it is {then}.")


def note(cfg: TrainConfig, s: RunSummary, tags: dict[str, Any] | None = None) -> str:
    """The run's MLflow description (Markdown)."""
    tags = tags or {}
    lines = [verdict_line(cfg, s), "", lr_line(cfg), ""]
    phase = tags.get("phase")
    if phase in PHASES:
        lines += [f"Phase `{phase}`: {PHASES[phase]}" + ("" if PHASES[phase].endswith("?") else "."), ""]
    what = [f"batch {cfg.batch_size}", f"λ {cfg.lambda_label}" if cfg.clipping == "agc" else
            f"clipping {cfg.clipping}" + (f" {cfg.clip_threshold:g}" if cfg.clip_threshold else ""),
            f"seed {cfg.seed}", f"{s.steps} steps ({s.epochs} epoch{'' if s.epochs == 1 else 's'})"]
    lines += ["Run: " + ", ".join(what) + (f"; cell `{tags['cell']}`" if tags.get("cell") else "") + ".", ""]
    if _finite(s.best_val_acc):
        lines += [f"Validation top-1: best {_g(s.best_val_acc)}, final {_g(s.final_val_acc)}.", ""]
    lines += [f"Charts: `loss/train` is the mean per epoch (a diverging epoch's up to its divergence), "
              f"`loss/train_step` every {cfg.log_every_steps} steps; the verdict reads every step's loss "
              "(`final_metrics.json`). Status: the verdict is this run's result; MLflow's Finished says only that "
              "it ran to one (Failed: an error, Killed: stopped)."]
    return "\n".join(lines)


OVERRIDDEN = {"warmup_steps": "warmup_epochs", "max_steps": "epochs"}  # set -> the field it replaces


def effective_params(cfg: TrainConfig) -> dict[str, str]:
    """MLflow params: cfg.flat() without the settings that did not take effect (warmup_epochs when warmup_steps is
    set, epochs when max_steps is, gpus_per_worker without GPUs)."""
    out = cfg.flat()
    for given, replaced in OVERRIDDEN.items():
        if getattr(cfg, given) is not None:
            out.pop(replaced, None)
    if not cfg.use_gpu:
        out.pop("gpus_per_worker", None)
    return out


def describe(tracker, cfg: TrainConfig, s: RunSummary, tags: dict[str, Any] | None = None) -> None:
    """The run's description and `reason` tag, set when it ends."""
    tracker.set_tags({"mlflow.note.content": note(cfg, s, tags)[:7990], "reason": reason(s)[:250]})

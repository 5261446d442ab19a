"""--dry-run: what a study would run, phase by phase, and about how long that takes here; it writes nothing (no
output folder, no MLflow run, no data prepared, no Ray started).

The scan's runs are known exactly; the later phases depend on what the scan finds, so they are given as the most
they can be (refine: one lr per cell; replication: the ≤ 3 deciding lrs of a cell at the seeds they lack, more only
if a round moves the frontier; full: the best `full_top` lrs and the frontier at every replicate seed).

The time is measured, not guessed: a few optimizer steps of the study's own model at each batch size, on random
images of the data's size, with the threads, precision and memory format a trial uses; × each run's steps, its
evaluation passes and a per-run cost (MLflow run, model build, row write), packed over the trials that run at
once. Loader time is left out: the built-in data is resident, a streamed dataset adds its read time."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from studies.sweep import cluster
from studies.sweep.design import Study, budget_notes, replicate_seeds, scan_config, scan_specs, steps_per_epoch
from studies.training.config import TrainConfig
from studies.training.schedule import run_length

# Per run, besides its steps: the MLflow run, the model build, the results row and Tune's hand-over of the next
# run. Measured on the laptop study (2 cores): wall time of a scan trial's 4 runs minus 4 × (steps × step time).
RUN_OVERHEAD_S = 1.5
# Per study, outside its runs: Ray's start, the data's preparation, the MLflow runs, the report and its figures.
# Measured: a 2-cell laptop study (37 runs) took 385 s from the command, 354 s of them its phases.
STUDY_OVERHEAD_S = 30.0
EVAL_COST = 0.35  # an evaluation pass per example ≈ a forward pass ≈ this fraction of a training step's


@dataclass(frozen=True)
class Runs:
    """Runs of one phase with one kind of step (batch size, model, clipping): how many (the most there can be
    unless the phase is exact) and each one's size."""
    config: TrainConfig  # one of them: what a step costs
    count: int
    steps: int  # optimizer steps of each run
    eval_examples: int = 0  # validation images each run evaluates, over all its epochs

    @property
    def batch_size(self) -> int:
        return self.config.batch_size


def step_kind(cfg: TrainConfig) -> tuple:
    """What a step's time depends on: runs of the same kind are timed once."""
    return (cfg.batch_size, cfg.model, repr(sorted(cfg.model_overrides.items())), cfg.clipping, cfg.precision,
            cfg.channels_last, cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu, cfg.image_size)


@dataclass(frozen=True)
class PhaseBound:
    phase: str
    runs: list[Runs]
    exact: bool
    note: str = ""

    @property
    def count(self) -> int:
        return sum(r.count for r in self.runs)

    @property
    def examples(self) -> int:
        return sum(r.count * r.steps * r.batch_size for r in self.runs)


@dataclass(frozen=True)
class DataSize:
    n_train: int
    n_val: int
    image_size: int
    num_classes: int


def _by_batch(configs: list[TrainConfig], per_run: int = 1, eval_examples=lambda cfg: 0) -> list[Runs]:
    out: dict[tuple, Runs] = {}
    for cfg in configs:
        have = out.get(step_kind(cfg))
        out[step_kind(cfg)] = Runs(cfg, (have.count if have else 0) + per_run,
                                   max(cfg.max_steps or 0, have.steps if have else 0), eval_examples(cfg))
    return sorted(out.values(), key=lambda r: step_kind(r.config))


def phase_bounds(study: Study, data: DataSize) -> list[PhaseBound]:
    """Every phase's runs (exact for the scan and a study without one; else the most there can be): pure."""
    p, n = study.preset, data.n_train

    def full(cfg: TrainConfig) -> TrainConfig:
        return cfg.replace(max_steps=run_length(cfg, steps_per_epoch(cfg, n))[0])

    def evals(cfg: TrainConfig) -> int:
        epochs = math.ceil(cfg.max_steps / steps_per_epoch(cfg, n))
        return 0 if not cfg.eval_every_epochs else epochs // cfg.eval_every_epochs * data.n_val

    cells = [study.config(c) for c in study.cells()]
    if p.tpe:
        return [PhaseBound("tpe", _by_batch([full(c) for c in cells], p.trials, evals), True)]
    if not p.scan_steps:
        return [PhaseBound("full", _by_batch([full(c) for c in cells], len(study.lrs()) * p.seeds, evals), True)]
    scans = [scan_config(study, c, n) for c in cells]
    more = replicate_seeds(study) - p.seeds
    out = [PhaseBound("scan", _by_batch([s.config for s in scan_specs(study, n)]), True),
           PhaseBound("refine", _by_batch(scans, p.seeds), False, "one lr per cell whose frontier is inside the grid")]
    if more:
        every = (len(study.lrs()) + 1) * more * len(cells)
        out.append(PhaseBound("replicate", _by_batch(scans, 3 * more), False,
                              f"first round: ≤ 3 deciding lrs per cell × {more} more seeds; up to {every} runs if "
                              "rounds move the frontier"))
    out.append(PhaseBound("full", _by_batch([full(c) for c in cells], (p.full_top + 1) * replicate_seeds(study),
                                            evals), False,
                          f"the best {p.full_top} lr(s) and the frontier per cell, {replicate_seeds(study)} seed(s) "
                          "each; none in a cell without a frontier"))
    return out


def data_size(cfg: TrainConfig) -> DataSize:
    """The data's size without preparing it: the built-in source's own parameters, CIFAR's fixed splits, an image
    folder's listing, or an existing shard set's manifest."""
    import storage
    from storage import sources

    params = dict(cfg.dataset_params)
    if cfg.dataset == "synthetic":
        return DataSize(params.get("n_train", 20000), params.get("n_val", 5000), params.get("image_size", 32),
                        params.get("num_classes", 10))
    if cfg.dataset in ("cifar10", "cifar100"):
        return DataSize(50000, 10000, cfg.image_size or 32, 100 if cfg.dataset == "cifar100" else 10)
    if cfg.dataset == "imagefolder":
        listing = sources.list_imagefolder(params.get("path"), params.get("seed", 0),
                                           **({"val_fraction": params["val_fraction"]}
                                              if "val_fraction" in params else {}))
        return DataSize(len(listing.splits["train"]), len(listing.splits["val"]), cfg.image_size or 224,
                        len(listing.classes))
    man = storage.open_dataset(cfg.dataset).manifest
    return DataSize(man.splits["train"], man.splits.get("val", 0), cfg.image_size or (man.image_shape or (32,))[-1],
                    man.num_classes)


def step_seconds(cfg: TrainConfig, data: DataSize, steps: int = 3) -> float:
    """Seconds per optimizer step of `cfg` here, as a trial runs it (its threads, precision, memory format, AGC):
    the median of `steps` timed steps after one warm-up step, on random images."""
    import statistics

    import torch

    import nfnet
    from studies.training import loop

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    try:
        torch.manual_seed(0)
        device = torch.device("cuda" if cfg.use_gpu else "cpu")
        model = nfnet.create_model(cfg.model, num_classes=data.num_classes, **cfg.model_overrides).to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        params = [q for q in model.parameters() if q.requires_grad]
        agc = nfnet.agc_parameters(model) if cfg.clipping == "agc" else None
        opt = loop.optimizer(model, cfg, device)  # the trial's own SGD
        for g in opt.param_groups:
            g["lr"] = 0.0  # only the time matters here
        images = torch.randint(0, 256, (cfg.local_batch_size, 3, data.image_size, data.image_size),
                               dtype=torch.uint8, device=device)
        labels = torch.arange(len(images), device=device) % data.num_classes
        augment = nfnet.Augment(cfg.augment_strength, data.num_classes, image_size=cfg.image_size).to(device)
        gen = torch.Generator().manual_seed(0)

        def amp():
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

        times = []
        for _ in range(steps + 1):  # as the loop's step: augmentation, memory format, forward, backward, AGC, SGD
            t = time.perf_counter()
            x, y_soft = augment(images, labels, generator=gen)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loop.train_step(model, opt, x, y_soft, cfg, amp, params, agc, measure_gns=False, world_size=1,
                            want_metrics=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])
    finally:
        torch.set_num_threads(threads)


PIXELS_TIMED = 1024 * 16 * 16  # the most images × pixels timed per step; a bigger batch is timed in part, × its share


def concurrency_here(study: Study) -> tuple[int, str]:
    """Trials at once as a study started here would run them (its --max-concurrent, or what fits this machine)."""
    import torch

    cpus, gpus = cluster.usable_cores(), torch.cuda.device_count()
    if study.max_concurrent:
        return study.max_concurrent, "--max-concurrent"
    n = cluster.cluster_concurrency(study.fixed, {"CPU": cpus, "GPU": gpus})
    where = f"this machine: {cpus} CPUs" + (f", {gpus} GPUs" if gpus else "")
    if os.environ.get("RAY_ADDRESS"):
        where += "; the cluster at RAY_ADDRESS is not asked in a dry run: give --max-concurrent N for its N"
    return n, where


def timed_steps(bounds: list[PhaseBound], data: DataSize) -> dict[tuple, float]:
    """Seconds per step of every kind of step the study runs (step_seconds, part of a big batch × its share)."""
    out: dict[tuple, float] = {}
    for b in bounds:
        for r in b.runs:
            key = step_kind(r.config)
            if key not in out:
                part = max(1, min(r.config.local_batch_size, PIXELS_TIMED // data.image_size ** 2))
                timed = r.config.replace(batch_size=part * r.config.num_workers)
                out[key] = step_seconds(timed, data) * r.config.local_batch_size / part
    return out


def run_seconds(r: Runs, step_s: float) -> float:
    return r.steps * step_s + r.eval_examples / r.batch_size * step_s * EVAL_COST + RUN_OVERHEAD_S


def phase_seconds(b: PhaseBound, steps: dict[tuple, float], concurrency: int) -> float:
    """The phase's runs packed over `concurrency` trials at once (never less than its longest run)."""
    each = [run_seconds(r, steps[step_kind(r.config)]) for r in b.runs]
    return max([sum(t * r.count for t, r in zip(each, b.runs)) / concurrency, *each]) if each else 0.0


def _minutes(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


def _steps_text(runs: list[Runs]) -> str:
    seen: dict[int, int] = {}
    for r in runs:
        seen[r.batch_size] = max(r.steps, seen.get(r.batch_size, 0))
    return " · ".join(f"b{b} {n}" for b, n in sorted(seen.items()))


def render(study: Study, bounds: list[PhaseBound], seconds: list[float] | None, concurrency: int, where: str,
           steps: dict[tuple, float] | None, notes: list[str], why_untimed: str = "") -> str:
    """The dry run's lines: a row per phase (≤: the most it can be), the total, how the time was measured."""
    rows = [("phase", "runs", "steps per run", "examples", "time here")]
    for i, b in enumerate(bounds):
        le = "" if b.exact else "≤ "
        rows.append((b.phase, f"{le}{b.count}", _steps_text(b.runs), f"{le}{b.examples / 1e6:.2f} M",
                     f"{le}{_minutes(seconds[i])}" if seconds else "-"))
    exact = all(b.exact for b in bounds)
    le = "" if exact else "≤ "
    rows.append(("all", f"{le}{sum(b.count for b in bounds)}", "", f"{le}{sum(b.examples for b in bounds) / 1e6:.2f} M",
                 f"{le}{_minutes(sum(seconds) + STUDY_OVERHEAD_S)}" if seconds else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"dry run of study {study.name}: {len(study.cells())} cells × {len(study.lrs())} lr(s); nothing was "
             "written (no output folder, MLflow run, data or Ray)"]
    lines += ["  " + "  ".join(c.ljust(w) if j in (0, 2) else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
              .rstrip() for r in rows]
    lines += [f"  {b.phase}: {b.note}" for b in bounds if b.note]
    if steps:
        kinds = {f"b{k[0]}": v for k, v in sorted(steps.items())}  # the slowest kind per batch size is shown last
        cfg = study.fixed
        lines.append(f"time: {concurrency} trial(s) at once ({where}); a step here: "
                     + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in kinds.items())
                     + f" ({cfg.precision}, channels_last={cfg.channels_last}, {int(cfg.cpus_per_worker)} thread(s) "
                       f"a trial); + {RUN_OVERHEAD_S:g} s a run and {STUDY_OVERHEAD_S:.0f} s a study (Ray, data, "
                       "report); every run at its full length (one that diverges ends early, so such a phase takes "
                       "less); data loading not counted")
    else:
        lines.append(f"time: not estimated ({why_untimed})")
    lines += [f"budget: {n}" for n in notes]
    return "\n".join(lines)


def dry_run(study: Study) -> str:
    """The dry run's text for `study`: its phases' runs and the time they would take here; writes nothing."""
    import torch

    from studies.sweep import record

    record.check_cells(study)
    data = data_size(study.fixed)
    bounds = phase_bounds(study, data)
    concurrency, where = concurrency_here(study)
    if study.fixed.use_gpu and not torch.cuda.is_available():
        return render(study, bounds, None, concurrency, where, None, budget_notes(study, data.n_train),
                      "the study trains on GPUs and this machine has none: time one run on the cluster "
                      "with studies/train.py")
    steps = timed_steps(bounds, data)
    seconds = [phase_seconds(b, steps, concurrency) for b in bounds]
    return render(study, bounds, seconds, concurrency, where, steps, budget_notes(study, data.n_train))

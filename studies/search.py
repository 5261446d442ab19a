"""Study machinery. A study is a grid of scientific cells (e.g. batch size × λ); inside every cell the nuisance
learning rate is explored with a fixed log grid (the Deep Learning Tuning Playbook's quasi-random exploration
phase: the design does not depend on completion order), in two phases run as Ray Tune trials:

  scan    short runs of every lr × seed, past the warmup at a constant lr: where does the cell train at all?
  refine  one more lr per cell, the geometric midpoint between its frontier and the first lr that fails (√2)
  full    the whole budget at the cell's best lrs that train, and at its frontier (does it hold?): how well?

A study without a scan (the paper's protocol) runs every lr of its design in full. `hpo.py` instead searches
jointly with TPE (exploitation). Each trial is identified by its content (phase + config fingerprint), writes its
own Parquet row when it ends, and is skipped on --resume once its row exists: nothing is lost or run twice."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import storage
from studies import analysis, findings, frontier, loop, runner, schema
from studies.config import TrainConfig, lambda_label
from studies.tracking import Tracker, check_tracking_uri, git_commit, hardware, redact

# Named config variants a study can use as a scientific axis (batch_scaling.py: the paper's Fig. 2a).
VARIANTS: dict[str, dict[str, Any]] = {
    "bn_resnet": {"model": "bn_resnet_cifar", "clipping": "none"},
    "nf_resnet": {"model": "nf_resnet_cifar", "clipping": "none"},
    "nf_resnet+agc": {"model": "nf_resnet_cifar", "clipping": "agc"},
}


@dataclass(frozen=True)
class Preset:
    """What a study holds fixed, what it varies (grid: scientific) and how it explores the nuisance lr."""

    grid: dict[str, list[Any]]  # axes: TrainConfig fields, "variant" (VARIANTS), clip_threshold None = no clipping
    fixed: dict[str, Any]  # TrainConfig overrides held fixed
    lrs: tuple[float, ...] = ()  # base lr design (per 256 examples); () = the fixed config's base_lr
    # The stability scan's budget after its warmup: at least scan_steps optimizer steps AND scan_examples examples
    # (small batches need data, large ones steps); never cut by the full run's length. None = no scan.
    scan_steps: int | None = None
    scan_examples: int = 0
    full_top: int = 2  # full runs per cell, at the best stable scan lrs
    seeds: int = 1
    best_k: int | None = None  # a setting's score: mean of its best k seeds (the paper: best 4 of 5)
    tpe: dict[str, tuple[float, float, bool]] | None = None  # hpo: name -> (low, high, log), searched with TPE
    trials: int = 0  # hpo: TPE trials
    options: dict[str, Any] = field(default_factory=dict)  # study-specific analysis settings


def log_grid(low: float, high: float, per_octave: int = 1) -> tuple[float, ...]:
    n = round(math.log2(high / low) * per_octave)
    return tuple(float(f"{low * 2 ** (i / per_octave):.4g}") for i in range(n + 1))


@dataclass
class Study:
    name: str
    preset: Preset
    fixed: TrainConfig
    seed: int = 0
    output: str = "results"
    tracking_uri: str = ""
    experiment: str | None = None
    max_concurrent: int | None = None  # default: fitted to the cluster
    trial_retries: int = 2  # infrastructure failures (lost worker or node) retried per trial
    resume: bool = False
    # (study, results, epochs) -> (figures by file name, summary text, extra outputs, cells rows)
    analyze: Callable[..., tuple] | None = None

    def __post_init__(self):
        p = self.preset
        if not p.grid or any(not v for v in p.grid.values()):
            raise ValueError(f"study {self.name!r}: every scientific axis needs at least one value")
        for axis, values in p.grid.items():
            if len({json.dumps(v, sort_keys=True) for v in values}) < len(values):
                raise ValueError(f"--{axis.replace('_', '-')}s lists a value twice ({values}); list each once")
            if axis == "clip_threshold" and any(v is not None and not v > 0 for v in values):
                raise ValueError(f"study {self.name!r}: λ must be > 0 (use 'none' for no clipping), got {values}")
        if p.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {p.seeds}")
        if p.best_k is not None and not 1 <= p.best_k <= p.seeds:
            raise ValueError(f"--best-k must be in [1, seeds={p.seeds}], got {p.best_k}")
        if p.scan_steps is not None and p.scan_steps < 1 or p.full_top < 1 or p.scan_examples < 0:
            raise ValueError("--scan-steps and --full-top must be >= 1, --scan-examples >= 0")
        if any(not lr > 0 for lr in p.lrs):
            raise ValueError(f"learning rates must be > 0, got {p.lrs}")
        if p.tpe is not None and p.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {p.trials}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        if self.trial_retries < 0:
            raise ValueError(f"trial retries must be >= 0, got {self.trial_retries}")
        self.experiment = self.experiment or self.name

    def cells(self) -> list[dict[str, Any]]:
        import itertools

        keys = list(self.preset.grid)
        return [dict(zip(keys, vals)) for vals in itertools.product(*self.preset.grid.values())]

    @property
    def study_dir(self) -> str:
        return storage.uri.join(self.output, self.name)

    def lrs(self) -> tuple[float, ...]:
        return self.preset.lrs or (self.fixed.base_lr,)

    def config(self, cell: dict[str, Any], **changes) -> TrainConfig:
        return self.fixed.replace(**cell_changes(cell), **changes)

    def table(self) -> storage.ResultsTable:
        return schema.open_table(storage.uri.join(self.study_dir, "results"))

    def record(self) -> dict[str, Any]:
        """What makes two runs the same study: compared on --resume."""
        return {"fixed": self.fixed.to_dict(), "seed": self.seed,
                "preset": json.loads(json.dumps(dataclasses.asdict(self.preset), default=str))}


def cell_changes(cell: dict[str, Any]) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for k, v in cell.items():
        if k == "clip_threshold":  # λ; None = the no-clipping control
            changes.update(clipping="none" if v is None else "agc", clip_threshold=v)
        elif k == "variant":
            changes.update(VARIANTS[v])
        else:
            changes[k] = v
    return changes


def cell_label(cell: dict[str, Any]) -> str:
    def text(k, v):
        if k == "clip_threshold":
            return f"lambda={lambda_label(v)}"
        return f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}"

    return " ".join(text(k, v) for k, v in cell.items())


# ---- the trials of each phase: plain data, a pure function of the study (and the scan's results) ----

@dataclass(frozen=True)
class Spec:
    phase: str
    cell: str
    config: dict[str, Any]  # the whole TrainConfig the trial runs
    key: str = ""  # the trial's identity: phase + config fingerprint, computed once, on the driver

    def __post_init__(self):
        if not self.key:
            object.__setattr__(self, "key", f"{self.phase}-{TrainConfig.from_dict(self.config).fingerprint()}")

    @property
    def label(self) -> str:
        c = self.config
        return f"{self.phase} {self.cell} base_lr={c['base_lr']:.3g} seed={c['seed']}"


def steps_per_epoch(cfg: TrainConfig, n_train: int) -> int:
    return max(1, n_train // cfg.batch_size)


def run_steps(cfg: TrainConfig, n_train: int) -> int:
    return loop.run_length(cfg, steps_per_epoch(cfg, n_train))[0]


def warmup_steps(cfg: TrainConfig, n_train: int) -> int:
    return loop.run_length(cfg, steps_per_epoch(cfg, n_train))[2]


def scan_length(preset: Preset, batch_size: int) -> int:
    """Steps a scan runs after its warmup: at least scan_steps, and enough to see scan_examples examples."""
    return max(preset.scan_steps or 0, -(-preset.scan_examples // batch_size))


def scan_config(study: Study, full: TrainConfig, n_train: int) -> TrainConfig:
    """A scan of a full run's config: the full run's warmup (in steps), then its peak lr held for scan_length
    steps, so the scan reaches the lr it is labelled with; no evaluation, no checkpoints."""
    warmup = warmup_steps(full, n_train)
    return full.replace(max_steps=warmup + scan_length(study.preset, full.batch_size), warmup_steps=warmup,
                        lr_schedule="constant", schedule_steps=None, eval_every_epochs=0,
                        checkpoint_every_epochs=0, checkpoint_every_minutes=0)


def scan_specs(study: Study, n_train: int) -> list[Spec]:
    out = []
    for cell in study.cells():
        for lr in study.lrs():
            for s in range(study.preset.seeds):
                cfg = scan_config(study, study.config(cell, base_lr=lr, seed=study.seed + s), n_train)
                out.append(Spec("scan", cell_label(cell), cfg.to_dict()))
    return out


def refine_specs(study: Study, scan_rows, n_train: int) -> list[Spec]:
    """One more scan lr per cell whose frontier lies inside the grid, every seed: a pure function of the scan."""
    mid = frontier.refine_lrs(scan_rows)
    return [Spec("refine", cell_label(cell),
                 scan_config(study, study.config(cell, base_lr=mid[cell_label(cell)], seed=study.seed + s),
                             n_train).to_dict())
            for cell in study.cells() if cell_label(cell) in mid for s in range(study.preset.seeds)]


def full_specs(study: Study, scan_rows) -> list[Spec]:
    """Every lr of the design without a scan; else each cell's best lrs that train, and its frontier."""
    chosen = frontier.full_phase_lrs(scan_rows, study.preset.full_top) if study.preset.scan_steps else None
    out = []
    for cell in study.cells():
        label = cell_label(cell)
        lrs = study.lrs() if chosen is None else chosen.get(label, [])
        out += [Spec("full", label, study.config(cell, base_lr=lr, seed=study.seed + s).to_dict())
                for lr in lrs for s in range(study.preset.seeds)]
    return out


HANDFUL = 4  # fewer batches per epoch than this and an epoch budget means almost nothing


def budget_notes(study: Study, n_train: int) -> list[str]:
    """What the data and budgets cannot decide, said before the first trial (and in the summary)."""
    notes, seen = [], set()
    for cfg in sorted((study.config(cell) for cell in study.cells()), key=lambda c: c.batch_size):
        b, spe, total = cfg.batch_size, steps_per_epoch(cfg, n_train), run_steps(cfg, n_train)
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


# ---- running a phase through Ray Tune ----

@dataclass
class TrialContext:
    study: str
    experiment: str
    dataset_uri: str
    tracking_uri: str
    parent_run_id: str
    results_uri: str
    storage_path: str
    fixed: dict[str, Any] | None = None  # TPE trials: the config the searched values go onto
    cell: str = ""


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial: one training run, or a few short scan runs of one cell in a row (fewer, longer Tune trials:
    each costs a scheduling round). Each run writes its own row; a retried trial skips the runs that have one."""
    import ray.tune

    if "specs" in config:
        specs = [Spec(**s) for s in config["specs"]]
    else:  # TPE: the searched values onto the fixed config
        specs = [Spec("tpe", ctx.cell, TrainConfig.from_dict({**ctx.fixed, **config}).to_dict())]
    table = schema.open_table(ctx.results_uri)
    done = set(table.read().column("trial_key").to_pylist()) if len(specs) > 1 else set()
    for spec in specs:
        if spec.key in done:
            continue
        summary = run_spec(spec, ctx, table)
        ray.tune.report({**{k: v for k, v in summary.scalars().items() if v is not None}, "trial_key": spec.key,
                         "label": spec.label, runner.OBJECTIVE: summary.objective()})


def run_spec(spec: Spec, ctx: TrialContext, table: storage.ResultsTable) -> schema.RunSummary:
    cfg = TrainConfig.from_dict(spec.config)
    summary = runner.train_and_track(
        cfg, tracking_uri=ctx.tracking_uri, experiment=ctx.experiment, run_name=spec.label,
        storage_path=ctx.storage_path, parent_run_id=ctx.parent_run_id, reuse_key=f"{ctx.study}:{spec.key}",
        tags={"study": ctx.study, "cell": spec.cell, "phase": spec.phase, "trial_key": spec.key,
              "lambda": cfg.lambda_label, "seed": str(cfg.seed)},
        in_tune=True, dataset_uri=ctx.dataset_uri, quiet=True)
    table.append_epochs(schema.epoch_rows(spec.key, summary.history))
    # The row last: once it exists the run is done, and --resume skips it.
    table.append([schema.results_row({"study": ctx.study, "trial_key": spec.key, "phase": spec.phase,
                                      "cell": spec.cell}, cfg, summary, hardware(), git_commit())])
    return summary


def group_specs(specs: list[Spec], size: int) -> list[list[Spec]]:
    """Consecutive runs of the same cell, `size` at a time; the costliest groups first (longest-processing-time
    order packs the trials tighter at the end of a phase)."""
    groups: list[list[Spec]] = []
    for s in specs:
        if groups and len(groups[-1]) < size and groups[-1][0].cell == s.cell:
            groups[-1].append(s)
        else:
            groups.append([s])

    def cost(g):
        return -sum(s.config["batch_size"] * (s.config["max_steps"] or 0) for s in g)

    return sorted(groups, key=cost)


@dataclass
class Capacity:
    """What the cluster has now and, on an autoscaling cluster, the most it can grow to (the autoscaler's node
    types × their max counts, as the autoscaler reports them to the GCS). `nodes` counts live nodes."""
    now: dict[str, float]
    max: dict[str, float] | None = None
    nodes: int = 1

    @property
    def autoscaling(self) -> bool:
        return self.max is not None

    def most(self) -> dict[str, float]:
        return {k: max(self.now.get(k, 0), (self.max or {}).get(k, 0)) for k in {*self.now, *(self.max or {})}}


def trial_resources(cfg: TrainConfig) -> dict[str, float]:
    """What a Tune trial holds. In-process runs train in the trial's actor, so it holds the worker's CPUs and GPU
    share; a TorchTrainer trial only waits on its worker group and holds no CPU (a bundle cannot be empty)."""
    if runner.runs_in_process(cfg):
        return {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}
    return {"CPU": 0, "memory": 64 << 20}


def autoscaler_max(config: dict[str, Any]) -> dict[str, float]:
    """The most of each resource a `ray up` cluster config allows: head + worker types at their max counts,
    the cluster-wide max_workers filled with the richest types first."""
    types = config.get("available_node_types", {})
    head = types.get(config.get("head_node_type"), {})
    workers = [t for name, t in types.items() if name != config.get("head_node_type")]
    cap = config.get("max_workers", sum(t.get("max_workers", 0) for t in workers))
    out = {k: float(v) for k, v in head.get("resources", {}).items()}
    for key in {k for t in workers for k in t.get("resources", {})}:
        left, total = cap, 0.0
        for t in sorted(workers, key=lambda t: -t.get("resources", {}).get(key, 0)):
            n = min(left, t.get("max_workers", 0))
            total, left = total + n * t.get("resources", {}).get(key, 0), left - n
        out[key] = out.get(key, 0.0) + total
    return out


def _autoscaler_resources() -> dict[str, float] | None:
    try:  # what the autoscaler reports to the GCS (the reader Ray Train itself uses; private, so guarded)
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
        if most:
            return {k: float(v) for k, v in most.items()}
    except Exception:
        pass
    # `ray up` leaves the cluster config on the head, where a `ray job submit` driver runs.
    path = Path(os.environ.get("NFNET_LAB_AUTOSCALER_CONFIG", "~/ray_bootstrap_config.yaml")).expanduser()
    if path.is_file():
        import yaml

        return autoscaler_max(yaml.safe_load(path.read_text()))
    return None


def cluster_capacity() -> Capacity:
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return Capacity(ray.cluster_resources(), _autoscaler_resources(), nodes)


def cluster_concurrency(cfg: TrainConfig, cap: Capacity | dict[str, float] | None = None) -> int:
    """Trials that fit the cluster at once, each needing num_workers × (cpus_per_worker [+ gpus_per_worker]).
    An autoscaling cluster is sized by what it can grow to, not by the nodes alive at start (often a head only):
    the trials' resource requests are what make the autoscaler add the nodes."""
    if cap is None:
        cap = cluster_capacity()
    if isinstance(cap, dict):
        cap = Capacity(cap)
    res = cap.most()
    where = "can grow to (autoscaler's maximum)" if cap.autoscaling else "has now"
    need_cpu = cfg.num_workers * cfg.cpus_per_worker
    n = int(res.get("CPU", 0) // need_cpu) if need_cpu else 1
    if cfg.use_gpu:
        gpus, need_gpu = res.get("GPU", 0), cfg.num_workers * cfg.gpus_per_worker
        if gpus < need_gpu:
            raise RuntimeError(
                f"the study asks for {need_gpu:g} GPU(s) per trial but the Ray cluster {where} {gpus:g} GPU(s); "
                "lower --num-workers, drop --use-gpu, connect to a GPU cluster (RAY_ADDRESS), or give "
                "--max-concurrent (trials then wait for GPU nodes started by hand)")
        n = min(n, int(gpus / need_gpu + 1e-9))
    if n < 1:
        raise RuntimeError(
            f"one trial needs {need_cpu:g} CPUs ({cfg.num_workers} workers × {cfg.cpus_per_worker:g}) but the Ray "
            f"cluster {where} {res.get('CPU', 0):g}; lower --num-workers/--cpus-per-worker or use a bigger cluster")
    return n


def check_cluster_paths(study: Study, nodes: int, autoscaling: bool = False) -> None:
    """On a multi-node cluster every worker must reach the data, the results and the tracking store: local
    paths and local MLflow stores resolve on one machine only. An autoscaling cluster counts as multi-node even
    while only its head is up: the trials will run on nodes it adds."""
    if nodes <= 1 and not autoscaling:
        return
    shared_fs = os.environ.get("NFNET_LAB_SHARED_FS") == "1"  # e.g. the same NFS mount on every node
    local = [(what, v) for what, v in (("--output", study.output), ("--data-root", study.fixed.data_root))
             if ("://" not in v or v.startswith("file://")) and not (shared_fs and os.path.isabs(v))]
    if study.tracking_uri.startswith(("sqlite:", "file:")):
        local.append(("--tracking-uri", study.tracking_uri))
    if local:
        where = ("this Ray cluster autoscales (trials run on nodes it adds)" if autoscaling else
                 f"this Ray cluster has {nodes} nodes")
        raise ValueError(
            where + ", but " + ", ".join(f"{w} {v}" for w, v in local)
            + " is local to one machine; use s3:// or gs:// URIs for --output/--data-root (or NFNET_LAB_RESULTS/"
              "NFNET_LAB_DATA; or NFNET_LAB_SHARED_FS=1 for a filesystem mounted on every node) and an MLflow server "
              "(http://…) for --tracking-uri; see platform/README.md")


def check_paths(study: Study) -> None:
    """Paths every trial must reach the same way as the driver; an output the study can write."""
    storage.require_absolute(study.fixed.data_root, "--data-root")
    if study.fixed.dataset not in storage.datasets.SOURCES:
        storage.require_absolute(study.fixed.dataset, "--dataset")
    storage.check_writable(study.study_dir)


def check_cells(study: Study) -> None:
    """Every cell makes a valid TrainConfig and model config (before any data is prepared)."""
    import nfnet

    for cell in study.cells():
        cfg = study.config(cell)
        nfnet.model_config(cfg.model, **cfg.model_overrides)


def validate(study: Study, dataset_uri: str) -> int:
    """Everything the data decides, before any trial starts. Returns the train split's size."""
    n_train = storage.open_dataset(dataset_uri).manifest.splits["train"]
    for cell in study.cells():
        cfg = study.config(cell)
        if cfg.batch_size > n_train:
            raise ValueError(f"batch size {cfg.batch_size} is larger than the training split ({n_train} images of "
                             f"{dataset_uri}); use smaller batch sizes or a bigger dataset")
    return n_train


def check_record(study: Study) -> bool:
    """An output that holds this study is continued only with --resume, and only under the same settings.
    Returns whether the study is new (its record is written once its trials are about to start)."""
    fs, path = storage.resolve(storage.uri.join(study.study_dir, "study.json"))
    try:
        old = json.loads(storage.uri.read_bytes(fs, path).decode())
    except (FileNotFoundError, storage.StorageError, OSError):
        return True
    if not study.resume:
        raise ValueError(f"{study.study_dir} already holds study {study.name!r}; continue it with --resume, or "
                         "choose another --output or --name")
    diff = sorted(_diff(old, study.record()))
    if diff:
        raise ValueError(f"--resume with other settings than the study was started with ({', '.join(diff[:6])}); "
                         "rerun with the original flags, or start a new study with another --name")
    return False


def write_record(study: Study) -> None:
    fs, path = storage.resolve(storage.uri.join(study.study_dir, "study.json"))
    storage.uri.write_bytes_atomic(fs, path, json.dumps(study.record(), sort_keys=True, indent=1).encode())


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in set(a) | set(b) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [f"{prefix[:-1]}: {a} → {b}"] if a != b else []


SCAN_RUNS_PER_TRIAL = 4


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """SIGTERM (a scheduler, `kill`) stops the study as Ctrl-C does: Tune stops the trials, the study is marked
    interrupted and stays resumable. Installed after ray.init, whose own SIGTERM handler would end the driver."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Phases:
    """Both phases as ONE Tune experiment (its trial processes stay warm from scan to full): a PhaseSearcher hands
    out the scan's trials, then, once they have all ended, the full phase computed from the scan's rows. Runs
    whose rows exist are skipped."""

    def __init__(self, study: Study, ctx: TrialContext, table: storage.ResultsTable, concurrency: int,
                 n_train: int = 0):
        self.study, self.ctx, self.table, self.concurrency, self.n_train = study, ctx, table, concurrency, n_train

    def done(self) -> set[str]:
        return set(self.table.read().column("trial_key").to_pylist())

    def scan(self) -> list[Spec]:
        return scan_specs(self.study, self.n_train) if self.study.preset.scan_steps else []

    def _after(self, before: list[Spec] | None) -> list[dict] | None:
        """The results table once every run of the phase before has its row; None while one lacks it."""
        done = self.done()
        if before is None or any(s.key not in done for s in before):
            return None
        return self.table.read().to_pylist()

    def refine(self) -> list[Spec] | None:
        """The refinement runs; None while any scan run lacks its row (the frontier is not known yet)."""
        if not self.study.preset.scan_steps:
            return []
        rows = self._after(self.scan())
        return None if rows is None else refine_specs(self.study, rows, self.n_train)

    def full(self) -> list[Spec] | None:
        """The full phase's runs; None while any scan or refinement run lacks its row."""
        refine = self.refine()
        rows = self._after(None if refine is None else self.scan() + refine)
        return None if rows is None else full_specs(self.study, rows)

    def pending(self, phase: str, specs: list[Spec] | None) -> list[list[dict]]:
        if not specs:
            return []
        done = self.done()
        todo = [s for s in specs if s.key not in done]
        if todo:
            print(f"{phase}: {len(todo)} run(s)" + (f" ({len(specs) - len(todo)} already done)"
                                                    if len(todo) < len(specs) else ""), flush=True)
        size = SCAN_RUNS_PER_TRIAL if phase in frontier.SCAN_PHASES else 1
        return [[dataclasses.asdict(s) for s in g] for g in group_specs(todo, size)]

    def run(self) -> bool:
        """True when every run of both phases has its row (False: interrupted, or lost to infrastructure)."""
        from ray import tune

        from studies.tune_glue import PhaseSearcher, ProgressPrinter

        searcher = PhaseSearcher([lambda: self.pending("scan", self.scan()),
                                  lambda: self.pending("refine", self.refine()),
                                  lambda: self.pending("full", self.full())])
        tuner = tune.Tuner(
            self.trainable(),
            # reuse_actors: a finished trial's process runs the next one (no Python + torch start per trial).
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1,
                                        max_concurrent_trials=self.concurrency, reuse_actors=True),
            run_config=self.run_config("grid", ProgressPrinter(self.ctx)))
        with sigterm_as_ctrl_c():
            tuner.fit()
        full = self.full()
        done = self.done()
        return full is not None and all(s.key in done for s in full)

    def trainable(self):
        from ray import tune

        return tune.with_resources(tune.with_parameters(run_trial, ctx=self.ctx), trial_resources(self.study.fixed))

    def run_config(self, name: str, printer):
        from ray import tune
        from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

        # Tune's own JSON and CSV trial loggers (its end-of-fit analysis reads them), not its TensorBoard one: the
        # study's record is the results table and MLflow, and TensorBoardX warns "NaN or Inf" on a metric left NaN
        # on purpose (the noise scale of an unmeasured run). Read by Tune when the Tuner fits.
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        return tune.RunConfig(
            name=f"{self.study.name}-{name}-{time.strftime('%Y%m%d-%H%M%S')}",
            **storage.uri.ray_storage(storage.uri.join(self.study.study_dir, "tune")), verbose=0,
            callbacks=[printer, JsonLoggerCallback(), CSVLoggerCallback()],
            failure_config=tune.FailureConfig(max_failures=self.study.trial_retries))


def run_study(study: Study) -> dict[str, Any]:
    """Run (or resume) the study; returns its tables, figures, summary and where things are."""
    check_cells(study)
    check_tracking_uri(study.tracking_uri)
    check_paths(study)
    # One study per output at a time: a second would share its tables and MLflow runs.
    with storage.acquire_lock(study.study_dir, owner=f"study {study.name}"):
        return _run_locked(study, new=check_record(study))


def _run_locked(study: Study, new: bool) -> dict[str, Any]:
    dataset_uri = runner.prepare_data(study.fixed)
    n_train = validate(study, dataset_uri)
    notes = budget_notes(study, n_train)
    for note in notes:
        print(f"budget: {note}", flush=True)
    runner.init_ray(log_to_driver=False)
    cap = cluster_capacity()
    check_cluster_paths(study, cap.nodes, cap.autoscaling)
    concurrency = study.max_concurrent or cluster_concurrency(study.fixed, cap)
    if new:  # only now: a study refused before any trial leaves nothing that would ask for --resume
        write_record(study)
    parent = Tracker.create(study.tracking_uri, study.experiment, study.name,
                            tags={"role": "study", "git_commit": git_commit(), "hardware": hardware()},
                            reuse_tag=("study_key", f"{study.name}@{study.study_dir}"))
    parent.log_params({"study.preset": json.dumps(study.record()["preset"])[:6000], "study.seed": study.seed,
                       "study.max_concurrent": concurrency, **{f"fixed.{k}": v for k, v in study.fixed.flat().items()}})
    parent.set_tags({"status": "running"})
    table = study.table()
    ctx = TrialContext(study.name, study.experiment, dataset_uri, study.tracking_uri, parent.run_id,
                       table.uri, storage.uri.join(study.study_dir, "train"))
    phases = Phases(study, ctx, table, concurrency, n_train)
    t0 = time.time()
    if study.preset.tpe is not None:
        from studies.tune_glue import run_tpe

        complete = run_tpe(study, ctx, phases)
    else:
        complete = phases.run()
    return {**finish(study, table, parent, time.time() - t0, complete, notes), "concurrency": concurrency}


def finish(study: Study, table: storage.ResultsTable, parent: Tracker, wall: float, complete: bool,
           notes: list[str] = ()) -> dict[str, Any]:
    """Analysis from the Parquet tables (resumed trials included), written beside the results and logged on the
    study's MLflow run. An interrupted study is marked so (MLflow KILLED), and --resume continues it."""
    import tempfile

    import pyarrow.parquet as pq

    results, epochs = table.read(), table.read_epochs()
    figures, text, extra, cells = (study.analyze or frontier_analysis)(study, results, epochs)
    summary = summary_text(study, results, text, wall, complete, notes)
    out: dict[str, Any] = {"results": results, "epochs": epochs, "cells": cells, "wall_time_s": wall,
                           "dir": study.study_dir, "parent_run_id": parent.run_id, "summary": summary,
                           "complete": complete, **extra}
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: Path(tmp) / name for name in [*figures, "summary.txt", "results.parquet", "cells.parquet"]}
        for name, fig in figures.items():
            fig.savefig(files[name], dpi=130, bbox_inches="tight")
            analysis.close(fig)
        files["summary.txt"].write_text(summary)
        pq.write_table(results, files["results.parquet"])
        pq.write_table(cells, files["cells.parquet"])
        for name, p in files.items():
            fs, path = storage.resolve(storage.uri.join(study.study_dir, name))
            storage.uri.write_bytes_atomic(fs, path, p.read_bytes())
            parent.log_artifact(p)
        out["files"] = {name: storage.uri.join(study.study_dir, name) for name in files}
    statuses = results.column("status").to_pylist()
    parent.log_metrics({"trials": results.num_rows, "wall_time_s": wall,
                        **{f"trials_{s}": statuses.count(s) for s in schema.STATUSES}}, step=0)
    for name, value, step in frontier.cell_metrics(cells):
        parent.log_metrics({name: value}, step=step)
    parent.set_tags({"status": "completed" if complete else "interrupted"})
    parent.client.set_terminated(parent.run_id, "FINISHED" if complete else "KILLED")
    return out


def frontier_analysis(study: Study, results, epochs):
    """Default analysis: the stable region (frontier per cell), its words and its four figures."""
    cells = frontier.frontier_table(results, best_k=study.preset.best_k)
    if not cells.num_rows:
        return {}, "", {}, cells
    title = f"{study.name}: learning-rate frontier per batch size and AGC λ"
    figs = {"stable_region.png": analysis.plot_stable_region(results, cells, title),
            "stability_map.png": analysis.plot_stability_map(cells, title),
            "lr_loss.png": analysis.plot_lr_loss(results),
            "lr_accuracy.png": analysis.plot_lr_accuracy(results, best_k=study.preset.best_k)}
    return figs, findings.frontier_summary(cells), {}, cells


def summary_text(study: Study, results, analysis_text: str, wall: float, complete: bool,
                 notes: list[str] = ()) -> str:
    statuses = results.column("status").to_pylist()
    state = "" if complete else ("INTERRUPTED — partial results (trials stopped, or lost to infrastructure "
                                 "after their retries); continue with --resume. ")
    lines = [f"{state}study {study.name}: {results.num_rows} trials in {wall / 60:.1f} min ("
             + ", ".join(f"{s} {statuses.count(s)}" for s in schema.STATUSES) + ")"]
    lines += [f"budget: {n}" for n in notes]
    if analysis_text:
        lines.append(analysis_text)
    lines.append(f"outputs: {study.study_dir}/ (results.parquet, cells.parquet, figures, summary.txt)")
    uri = redact(study.tracking_uri)
    lines.append(f"MLflow: experiment '{study.experiment}' — see it with: mlflow ui --backend-store-uri {uri}"
                 if not uri.startswith("http") else f"MLflow: experiment '{study.experiment}' at {uri}")
    return "\n".join(lines)

# Study machinery: a grid of scientific cells, an Optuna (TPE) search over the nuisance parameters INSIDE
# each cell (Deep Learning Tuning Playbook: compare every cell at its own best setting), all cells in one
# Ray Tune experiment. Every trial is a training run (studies.runner) and a nested MLflow run; results land
# in storage's Parquet tables as trials finish, so an interrupted study resumes without duplicates.
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import storage
from studies import analysis, runner
from studies.config import TrainConfig
from studies.tracking import Tracker, check_tracking_uri, git_commit, hardware

OBJECTIVE = "objective"  # best validation top-1 so far; 0 for a diverged or failed trial
SUMMARY_KEYS = ("status", "diverged_step", "diverged_reason", "error", "final_val_acc", "best_val_acc",
                "final_val_loss", "best_val_loss", "final_train_loss", "steps", "epochs", "images_per_sec",
                "train_time_s", "wall_time_s", "gns", "mlflow_run_id")


def apply_cell(cfg: TrainConfig, sci: dict[str, Any], nui: dict[str, Any], seed: int) -> TrainConfig:
    """Scientific and nuisance values onto the fixed config. `lambda` is AGC's λ (None = no clipping);
    `variant` is a dict of config overrides (e.g. a model and its clipping); other keys are TrainConfig fields."""
    changes: dict[str, Any] = {"seed": seed, **nui}
    for k, v in sci.items():
        if k == "lambda" and v is None:
            changes["clipping"] = "none"
        elif k == "lambda":
            changes.update(clipping="agc", clip_threshold=v)
        elif k == "variant":
            changes.update(VARIANTS[v] if isinstance(v, str) else v)
        else:
            changes[k] = v
    return cfg.replace(**changes)


# Named config variants a study can use as a scientific axis (batch_scaling.py: the paper's Fig. 2a).
VARIANTS: dict[str, dict[str, Any]] = {
    "bn_resnet": {"model": "bn_resnet_cifar", "clipping": "none"},
    "nf_resnet": {"model": "nf_resnet_cifar", "clipping": "none"},
    "nf_resnet+agc": {"model": "nf_resnet_cifar", "clipping": "agc"},
}


def _sci_value(k: str, v: Any) -> Any:
    if k == "lambda":
        return "none" if v is None else f"{v:g}"
    return json.dumps(v, sort_keys=False) if isinstance(v, (dict, list)) else v


def cell_label(sci: dict[str, Any]) -> str:
    return ",".join(f"{k}={_sci_value(k, v)}" for k, v in sci.items())


def trial_label(sci: dict[str, Any], nui: dict[str, Any], seed: int) -> str:
    return f"{cell_label(sci)} " + " ".join(f"{k}={v:.3g}" for k, v in nui.items()) + f" seed={seed}"


def sci_columns(sci: dict[str, Any]) -> dict[str, Any]:
    return {f"sci_{k}": _sci_value(k, v) for k, v in sci.items()}


@dataclass
class Study:
    name: str
    scientific: dict[str, list[Any]]  # axes; cells are their product
    nuisance: dict[str, tuple[float, float, bool]]  # name -> (low, high, log scale), searched per cell
    fixed: TrainConfig
    trials_per_cell: int = 4  # nuisance settings tried per cell
    seeds: int = 1  # seeds per nuisance setting
    best_k: int | None = None  # cell score: mean of the best k seeds (paper: best 4 of 5)
    centre: dict[str, float] | None = None  # first point of every cell's search
    seed: int = 0
    output: str = "results"
    tracking_uri: str = ""
    experiment: str | None = None
    max_concurrent: int | None = None  # default: fitted to the cluster
    asha: bool = False
    resume: bool = False
    # (study, results, epochs) -> (figures by file name, summary text, extra outputs); default: stability map
    analyze: Callable[..., tuple[dict[str, Any], str, dict[str, Any]]] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # study-specific analysis settings (e.g. target acc)

    def __post_init__(self):
        if not self.scientific or any(not v for v in self.scientific.values()):
            raise ValueError(f"study {self.name!r}: every scientific axis needs at least one value")
        for v in self.scientific.get("lambda", []):
            if v is not None and not v > 0:
                raise ValueError(f"study {self.name!r}: λ must be > 0 (use None for 'no clipping'), got {v}")
        for k, (lo, hi, _log) in self.nuisance.items():
            if k not in {f.name for f in dataclasses.fields(TrainConfig)}:
                raise ValueError(f"nuisance parameter {k!r} is not a TrainConfig field")
            if not 0 < lo < hi if _log else not lo < hi:
                raise ValueError(f"nuisance range for {k} must satisfy {'0 < ' if _log else ''}low < high")
        if self.trials_per_cell < 1 or self.seeds < 1:
            raise ValueError("trials_per_cell and seeds must be >= 1")
        if self.best_k is not None and not 1 <= self.best_k <= self.seeds:
            raise ValueError(f"best_k must be in [1, seeds={self.seeds}]")
        self.experiment = self.experiment or self.name

    def cells(self) -> list[dict[str, Any]]:
        keys = list(self.scientific)
        return [dict(zip(keys, vals)) for vals in itertools.product(*self.scientific.values())]

    @property
    def n_trials(self) -> int:
        return len(self.cells()) * self.trials_per_cell * self.seeds

    @property
    def study_dir(self) -> str:
        return storage.uri.join(self.output, self.name)


# ---- the searcher: one seeded OptunaSearch per cell ----

def _optuna_space(nuisance):
    import optuna

    return {k: optuna.distributions.FloatDistribution(lo, hi, log=log) for k, (lo, hi, log) in nuisance.items()}


def _make_searcher_class():
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class CellSearcher(Searcher):
        """Round-robin over cells; each cell has its own seeded TPE searcher over the nuisance space.
        A nuisance setting is run `seeds` times; its cell's searcher is told the seed mean."""

        def __init__(self, cells, nuisance, trials_per_cell, seeds, seed, centre=None):
            super().__init__(metric=OBJECTIVE, mode="max")
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)  # one "study created" line per cell otherwise

            self.cells, self.trials_per_cell, self.seeds = cells, trials_per_cell, seeds
            space = _optuna_space(nuisance)
            self.searchers = [
                OptunaSearch(space=space, metric=OBJECTIVE, mode="max",
                             sampler=optuna.samplers.TPESampler(seed=seed * 1000 + i, n_startup_trials=2),
                             points_to_evaluate=[dict(centre)] if centre else None)
                for i in range(len(cells))
            ]
            self.issued = [0] * len(cells)
            self.queue: list[dict] = []  # further seeds of suggested settings
            self.pending: dict[str, dict] = {}  # suggestion id -> {cell, values, expected}
            self.trial_to_sid: dict[str, str] = {}
            self.turn = 0

        def suggest(self, trial_id):
            if not self.queue:
                for _ in range(len(self.cells)):
                    i, self.turn = self.turn, (self.turn + 1) % len(self.cells)
                    if self.issued[i] >= self.trials_per_cell:
                        continue
                    sid = f"c{i}-{self.issued[i]}"
                    nui = self.searchers[i].suggest(sid)
                    if nui is None:
                        continue
                    self.issued[i] += 1
                    self.pending[sid] = {"cell": i, "values": [], "expected": self.seeds}
                    self.queue += [{"sid": sid, "cell": i, "nuisance": nui, "seed_index": s}
                                   for s in range(self.seeds)]
                    break
            if not self.queue:
                done = all(n >= self.trials_per_cell for n in self.issued)
                return Searcher.FINISHED if done and not self.pending else None
            item = self.queue.pop(0)
            self.trial_to_sid[trial_id] = item["sid"]
            return {"cell_index": item["cell"], "cell": self.cells[item["cell"]],
                    "nuisance": item["nuisance"], "seed_index": item["seed_index"]}

        def on_trial_complete(self, trial_id, result=None, error=False):
            sid = self.trial_to_sid.pop(trial_id, None)
            if sid is None:
                return
            p = self.pending[sid]
            v = (result or {}).get(OBJECTIVE)
            p["values"].append(v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0)
            if len(p["values"]) >= p["expected"]:
                del self.pending[sid]
                self.searchers[p["cell"]].on_trial_complete(sid, {OBJECTIVE: sum(p["values"]) / len(p["values"])})

        def save(self, checkpoint_path):
            with open(checkpoint_path, "wb") as f:
                pickle.dump(self.__dict__, f)

        def restore(self, checkpoint_path):
            with open(checkpoint_path, "rb") as f:
                self.__dict__.update(pickle.load(f))

    return CellSearcher


# ---- one trial (runs inside Tune) ----

@dataclass
class TrialContext:
    study: str
    experiment: str
    fixed: dict[str, Any]
    seed: int
    dataset_uri: str
    tracking_uri: str
    parent_run_id: str
    storage_path: str


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    sci, nui = config["cell"], config["nuisance"]
    seed = ctx.seed + config["seed_index"]
    cfg = apply_cell(TrainConfig.from_dict(ctx.fixed), sci, nui, seed)
    summary = runner.train_and_track(
        cfg, tracking_uri=ctx.tracking_uri, experiment=ctx.experiment,
        run_name=trial_label(sci, nui, seed),
        storage_path=ctx.storage_path, parent_run_id=ctx.parent_run_id, reuse_key=f"{ctx.study}:{trial_id}",
        tags={"study": ctx.study, "cell": cell_label(sci), "trial_id": trial_id, "seed": str(seed),
              **{f"sci.{k}": str(v) for k, v in sci.items()}},
        in_tune=True, dataset_uri=ctx.dataset_uri, quiet=True,
    )
    final = {k: summary.get(k) for k in SUMMARY_KEYS}
    final["history_json"] = json.dumps(summary.get("history") or [])
    final[OBJECTIVE] = runner.objective(summary)
    final["final"] = True
    ray.tune.report({k: v for k, v in final.items() if v is not None})


# ---- the driver side: results as trials finish ----

def _results_writer_class():
    from ray import tune

    class ResultsWriter(tune.Callback):
        def __init__(self, study: Study, table: storage.ResultsTable, hw: str, commit: str):
            self.study, self.table, self.hw, self.commit = study, table, hw, commit
            self.epochs: dict[str, list[dict]] = {}
            self.done = table.read().num_rows if study.resume else 0
            self.t0: dict[str, float] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.t0.setdefault(trial.trial_id, time.time())

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if not result.get("final") and "epoch" in result:
                self.epochs.setdefault(trial.trial_id, []).append(
                    {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._write(trial, None)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._write(trial, str(getattr(trial, "error_file", "") or "trial errored"))

        def _write(self, trial, error):
            res = dict(trial.last_result or {})
            cfg = trial.config
            status = res.get("status") if res.get("final") else ("failed" if error else "stopped")
            if status == "running":
                status = "stopped"
            row = {"study": self.study.name, "trial_id": trial.trial_id, "cell": cell_label(cfg["cell"]),
                   **sci_columns(cfg["cell"]), **{f"nui_{k}": v for k, v in cfg["nuisance"].items()},
                   "seed": self.study.seed + cfg["seed_index"], "status": status,
                   "hardware": self.hw, "git_commit": self.commit}
            for k in SUMMARY_KEYS:
                if k != "status" and res.get(k) is not None:
                    row[k if k in storage.results.COLUMNS else f"metric_{k}"] = res[k]
            if error and not row.get("error"):
                row["error"] = error
            row.setdefault("wall_time_s", time.time() - self.t0.get(trial.trial_id, time.time()))
            self.table.append([row])
            self.done += 1
            acc = f" best val acc {row['best_val_acc']:.3f}" if row.get("best_val_acc") is not None else ""
            extra = f" at step {row['diverged_step']}" if status == "diverged" else \
                f": {row.get('error', '')[:120]}" if status == "failed" else ""
            print(f"[{self.done}/{self.study.n_trials}] {trial_label(cfg['cell'], cfg['nuisance'], row['seed'])}: "
                  f"{status}{extra}{acc} ({row['wall_time_s']:.0f} s)", flush=True)
            hist = json.loads(res["history_json"]) if res.get("history_json") else self.epochs.get(trial.trial_id, [])
            keep = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_sec",
                    "grad_norm_before", "grad_norm_after", "agc_clipped_frac", "gns", "step_time_ms")
            self.table.append_epochs([{"trial_id": trial.trial_id, "epoch": int(h["epoch"]),
                                       **{k: float(h[k]) for k in keep if k in h and k != "epoch"}} for h in hist])
            if status == "stopped" and res.get("mlflow_run_id") is None:
                _end_child_stopped(self.study, trial.trial_id)

    return ResultsWriter


def _end_child_stopped(study: Study, trial_id: str) -> None:
    # An early-stopped (ASHA) trial never reached its own end-of-run logging.
    try:
        t = Tracker.create(study.tracking_uri, study.experiment, trial_id, reuse_tag=("trial_key",
                                                                                       f"{study.name}:{trial_id}"))
        t.end("stopped")
    except Exception as e:  # tracking must not take the study down
        print(f"warning: could not mark MLflow run of {trial_id} stopped: {e}")


def cluster_concurrency(cfg: TrainConfig) -> int:
    """Trials that fit the cluster at once: each needs num_workers × (cpus_per_worker [+ 1 GPU])."""
    import ray

    res = ray.cluster_resources()
    need_cpu = cfg.num_workers * cfg.cpus_per_worker
    n = int(res.get("CPU", 0) // need_cpu) if need_cpu else 1
    if cfg.use_gpu:
        gpus = int(res.get("GPU", 0))
        if gpus < cfg.num_workers:
            raise RuntimeError(
                f"the study asks for {cfg.num_workers} GPU worker(s) per trial but the Ray cluster has {gpus} GPU(s);"
                " lower --num-workers, drop --use-gpu, or connect to a GPU cluster (RAY_ADDRESS)")
        n = min(n, gpus // cfg.num_workers)
    if n < 1:
        raise RuntimeError(
            f"one trial needs {need_cpu:g} CPUs ({cfg.num_workers} workers × {cfg.cpus_per_worker:g}) but the Ray "
            f"cluster has {res.get('CPU', 0):g}; lower --num-workers/--cpus-per-worker or use a bigger cluster")
    return n


def check_cluster_paths(study: Study, nodes: int) -> None:
    """On a multi-node cluster every worker must reach the data, the results and the tracking store: local
    paths and local MLflow stores resolve on one machine only."""
    if nodes <= 1:
        return
    shared_fs = os.environ.get("NFNET_LAB_SHARED_FS") == "1"  # e.g. the same NFS mount on every node
    local = [(what, v) for what, v in (("--output", study.output), ("--data-root", study.fixed.data_root))
             if ("://" not in v or v.startswith("file://")) and not (shared_fs and os.path.isabs(v))]
    if study.tracking_uri.startswith(("sqlite:", "file:")):
        local.append(("--tracking-uri", study.tracking_uri))
    if local:
        raise ValueError(
            f"this Ray cluster has {nodes} nodes, but " + ", ".join(f"{w} {v}" for w, v in local)
            + " is local to one machine; use s3:// or gs:// URIs for --output/--data-root (or NFNET_LAB_RESULTS/"
              "NFNET_LAB_DATA; or NFNET_LAB_SHARED_FS=1 for a filesystem mounted on every node) and an MLflow server "
              "(http://…) for --tracking-uri; see platform/README.md")


def validate(study: Study, dataset_uri: str) -> None:
    """Everything that would make the grid unrunnable, before any trial starts."""
    man = storage.open_dataset(dataset_uri).manifest
    n_train = man.splits["train"]
    for b in study.scientific.get("batch_size", [study.fixed.batch_size]):
        if b > n_train:
            raise ValueError(f"batch size {b} is larger than the training split ({n_train} images of "
                             f"{dataset_uri}); use smaller batch sizes or a bigger dataset")
        if b % study.fixed.num_workers:
            raise ValueError(f"batch size {b} is not divisible by {study.fixed.num_workers} workers")
    for cell in study.cells():  # every cell must make a valid TrainConfig
        apply_cell(study.fixed, cell, {k: lo for k, (lo, _, _) in study.nuisance.items()}, study.seed)


def run_study(study: Study) -> dict[str, Any]:
    """Run (or resume) the study; returns the stability map, the results table and where things are."""
    from ray import tune

    check_tracking_uri(study.tracking_uri)
    dataset_uri = runner.prepare_data(study.fixed)
    validate(study, dataset_uri)
    runner.init_ray(log_to_driver=False)
    import ray

    check_cluster_paths(study, sum(1 for n in ray.nodes() if n.get("Alive")))
    max_conc = study.max_concurrent or cluster_concurrency(study.fixed)
    cells = study.cells()

    key = hashlib.sha1(f"{study.name}|{os.path.abspath(study.output) if '://' not in study.output else study.output}"
                       .encode()).hexdigest()[:12]
    parent = Tracker.create(study.tracking_uri, study.experiment, study.name,
                            tags={"role": "study", "git_commit": git_commit(), "hardware": hardware()},
                            reuse_tag=("study_key", key))
    parent.log_params({"study.scientific": json.dumps(study.scientific),
                       "study.nuisance": json.dumps(study.nuisance), "study.trials_per_cell": study.trials_per_cell,
                       "study.seeds": study.seeds, "study.seed": study.seed, "study.max_concurrent": max_conc,
                       **{f"fixed.{k}": v for k, v in study.fixed.flat().items()}})
    parent.set_tags({"status": "running"})

    table = storage.ResultsTable(storage.uri.join(study.study_dir, "results"))
    ctx = TrialContext(study.name, study.experiment, study.fixed.to_dict(), study.seed, dataset_uri,
                       study.tracking_uri, parent.run_id, storage.uri.join(study.study_dir, "train"))
    # A TorchTrainer trial only waits on its worker group: it holds no CPU (a bundle cannot be empty, so memory).
    res = ({"CPU": study.fixed.cpus_per_worker} if runner.runs_in_process(study.fixed)
           else {"CPU": 0, "memory": 64 << 20})
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), res)
    writer = _results_writer_class()(study, table, hardware(), git_commit())
    tune_path = storage.uri.join(study.study_dir, "tune")
    exp_path = storage.uri.join(tune_path, study.name)
    t0 = time.time()
    if study.resume and tune.Tuner.can_restore(exp_path):
        print(f"resuming study {study.name} from {exp_path}", flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        # Tuner.restore takes no callbacks and would revive the pickled writer of the dead driver.
        tuner._local_tuner._run_config.callbacks = [writer]
    else:
        if study.resume:
            print(f"nothing to resume at {exp_path}; starting the study", flush=True)
        searcher = tune.search.ConcurrencyLimiter(
            _make_searcher_class()(cells, study.nuisance, study.trials_per_cell, study.seeds, study.seed,
                                   study.centre),
            max_concurrent=max_conc)
        scheduler = None
        if study.asha:
            # max_t one past the budget: ASHA stops trials at max_t, which would cut off the final summary report.
            scheduler = tune.schedulers.ASHAScheduler(time_attr="epoch", metric=OBJECTIVE, mode="max",
                                                      max_t=math.ceil(study.fixed.epochs) + 1, grace_period=1)
        tuner = tune.Tuner(
            trainable,
            # reuse_actors: a finished trial's process runs the next one (no Python + torch start per trial).
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=study.n_trials,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=study.name, storage_path=tune_path, callbacks=[writer],
                                      verbose=0, failure_config=tune.FailureConfig(max_failures=0)),
        )
    tuner.fit()
    wall = time.time() - t0
    return {**finish(study, table, parent, wall), "concurrency": max_conc}


def map_analysis(study: Study, results, epochs) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Default analysis: the λ × batch-size stability map."""
    if "sci_lambda" not in results.column_names or not results.num_rows:
        return {}, "", {}
    smap = analysis.stability_map(results, best_k=study.best_k)
    fig = analysis.plot_stability_map(smap, title=f"{study.name}: AGC λ × batch size")
    return {"stability_map.png": fig}, smap.summary(), {"map": smap}


def _drop_orphan_runs(parent: Tracker, trial_ids: set[str]) -> None:
    """A driver killed mid-study can leave a child run of a trial that Tune never recorded (it restarts under a
    new trial id on --resume). Such runs are still RUNNING and have no results row: delete them so every trial
    appears once."""
    exp_id = parent.client.get_run(parent.run_id).info.experiment_id
    children = parent.client.search_runs(
        [exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}' and attributes.status = 'RUNNING'")
    for run in children:
        if run.data.tags.get("trial_id") not in trial_ids:
            parent.client.delete_run(run.info.run_id)
            print(f"removed MLflow run {run.info.run_id} of an interrupted trial that was rerun under a new id")


def finish(study: Study, table: storage.ResultsTable, parent: Tracker, wall: float) -> dict[str, Any]:
    """Analysis from the Parquet tables (all trials, resumed ones included), written beside the results and
    logged on the parent MLflow run."""
    import pyarrow.parquet as pq

    results, epochs = table.read(), table.read_epochs()
    _drop_orphan_runs(parent, set(results.column("trial_id").to_pylist()) if results.num_rows else set())
    figures, text, extra = (study.analyze or map_analysis)(study, results, epochs)
    summary = summary_text(study, results, text, wall)
    out: dict[str, Any] = {"results": results, "epochs": epochs, "wall_time_s": wall, "dir": study.study_dir,
                           "parent_run_id": parent.run_id, "summary": summary, "map": None, **extra}
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: Path(tmp) / name for name in [*figures, "summary.txt", "results.parquet"]}
        for name, fig in figures.items():
            fig.savefig(files[name], dpi=130, bbox_inches="tight")
            analysis.close(fig)
        files["summary.txt"].write_text(summary)
        pq.write_table(results, files["results.parquet"])
        for name, p in files.items():
            fs, path = storage.resolve(storage.uri.join(study.study_dir, name))
            storage.uri.write_bytes_atomic(fs, path, p.read_bytes())
            parent.log_artifact(p)
        out["files"] = {name: storage.uri.join(study.study_dir, name) for name in files}
    statuses = results.column("status").to_pylist() if results.num_rows else []
    parent.log_metrics({"trials": results.num_rows, "wall_time_s": wall,
                        **{f"trials_{s}": statuses.count(s) for s in STATUSES}}, step=0)
    parent.end("completed")
    return out


STATUSES = ("completed", "diverged", "failed", "stopped")


def summary_text(study: Study, results, analysis_text: str, wall: float) -> str:
    statuses = results.column("status").to_pylist() if results.num_rows else []
    lines = [f"study {study.name}: {results.num_rows} trials in {wall / 60:.1f} min ("
             + ", ".join(f"{s} {statuses.count(s)}" for s in STATUSES) + ")"]
    if analysis_text:
        lines.append(analysis_text)
    lines.append(f"outputs: {study.study_dir}/ (results/ Parquet, figures, summary.txt)")
    uri = study.tracking_uri
    lines.append(f"MLflow: experiment '{study.experiment}' — see it with: mlflow ui --backend-store-uri {uri}"
                 if not uri.startswith("http") else f"MLflow: experiment '{study.experiment}' at {uri}")
    return "\n".join(lines)


def add_study_args(p, preset_names) -> None:
    g = p.add_argument_group("study")
    g.add_argument("--preset", default="laptop", choices=preset_names, help="preset of fixed and grid values")
    g.add_argument("--smoke-test", action="store_true", help="tiny model, one trial, a few steps")
    g.add_argument("--name", default=None, help="study name (MLflow experiment and output folder)")
    g.add_argument("--output", default=None,
                   help="where results go: local path, s3://, gs:// (default <project>/results)")
    g.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                                                        "sqlite:///<project>/mlflow.db)")
    g.add_argument("--trials-per-cell", type=int, default=None, help="Optuna trials per cell")
    g.add_argument("--seeds", type=int, default=None, help="seeds per nuisance setting")
    g.add_argument("--best-k", type=int, default=None, help="cell score = mean of the best k seeds")
    g.add_argument("--seed", dest="study_seed", type=int, default=None,
                   help="seed of the search; trial seeds are seed, seed+1, … per nuisance setting")
    g.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: fits the cluster)")
    g.add_argument("--asha", action="store_true", help="ASHA early stopping of poor trials")
    g.add_argument("--resume", action="store_true", help="continue an interrupted study")
    g.add_argument("--lr-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="search range of base_lr (per 256 examples)")


def build_study(name: str, scientific: dict, nuisance: dict, fixed: TrainConfig, args, defaults: dict,
                analyze=None, options: dict | None = None) -> Study:
    """Preset values, then command-line overrides."""
    from studies.tracking import absolute_tracking_uri, default_tracking_uri

    def pick(flag, key):
        v = getattr(args, flag, None)
        return defaults.get(key) if v is None else v

    if args.lr_range:
        nuisance = {**nuisance, "base_lr": (args.lr_range[0], args.lr_range[1], True)}
    output = args.output or runner.default_storage_path()
    if "://" not in output:
        output = str(Path(output).resolve())
    return Study(
        name=args.name or name, scientific=scientific, nuisance=nuisance, fixed=fixed,
        trials_per_cell=pick("trials_per_cell", "trials_per_cell") or 1, seeds=pick("seeds", "seeds") or 1,
        best_k=pick("best_k", "best_k"), centre=defaults.get("centre"), seed=pick("study_seed", "seed") or 0,
        output=output,
        tracking_uri=absolute_tracking_uri(args.tracking_uri) if args.tracking_uri else default_tracking_uri(),
        max_concurrent=pick("max_concurrent", "max_concurrent"), asha=args.asha or defaults.get("asha", False),
        resume=args.resume, analyze=analyze, options=options or {},
    )




def parse_grid_value(s: str) -> float | None:
    return None if s.lower() in ("none", "off", "no") else float(s)


def run_cli(name: str, presets: dict[str, dict], argv: list[str] | None, doc: str,
            grid_flags: dict[str, tuple[type, str]], analyze=None,
            options: dict[str, tuple[type, str]] | None = None) -> dict[str, Any]:
    """Shared command line of the study scripts: preset → flags → Study → run → console summary.
    `grid_flags` maps a scientific axis to (value parser, help); each becomes --<axis>s V [V ...].
    `options` are study-specific settings (name -> (type, help)), defaulted from preset["options"]."""
    import argparse

    from studies import cli

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, list(presets))
    g = p.add_argument_group("grid (scientific parameters)")
    for axis, (conv, hlp) in grid_flags.items():
        g.add_argument(f"--{axis.replace('_', '-')}s", dest=f"grid_{axis}", type=conv, nargs="+", default=None,
                       help=hlp)
    for opt, (conv, hlp) in (options or {}).items():
        g.add_argument(f"--{opt.replace('_', '-')}", dest=f"opt_{opt}", type=conv, default=None, help=hlp)
    skip = (*grid_flags, "seed", *(("clip_threshold",) if "lambda" in grid_flags else ()))
    cli.add_train_args(p, skip=skip)
    args = p.parse_args(argv)
    preset = presets["smoke" if args.smoke_test else args.preset]
    try:
        fixed = TrainConfig(**{**preset["fixed"], **cli.overrides_from_args(args)})
        scientific = {axis: getattr(args, f"grid_{axis}") or preset["grid"][axis] for axis in grid_flags}
        opts = {o: v if (v := getattr(args, f"opt_{o}")) is not None else preset.get("options", {}).get(o)
                for o in (options or {})}
        study = build_study(name, scientific, preset["nuisance"], fixed, args, preset, analyze, opts)
    except ValueError as e:
        p.error(str(e))
    print(f"study {study.name}: {len(study.cells())} cells × {study.trials_per_cell} trials × {study.seeds} seed(s) "
          f"= {study.n_trials} trials; output {study.study_dir}; MLflow {study.tracking_uri}", flush=True)
    out = run_study(study)
    print(out["summary"], flush=True)
    return out

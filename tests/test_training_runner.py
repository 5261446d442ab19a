"""The runner: in-process vs TorchTrainer (same numbers), DDP, streaming, failures sorted."""
import math
import time

import pytest
import torch

from studies.training import runner
from studies.training.config import TrainConfig
from studies.training.tracking import Tracker
from tests.helpers import tiny_cfg


def _losses(summary):
    return [h["train_loss"] for h in summary.history]


def test_failed_run_is_tracked(tmp_path, tiny_data):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_cfg(dataset=str(tmp_path / "no-such-shards"))
    out = runner.train_and_track(cfg, runner.RunRecord(uri, "t", "broken"),
                                 runner.Launch(str(tmp_path / "nowhere"), str(tmp_path), in_process=True))
    assert out.status == "failed" and out.error
    run = Tracker(uri, out.mlflow_run_id).client.get_run(out.mlflow_run_id)
    assert run.info.status == "FAILED" and run.data.tags["status"] == "failed"


def test_a_full_run_records_mlflows_system_metrics_dataset_and_its_verdict_in_its_name(tmp_path, tiny_data,
                                                                                     monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's own knob; 10 s by default
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = runner.train_and_track(tiny_cfg(max_steps=40),
                                 runner.RunRecord(uri, "t", "b64 full", system_metrics=True,
                                                  source={"mlflow.source.name": "studies/train.py"}),
                                 runner.Launch(tiny_data, str(tmp_path), in_process=True))
    run = Tracker(uri, out.mlflow_run_id).client.get_run(out.mlflow_run_id)
    assert any(k.startswith("system/cpu") for k in run.data.metrics), sorted(run.data.metrics)
    assert run.info.run_name == {"trained": "✓", "stalled": "≈"}[out.verdict] + " b64 full"
    assert run.data.tags["verdict"] == out.verdict and run.data.tags["mlflow.source.name"] == "studies/train.py"
    (ds,) = run.inputs.dataset_inputs
    assert tiny_data.rstrip("/").endswith(ds.dataset.name) and len(ds.dataset.digest) == 16


@pytest.mark.ray
def test_ddp_two_workers_match_one_and_land_in_mlflow(ray_cluster, tmp_path, tiny_data):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_cfg(seed=1, max_steps=16, num_workers=2, batch_size=64)
    ddp = runner.train_and_track(cfg, runner.RunRecord(uri, "ddp", "ddp2"),
                                 runner.Launch(tiny_data, str(tmp_path / "ray"), in_process=False))
    assert ddp.status == "completed", ddp.error
    one = runner.run_in_process(cfg.replace(num_workers=1), tiny_data, quiet=True)
    # Same global batch, same samples per step: 1×64 and 2×32 follow the same curve (float reduction order only).
    assert _losses(ddp) == pytest.approx(_losses(one), rel=2e-3)
    assert ddp.final_val_acc == pytest.approx(one.final_val_acc, abs=2 / 128)

    run = Tracker(uri, ddp.mlflow_run_id).client.get_run(ddp.mlflow_run_id)
    assert run.data.params["num_workers"] == "2" and run.data.params["batch_size"] == "64"
    assert run.data.params["clipping"] == "agc" and float(run.data.params["peak_lr"]) == pytest.approx(cfg.lr)
    for m in ("loss/train", "loss/train_step", "top1/val", "stability/grad_norm_before_clip", "opt/lr",
              "stability/grad_norm_after_clip", "stability/agc_clipped_frac", "throughput/images_per_sec",
              "stability/grad_noise_scale", "stability/agc_clipped_frac/stem"):
        assert m in run.data.metrics, m
    assert not {"step", "epoch", "train_loss"} & set(run.data.metrics)  # the x axis is not a metric
    assert run.data.tags["verdict"] == ddp.verdict and "status" not in run.data.tags  # one status: the verdict
    assert run.info.status == "FINISHED" and ddp.verdict in run.data.tags["mlflow.note.content"].split("\n")[0]
    arts = {a.path for a in Tracker(uri, ddp.mlflow_run_id).client.list_artifacts(ddp.mlflow_run_id)}
    assert {"config.json", "final_metrics.json", "curves.png"} <= arts


@pytest.mark.ray
def test_in_process_equals_torch_trainer_and_resume_after_kill(ray_cluster, tmp_path, tiny_data):
    # 512 images / 64 = 8 steps per epoch; 3 epochs, checkpoint every epoch, the worker dies once at step 13.
    cfg = tiny_cfg(seed=2, max_steps=24, checkpoint_every_epochs=1)
    ref = runner.run_in_process(cfg, tiny_data, quiet=True)
    trainer = runner.run_torch_trainer(cfg, tiny_data, name="one", storage_path=str(tmp_path / "ray"))
    assert _losses(trainer) == _losses(ref)
    assert trainer.final_val_acc == ref.final_val_acc

    resumed = runner.run_torch_trainer(cfg.replace(max_failures=1), tiny_data, name="killed",
                                       storage_path=str(tmp_path / "ray"), test_crash=(13, str(tmp_path / "crashed")))
    assert (tmp_path / "crashed").exists()  # it really died once
    assert resumed.status == "completed" and resumed.steps == 24
    assert _losses(resumed) == _losses(ref)
    assert resumed.final_val_acc == ref.final_val_acc


@pytest.mark.ray
def test_streaming_through_ray_data_to_two_workers(ray_cluster, tmp_path, tiny_data):
    # Ray Data decodes on CPU workers; each Train worker streams its own half of every epoch (storage.EpochStream).
    # Half a CPU per Train worker leaves the 2-CPU test cluster room for the Ray Data decode tasks.
    cfg = tiny_cfg(seed=5, num_workers=2, cpus_per_worker=0.5, loader="streaming", max_steps=16)
    out = runner.run_torch_trainer(cfg, tiny_data, name="stream", storage_path=str(tmp_path / "ray"))
    assert out.status == "completed" and out.steps == 16
    assert all(math.isfinite(h["train_loss"]) for h in out.history)
    assert out.history[-1]["train_loss"] < out.history[0]["train_loss"] + 0.05


def test_bad_config_is_recorded_failed_but_infrastructure_faults_are_raised_for_retry(tmp_path, tiny_data,
                                                                                        monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def run(exc):
        def boom(*a, **k):
            raise exc
        monkeypatch.setattr(runner, "run_in_process", boom)
        return runner.train_and_track(tiny_cfg(), runner.RunRecord(uri, "t", "r"),
                                      runner.Launch(tiny_data, str(tmp_path), in_process=True))

    out = run(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))  # a bug or a bad config: same again
    assert out.status == "failed" and "shapes" in out.error
    for exc in (ConnectionError("tracking server unreachable"), TimeoutError("storage timed out")):
        with pytest.raises(type(exc)):  # the machines' fault: Tune retries the trial
            run(exc)
    from ray.exceptions import ActorDiedError

    assert runner.is_infrastructure(ActorDiedError()) and not runner.is_infrastructure(ValueError("bad lr"))


def test_one_gpu_trials_run_in_the_tune_actor_holding_their_gpu_share():

    gpu = TrainConfig(use_gpu=True, gpus_per_worker=0.25, cpus_per_worker=2)
    assert runner.runs_in_process(gpu)  # no worker group per run: the actor (and its device copy) is reused
    assert runner.trial_resources(gpu) == {"CPU": 2, "GPU": 0.25}
    assert runner.trial_resources(TrainConfig()) == {"CPU": 1}
    for cfg in (gpu.replace(num_workers=2), gpu.replace(max_failures=1)):  # DDP or Train-level recovery
        assert not runner.runs_in_process(cfg) and runner.trial_resources(cfg)["CPU"] == 0


class FlakyStore:
    """A filesystem whose shard reads fail `times` times with an object store's transport error, then work."""

    def __init__(self, fs, times: int, error: str):
        self.fs, self.times, self.error = fs, times, error

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def open_input_stream(self, path):
        if path.endswith(".parquet") and self.times > 0:
            self.times -= 1
            raise OSError(self.error)
        return self.fs.open_input_stream(path)


@pytest.mark.parametrize("error, retried", [
    ("When reading information for key 'train-00000.parquet': AWS Error NETWORK_CONNECTION during GetObject", True),
    ("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate", True),
    ("AWS Error ACCESS_DENIED during GetObject operation: Access Denied", False),
])
def test_a_storage_outage_while_reading_a_shard_is_retried_a_refusal_is_recorded(tmp_path, monkeypatch, error,
                                                                                 retried):
    import storage
    import storage.datasets

    uri = storage.prepare_dataset("synthetic", str(tmp_path / "data"), seed=0, n_train=256, n_val=64).uri
    real, flaky = storage.datasets.resolve, {}

    def resolve(u):  # the dataset's filesystem, flaky for one shard read
        fs, path = real(u)
        return flaky.setdefault("fs", FlakyStore(fs, 1, error)), path

    monkeypatch.setattr(storage.datasets, "resolve", resolve)

    def run():
        return runner.train_and_track(tiny_cfg(max_steps=2), runner.RunRecord(f"sqlite:///{tmp_path}/m.db", "t", "r"),
                                      runner.Launch(uri, str(tmp_path), in_process=True))

    if retried:
        with pytest.raises(storage.StorageUnavailable, match="NETWORK_CONNECTION|SLOW_DOWN"):
            run()  # raised, so Tune retries the trial; no failed row
        assert run().status == "completed"  # the store is back: the retry trains
    else:
        out = run()
        assert out.status == "failed" and "ACCESS_DENIED" in out.error  # would fail again: recorded


@pytest.mark.ray
def test_corrupt_data_under_ray_datas_wrapper_is_failed_naming_the_shard(tmp_path, ray_cluster):
    import os

    import storage

    m = storage.prepare_dataset("synthetic", str(tmp_path / "data"), seed=0, n_train=256, n_val=64,
                                rows_per_shard=128)
    shard = os.path.join(m.uri, m.shards["train"][1]["path"])
    blob = bytearray(open(shard, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(blob))
    out = runner.train_and_track(tiny_cfg(max_steps=8, loader="streaming"),
                                 runner.RunRecord(f"sqlite:///{tmp_path}/m.db", "t", "r"),
                                 runner.Launch(m.uri, str(tmp_path), in_process=True))
    assert out.status == "failed" and "train-00001.parquet: checksum mismatch" in out.error  # not retried forever


def test_faults_are_sorted_by_their_cause_under_rays_wrappers():
    from ray.exceptions import ActorDiedError, RayTaskError

    import storage

    def wrapped(cause):  # what a Ray task (e.g. a Ray Data read) raises for an error inside it
        return RayTaskError("read_shards", "traceback", cause).as_instanceof_cause()

    corrupt = storage.StorageError("train-00001.parquet: checksum mismatch (corrupt or truncated shard)")
    outage = storage.StorageUnavailable("train-00001.parquet: cannot read (AWS Error NETWORK_CONNECTION)")
    assert not runner.is_infrastructure(wrapped(corrupt)) and runner.is_infrastructure(wrapped(outage))
    assert runner.root_cause(wrapped(corrupt)) is corrupt
    assert runner.is_infrastructure(ActorDiedError()) and not runner.is_infrastructure(wrapped(ValueError("bad")))
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    shared, own = TrainConfig(use_gpu=True, gpus_per_worker=0.25), TrainConfig(use_gpu=True)
    assert runner.is_infrastructure(oom, shared) and not runner.is_infrastructure(oom, own)
    assert runner.is_infrastructure(wrapped(oom), shared)


def test_the_ray_train_run_name_is_ascii_and_keyed_by_the_config():
    # A Ray job on a C-locale node failed in Ray Train's controller on the 'λ' of the MLflow run name
    # ("'ascii' codec can't encode character '\u03bb'"): the Ray Train name is its ASCII spelling + fingerprint.
    a, b = tiny_cfg(), tiny_cfg(base_lr=0.4)
    name = runner.ray_run_name("b1024 λ0.16 lr3.2 full s0", a)
    name.encode("ascii")  # raises on any non-ASCII character
    assert name == f"b1024_lambda0.16_lr3.2_full_s0-{a.fingerprint()}"
    assert runner.ray_run_name("b1024 λ0.16 lr3.2 full s0", b) != name  # another config, another checkpoint dir
    assert runner.ray_run_name("≈ ✓", a) == f"run-{a.fingerprint()}"


def test_train_py_prints_only_what_a_user_needs(tmp_path):
    """A two-worker run printed ~50 lines, most of them Ray's (placement-group cleaner tracebacks, a
    TrainingReport repr per rank, core_worker notes) and the epoch line twice. Now: the run's own lines, rank 0's
    epoch lines once each (relayed from the worker), the outcome and the link."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("RAY_", "NFNET_LAB_RAY"))}
    env.update(RAY_USAGE_STATS_ENABLED="0", NFNET_LAB_DATA=str(tmp_path / "data"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "studies/train.py"), "--num-workers", "2", "--epochs", "2", "--batch-size", "64",
         "--model-overrides", '{"width": 8, "depth": 1}', "--dataset-params", '{"n_train": 1024, "n_val": 128}',
         "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--storage-path", str(tmp_path / "ray")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    epochs = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in epochs] == ["1/2", "2/2"], out  # each once, from rank 0, unprefixed
    for noise in ("TrainingReport(", "PlacementGroupCleaner", "core_worker", "Traceback", "pid="):
        assert noise not in out, (noise, out)
    assert "status: completed" in out and "workflowType=machine_learning" in out
    # Also there: Ray's token-auth warning, the dataset's two preparation lines, MLflow's two lines creating a
    # new store.
    assert len(out.strip().splitlines()) <= 14, out


@pytest.mark.ray
def test_one_rank_stuck_before_the_all_reduce_ends_the_whole_group_which_resumes(ray_cluster, tmp_path, tiny_data):
    """Rank 1 of a two-worker run stops at step 13 (its step never returns) while rank 0 waits in the gradient
    all-reduce (issue 31, item 5): both watchdogs end their processes within the stall limit, the group restarts
    from the last checkpoint and the run ends whole; the stalls are kept with the rank and where each was."""
    from studies.training.watchdog import Watch, read_stalls

    # 20 s: a fixed limit holds for the set-up too, which took 8.3 s on a loaded 2-core machine (a fresh-clone suite:
    # both ranks ended at step 0 and the one restart was spent before the real stall at step 13)
    cfg = tiny_cfg(seed=3, num_workers=2, max_steps=24, checkpoint_every_epochs=1, max_failures=1, stall_timeout=20)
    t0 = time.time()
    out = runner.run_torch_trainer(cfg, tiny_data, name="stuck", storage_path=str(tmp_path / "ray"),
                                   test_crash=(13, str(tmp_path / "stuck"), 1),
                                   watch=Watch(incidents=str(tmp_path / "incidents")))
    took = time.time() - t0
    assert (tmp_path / "stuck").exists()  # rank 1 really stopped once
    assert out.status == "completed" and out.steps == 24
    stalls = read_stalls(str(tmp_path / "incidents"))
    assert stalls and all(s["step"] == 13 and s["limit_s"] == 20 for s in stalls)
    assert {s["where"] for s in stalls} <= {"step or its gradient all-reduce"}
    print(f"a two-worker run with a stuck rank: {len(stalls)} stall(s) kept, whole run {took:.0f} s")
    assert took < 200


def test_a_local_ray_that_fails_to_start_is_started_once_more_its_leftovers_ended(monkeypatch, capsys):
    # Injected: the first ray.init fails as Ray's does when the raylet exits for a slow dashboard agent, after
    # having started processes of its own (here a sleeping child); the second start succeeds.
    import subprocess
    import sys

    import ray

    calls, children = [], []

    def flaky_init(**kw):
        calls.append(kw)
        if len(calls) == 1:
            children.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "init", flaky_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    runner.start_local_ray(num_cpus=1, include_dashboard=False)
    assert calls == [{"num_cpus": 1, "include_dashboard": False}] * 2
    assert children[0].wait(timeout=10) != 0  # the failed start's process was ended, not left running
    err = capsys.readouterr().err
    assert "local Ray did not start (The current node timed out during startup." in err and "2 of 2" in err

    # A second failure is raised (nothing waits or loops), and bad arguments are never retried.
    calls.clear()
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or (_ for _ in ()).throw(Exception("down")))
    with pytest.raises(Exception, match="down"):
        runner.start_local_ray(num_cpus=1)
    assert len(calls) == 2
    calls.clear()
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(ValueError):
        runner.start_local_ray(num_cpus=-1)
    assert len(calls) == 1

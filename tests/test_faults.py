"""Faults injected into a running study: the driver killed (SIGKILL, mid-scan and mid-full), stopped (SIGTERM),
interrupted (SIGINT), the results disk full (ENOSPC) then the tracking server down (a lost trial process or node:
tests/test_cluster.py). After each, the study is resumed (or recovers by itself) and must hold exactly one row and
one MLflow run per trial, none left RUNNING, with the numbers of an uninterrupted run."""
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from studies import agc_lambda
from studies.sweep import design
from studies.training.config import TrainConfig
from tests.services import free_port, http, stop, wait_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shared-data"))  # one data root: the same configs, the same trial keys


def flags(tmp_path, name, data_root, *extra, tracking_uri=None):
    # 10 runs: 6 scans (lr 0.4 and 1.6 train at both λs, 25.6 diverges), 2 refinements, 2 full runs. Batch 64, not
    # 32: the smoke scan budget (8192 examples) in 160 steps instead of 320, for the reference and each fault.
    # MLflow: the test's sqlite store, or a server over it (TrackingServer).
    return ["--smoke-test", "--output", str(tmp_path / "out"),
            "--tracking-uri", tracking_uri or f"sqlite:///{tmp_path}/mlflow.db",
            "--data-root", data_root, "--name", name, "--batch-sizes", "64", "--lambdas", "0.04", "none",
            "--lrs", "0.4", "1.6", "25.6", "--max-steps", "48", "--full-top", "1", "--max-concurrent", "1", *extra]


def table(tmp_path, name):
    return design.Study(name, design.Preset(grid={"batch_size": [1]}, fixed={}), TrainConfig(),
                        output=str(tmp_path / "out")).table()


def numbers(results):
    keep = ("trial_key", "phase", "status", "verdict", "steps", "diverged_step", "best_val_acc", "final_train_loss")
    return sorted(tuple(r[k] for k in keep) for r in results.to_pylist())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root, ray_cluster):
    tmp = tmp_path_factory.mktemp("reference")
    out = agc_lambda.main(flags(tmp, "ref", data_root))
    assert out["complete"] and out["results"].num_rows >= 7
    assert "full" in out["results"].column("phase").to_pylist()  # something trained in the scan
    return numbers(out["results"])


def check_whole(tmp_path, name, reference):
    from mlflow.tracking import MlflowClient

    res = table(tmp_path, name).read()
    keys = res.column("trial_key").to_pylist()
    assert len(keys) == len(set(keys))  # nothing duplicated
    assert numbers(res) == reference  # nothing lost, and the same numbers as an uninterrupted run
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("role") == "study"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(ch.data.tags["trial_key"] for ch in children) == sorted(keys)
    assert all(ch.info.status != "RUNNING" for ch in children)


def run_until(tmp_path, name, data_root, ready, sig, *extra, cluster=None):
    """Start the study as its own process, send `sig` once it has begun a phase (its signal handling is in place)
    and `ready(rows)` holds; -> what it printed. The process starts its own local Ray (a laptop: a SIGKILL takes
    that Ray with it), or with `cluster` (the test session's Ray) joins that running cluster at RAY_ADDRESS, as a
    driver on a cluster's head does: the cluster outlives the driver, and Ray ends the dead driver's trials."""
    cmd = [sys.executable, str(ROOT / "studies" / "agc_lambda.py"), *flags(tmp_path, name, data_root, *extra)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(joining(cluster) if cluster is not None else {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    t = table(tmp_path, name)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            # Rows alone are not enough: a trial of a killed driver may still add one before Ray reaps it.
            if any(ln.startswith(("scan:", "refine:", "full:")) for ln in lines):
                try:
                    if ready(t.read().to_pylist()):
                        break
                except Exception:
                    pass
            time.sleep(0.3)
        assert proc.poll() is None, "the study finished before the fault:\n" + "".join(lines)[-4000:]
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        else:
            os.kill(proc.pid, sig)
        proc.wait(timeout=240)
        reader.join(timeout=60)
        return "".join(lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


RESUME_S = 400  # the whole resumed study; a few runs take ~30 s here


def resume(tmp_path, name, data_root, capsys, tracking_uri=None):
    """--resume in this process, on the test session's Ray (what a user's next command does, without a process and
    a local Ray of its own to start: the faults are in the runs before it); -> what it printed. Bounded as the
    process it replaced was: past RESUME_S it raises in the study's driver loop."""

    def too_long(*_):
        raise TimeoutError(f"--resume of {name!r} still running after {RESUME_S} s")

    capsys.readouterr()
    before = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(RESUME_S)
    try:
        out = agc_lambda.main(flags(tmp_path, name, data_root, "--resume", tracking_uri=tracking_uri))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
    printed = capsys.readouterr().out
    assert out["complete"], printed[-3000:]
    return printed


def test_killed_stopped_interrupted_killed_then_resumed_to_the_uninterrupted_numbers(tmp_path, data_root, reference,
                                                                                       capsys, ray_cluster):
    # One study through every way a driver stops, each resumed: SIGKILL mid-scan (an OOM kill, a lost VM: the
    # driver and its local Ray), SIGTERM (a scheduler or `ray job stop`), Ctrl-C, then SIGKILL again once the scan
    # is done (mid-full). The last three are drivers on a running cluster (the test session's Ray): Ray ends a
    # stopped driver's trials, none of which may leave a row twice; and no local Ray to start (~20 s each here).
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    scans = sum(1 for r in reference if r[1] == "scan")
    run_until(tmp_path, "faults", data_root, lambda r: len(r) >= 2, signal.SIGKILL)
    rows = table(tmp_path, "faults").read().num_rows
    assert 2 <= rows < scans
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Counted again now: the last trials of a SIGKILLed driver's Ray can still add their rows as it dies (in a
        # slow CI run they finished the whole scan).
        rows = table(tmp_path, "faults").read().num_rows
        out = run_until(tmp_path, "faults", data_root, lambda r, n=rows: len(r) >= n + 1, sig, "--resume",
                        cluster=ray_cluster)
        # finished trials are not rerun: the phase line counts them, or the scan, all done, is not run at all
        assert "already done" in out or (rows >= scans and "scan:" not in out), out[-2000:]
        assert "INTERRUPTED" in out and "--resume" in out, out[-2000:]
        assert (tmp_path / "out" / "faults" / "summary.txt").read_text().startswith("INTERRUPTED")
        (parent,) = [r for r in c.search_runs([c.get_experiment_by_name("faults").experiment_id])
                     if r.data.tags.get("role") == "study"]
        assert parent.info.status == "KILLED" and parent.data.tags["status"] == "interrupted"
        now = table(tmp_path, "faults").read().num_rows
        assert rows < now < len(reference)  # each run went on from the last one's rows
        rows = now
    # Mid-full: once the first full run's row is in (the scan may have ended in the Ctrl-C'd run already).
    run_until(tmp_path, "faults", data_root, lambda r: len(r) > scans, signal.SIGKILL, "--resume", cluster=ray_cluster)
    assert rows < table(tmp_path, "faults").read().num_rows < len(reference)
    out = resume(tmp_path, "faults", data_root, capsys)
    assert "scan:" not in out and "full:" in out  # only full runs were left
    check_whole(tmp_path, "faults", reference)


class TrackingServer:
    """`mlflow server` over the test's sqlite store, on one port for its whole life: blip_when(ready) takes it away
    for a few seconds (a restart, a network blip) once `ready(rows)` holds, then starts it again on that port."""

    def __init__(self, tmp_path: Path):
        self.tmp, self.port = tmp_path, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.outage: list[float] = []  # when it went down, when it was back
        self.rows_at_outage = 0  # the study's rows when it went down
        self.procs: list[subprocess.Popen] = []  # every server process started, ended on exit
        self.thread: threading.Thread | None = None

    def _start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.tmp}/mlflow.db",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        proc = subprocess.Popen(cmd, cwd=self.tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs.append(proc)
        wait_for(lambda: http(f"{self.uri}/health")[0] == 200, "mlflow server", 90, proc)

    def blip_when(self, ready: Callable[[int], bool], name: str) -> None:
        def blip():
            t = table(self.tmp, name)
            deadline = time.time() + 200
            while time.time() < deadline:
                try:
                    self.rows_at_outage = t.read().num_rows
                    if ready(self.rows_at_outage):
                        break
                except Exception:
                    pass
                time.sleep(0.3)
            os.killpg(self.procs[-1].pid, signal.SIGKILL)
            self.procs[-1].wait()
            self.outage.append(time.time())
            time.sleep(4)
            self._start()
            self.outage.append(time.time())

        self.thread = threading.Thread(target=blip, daemon=True)
        self.thread.start()

    def __enter__(self) -> "TrackingServer":
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.thread is not None:
            self.thread.join(timeout=120)
        for p in self.procs:
            stop(p)


# Loaded by every Python process of the study (driver and Ray workers, through PYTHONPATH; the workers' from the
# job's runtime env, see joining): the disk holding the results folder fills up once it holds NFNET_TEST_FULL_AFTER
# parts. A write there then lands half its bytes and fails with ENOSPC, as on a real full disk.
FULL_DISK = '''
import builtins, errno, glob, os

_open, _folder, _after = builtins.open, os.environ["NFNET_TEST_FULL_FOLDER"], int(os.environ["NFNET_TEST_FULL_AFTER"])


class _HalfWritten:
    def __init__(self, f):
        self.f = f

    def write(self, b):
        self.f.write(b[:len(b) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _full_disk_open(file, mode="r", *a, **kw):
    f = _open(file, mode, *a, **kw)
    if isinstance(file, str) and file.startswith(_folder + "/") and any(c in mode for c in "wax") and \\
            len(glob.glob(_folder + "/part-*.parquet")) >= _after:
        return _HalfWritten(f)
    return f


builtins.open = _full_disk_open
'''


def test_results_disk_full_then_the_tracking_server_down_mid_resume_lose_nothing(tmp_path, data_root, reference,
                                                                                 capsys, ray_cluster):
    # ENOSPC on the results folder after 2 rows (issue 31, items 3 and 5): the study stops within the driver's
    # probe interval plus a margin, with one line naming the folder and the fix; nothing written is lost or half
    # there, no MLflow run is left RUNNING; once space is freed, --resume ends with the uninterrupted rows.
    # The study logs to a tracking server, which goes away for a few seconds in the middle of the resume (a
    # restart, a network blip): training goes on, MLflow's client retries, metrics are buffered; every run ends up
    # on the server once, none left RUNNING. (Two faults in one study: each alone would rerun the whole study.)
    from mlflow.tracking import MlflowClient

    from studies.sweep.run import PROBE_S

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FULL_DISK)
    folder = tmp_path / "out" / "full" / "results" / "results"
    full = {"NFNET_TEST_FULL_FOLDER": str(folder), "NFNET_TEST_FULL_AFTER": "2",
            "PYTHONPATH": os.pathsep.join([str(inject), *filter(None, [os.environ.get("PYTHONPATH")])])}
    # On the session's Ray: the driver and its trials both get the full disk
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **full, **joining(ray_cluster, workers_env=full)}
    with TrackingServer(tmp_path) as server:
        argv = flags(tmp_path, "full", data_root, tracking_uri=server.uri)
        proc = subprocess.Popen([sys.executable, str(ROOT / "studies" / "agc_lambda.py"), *argv], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
        reader.start()
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None and len(list(folder.glob("part-*.parquet"))) < 2:
                time.sleep(0.2)
            full_at = time.time()  # from here on every write to the folder fails
            proc.wait(timeout=PROBE_S[True] + 90)
            took = time.time() - full_at
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=30)
        text = "".join(out)
        assert proc.returncode == 2, text[-3000:]
        assert text.strip().splitlines()[-1] == (
            f"agc_lambda.py: error: cannot write {folder}: no space left on the device (ENOSPC); free space there, "
            "then continue the study with --resume (the rows written so far are kept)"), text[-3000:]
        print(f"stopped {took:.1f} s after the disk filled up")
        assert took < PROBE_S[True] + 60  # the probe interval, plus a margin for Tune to stop a trial on 2 busy cores
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("part-")) == []  # no temp, no probe
        assert table(tmp_path, "full").read().num_rows == 2  # what was written is all there, and whole
        c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        runs = c.search_runs([c.get_experiment_by_name("full").experiment_id], max_results=1000)
        assert runs and all(r.info.status != "RUNNING" for r in runs)
        (parent,) = [r for r in runs if r.data.tags.get("role") == "study"]
        assert parent.info.status == "KILLED" and parent.data.tags["status"] == "interrupted"

        server.blip_when(lambda rows: rows >= 4, "full")  # once 2 of the resume's 8 runs are done
        resume(tmp_path, "full", data_root, capsys, server.uri)  # space freed (no injection): the rest of it runs
    assert len(server.outage) == 2 and server.outage[1] - server.outage[0] >= 4  # it really was down,
    assert 4 <= server.rows_at_outage < len(reference)  # in the middle of the resume
    assert "failed" not in table(tmp_path, "full").read().column("status").to_pylist()
    check_whole(tmp_path, "full", reference)


def joining(cluster, workers_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a study process that joins the running `cluster` (the test session's Ray) at RAY_ADDRESS,
    as a driver on a cluster's head does, instead of starting a local Ray of its own (~20 s on 2 busy cores). It is
    given the token this process's cluster runs with, not left to read ~/.ray/auth_token: on a fresh machine two
    test processes starting their clusters at once can each write a new token there. The cluster's workers do not
    inherit the driver's environment: `workers_env` (a fault injected through PYTHONPATH) reaches the study's
    workers as its job's runtime env, the way `ray job submit --runtime-env` hands one to its driver."""
    import json

    from ray._raylet import AuthenticationTokenLoader

    token = AuthenticationTokenLoader.instance().get_raw_token()
    env = {"RAY_ADDRESS": cluster.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token.decode() if isinstance(token, bytes) else token}
    if workers_env:
        env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps({"runtime_env": {"env_vars": workers_env}})
    return env


def run_study(tmp_path, argv, env_extra=None, timeout=400):
    """The study as its own process; -> (exit code, what it printed, seconds)."""
    cmd = [sys.executable, str(ROOT / "studies" / "agc_lambda.py"), *argv]
    t0 = time.time()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})},
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr, time.time() - t0


def test_a_shard_read_that_never_returns_ends_the_run_and_is_recorded_hung(tmp_path, ray_cluster):
    """The train shard is a named pipe nobody writes (a read that never returns, like a stuck network filesystem;
    issue 31, items 1, 2 and 5): each try of the run ends within the stall limit, the driver says what it waits
    for meanwhile, and once the retries are spent the run has a `failed` row saying where it hung; no MLflow run is
    left RUNNING and the study ends."""
    from mlflow.tracking import MlflowClient

    import storage

    uri = storage.prepare_dataset("synthetic", str(tmp_path / "data"), seed=0, n_train=512, n_val=128,
                                  image_size=16).uri
    (shard,) = storage.open_dataset(uri).shard_paths("train")
    os.remove(shard)
    os.mkfifo(shard)
    argv = ["--smoke-test", "--output", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--name", "pipe", "--dataset", uri, "--dataset-params", "{}", "--batch-sizes", "32", "--lambdas", "0.04",
            "--lrs", "0.4", "--max-concurrent", "1", "--stall-timeout", "3"]
    # NFNET_LAB_QUIET_S is read by the driver (its "waiting" lines), which a joining driver still gets
    code, text, took = run_study(tmp_path, argv, {"NFNET_LAB_QUIET_S": "2", **joining(ray_cluster)})
    assert code == 0, text[-3000:]
    print(f"a hung shard read: study ended after {took:.0f} s (3 tries × 3 s stall limit)")
    waits = [ln for ln in text.splitlines() if ln.startswith("waiting ")]
    named = [ln for ln in waits if "b32 λ0.04 lr0.4 scan s0" in ln]
    print("\n".join(named[:2]))
    assert named, text
    (row,) = table(tmp_path, "pipe").read().to_pylist()
    assert row["status"] == "failed" and row["error"].startswith(
        "hung: no step for 3 s at step 0 (scan, set-up and data read; stall limit 3 s); ended 3 time(s)"), row
    assert "failed (hung, retries spent): b32 λ0.04 lr0.4 scan s0: hung: no step" in text
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("pipe").experiment_id], max_results=100)
    assert all(r.info.status != "RUNNING" for r in runs)
    (child,) = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FAILED" and child.data.tags["error"].startswith("hung: no step for 3 s")
    assert took < 240


# Loaded by every Python process of the study (through PYTHONPATH, see joining): the first backward pass after the
# fourth of the process that trains first never returns (once in the whole study: a marker file), as a step stuck
# in a kernel, a driver call or a page-in.
SLEEPY_STEP = '''
import os, time
import torch

_backward, _calls = torch.Tensor.backward, [0]


def _sleepy_backward(self, *a, **kw):
    _calls[0] += 1
    marker = os.environ["NFNET_TEST_STUCK_MARKER"]
    if _calls[0] == 5 and not os.path.exists(marker):
        open(marker, "w").write(str(os.getpid()))
        time.sleep(3600)
    return _backward(self, *a, **kw)


torch.Tensor.backward = _sleepy_backward
'''


def test_a_step_that_never_returns_is_ended_and_retried_to_the_uninterrupted_numbers(tmp_path, data_root, reference,
                                                                                    ray_cluster):
    """One training step of the study hangs (issue 31, items 1 and 5): its run is ended after the stall limit,
    Tune retries the trial, and the study ends with the rows and MLflow runs of an uninterrupted one."""
    from studies.training.watchdog import read_stalls

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SLEEPY_STEP)
    marker = tmp_path / "stuck"
    env = {"NFNET_TEST_STUCK_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join([str(inject), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.update(joining(ray_cluster, workers_env=env))  # on the session's Ray; its trials get the injection too
    code, text, took = run_study(tmp_path, flags(tmp_path, "stuck", data_root, "--stall-timeout", "10"), env)
    assert code == 0, text[-3000:]
    assert marker.exists()  # it really hung once
    stalls = [s for d in (tmp_path / "out" / "stuck" / "incidents").iterdir() for s in read_stalls(str(d))]
    assert len(stalls) == 1 and stalls[0]["where"] == "step" and stalls[0]["limit_s"] == 10
    assert stalls[0]["idle_s"] < 10 + 5  # noticed within the limit and the watchdog's poll
    print(f"a hung step: ended after {stalls[0]['idle_s']:.1f} s, study {took:.0f} s")
    check_whole(tmp_path, "stuck", reference)

# `ray job submit` as documented in platform/README.md, against a real Ray head with token auth on.
# The head runs in its own temp dir and ports, and is talked to only through the CLI and HTTP from
# subprocesses, so an in-process ray.init() cluster of other tests in this session is left alone.
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def session_pids(sid: int) -> list[int]:
    """Processes in the session our `ray start` leads (start_new_session): ours, by id, never by name."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # field 6 of stat: session id
                pids.append(int(d.name))
    return pids


def ray_logs(tmp: Path) -> str:
    """The tails of the head's error logs, for a failure message."""
    out = []
    for f in sorted((tmp / "ray").glob("session_*/logs/*")):
        if f.suffix == ".err" or f.name.startswith(("raylet.out", "runtime_env_setup")):
            text = f.read_text(errors="replace").strip()
            if text:
                out.append(f"--- {f.name}\n{text[-1500:]}")
    return "\n".join(out)[-8000:]


def base_env(tmp: Path) -> dict[str, str]:
    # Drop any RAY_* of this pytest process (an in-process ray.init sets RAY_AUTH_MODE, maybe RAY_ADDRESS).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update({"PATH": f"{BIN}:{env.get('PATH', '')}", "RAY_TMPDIR": str(tmp),
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_TOKEN_PATH": str(tmp / "auth_token"),
                "NFNET_LAB_DATA": str(tmp / "data")})
    return env


@pytest.fixture
def ray_head():
    if not (BIN / "ray").exists() and not shutil.which("ray"):
        pytest.skip("the `ray` CLI is not installed (pip install 'ray[default]')")
    tmp = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    env = base_env(tmp)
    dash = free_port()
    log = tmp / "head.log"
    head = subprocess.Popen(
        ["bash", str(ROOT / "platform/ray/start-head.sh"), "--block", "--port", "0", "--num-cpus", "2",
         "--temp-dir", str(tmp / "ray"), "--dashboard-agent-listen-port", str(free_port()),
         "--ray-client-server-port", str(free_port()), "--metrics-export-port", str(free_port())],
        env={**env, "RAY_DASHBOARD_PORT": str(dash)}, cwd=tmp, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:  # the job server can answer before the node has registered: wait for both
            assert head.poll() is None, f"ray start exited {head.returncode}:\n{log.read_text()[-4000:]}"
            try:
                if "Ray runtime started" in log.read_text() and get(f"{url}/api/jobs/")[0] in (200, 401):
                    break
            except OSError:
                pass
            assert time.time() < deadline, f"head not up after 120 s:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        yield {"url": url, "env": env, "tmp": tmp, "token": (tmp / "auth_token").read_text().strip()}
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)  # `ray start --block` stops its own cluster on SIGTERM
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for pid in session_pids(head.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def test_ray_job_submit_smoke_study(ray_head):
    url, token, tmp = ray_head["url"], ray_head["token"], ray_head["tmp"]
    # Auth is on: the job server refuses a request without the token, accepts one with it.
    assert get(f"{url}/api/jobs/")[0] == 401
    assert get(f"{url}/api/jobs/", token)[0] == 200

    out = tmp / "out"
    out.mkdir()
    sub_id = f"smoke-{uuid.uuid4().hex[:8]}"
    # The README's command: RAY_AUTH_MODE=token + the token file make the CLI send the token.
    env = {**ray_head["env"], "RAY_AUTH_MODE": "token", "RAY_API_SERVER_ADDRESS": url}
    submit = subprocess.run(
        ["ray", "job", "submit", "--runtime-env", "platform/runtime_env.yaml", "--working-dir", ".",
         "--submission-id", sub_id, "--no-wait", "--",
         "python", "studies/agc_lambda.py", "--smoke-test", "--output", str(out),
         "--tracking-uri", f"sqlite:///{out}/mlflow.db"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]

    t0, status = time.time(), None
    while time.time() < t0 + 300:
        code, body = get(f"{url}/api/jobs/{sub_id}", token)
        assert code == 200, body
        info = json.loads(body)
        status = info["status"]
        # PENDING takes seconds; minutes mean the job's workers cannot start (see the logs below).
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or (status == "PENDING" and time.time() > t0 + 120):
            break
        time.sleep(2)
    logs = subprocess.run(["ray", "job", "logs", sub_id], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60).stdout
    assert status == "SUCCEEDED", f"job {status}: {info.get('message')}\n{logs[-3000:]}\n{ray_logs(tmp)}"
    # The job ran with platform/runtime_env.yaml (its env vars and excludes), plus the --working-dir override.
    assert info["runtime_env"]["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert ".venv/" in info["runtime_env"]["excludes"]
    assert info["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")  # this checkout, uploaded

    import mlflow
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    results = pq.read_table(out / "agc_lambda" / "results.parquet").filter(pc.field("phase") == "full")
    assert results.num_rows == 1
    assert results.column("status")[0].as_py() in ("completed", "diverged", "failed", "stopped")
    assert (out / "agc_lambda" / "stable_region.png").stat().st_size > 1000

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    exp = client.get_experiment_by_name("agc_lambda")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "study"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    full = [c for c in children if c.data.tags.get("phase") == "full"]
    assert len(full) == 1 and len(children) == 3  # the smoke preset: 2 scan trials and 1 full run
    assert results.column("mlflow_run_id")[0].as_py() == full[0].info.run_id

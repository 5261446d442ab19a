"""Real services on loopback for the platform tests: PostgreSQL, an S3 API (moto), the team MLflow server of
platform/mlflow/start.sh, and Ray nodes from platform/ray/start-head.sh and `ray start --address`. Each runs in
its own process session and is stopped by its own process ids, never by name (`ray stop` would stop every Ray
on the machine)."""
from __future__ import annotations

import base64
import contextlib
import glob
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NO_PG = "PostgreSQL binaries (initdb, pg_ctl) not found; run platform/ci/install-test-deps.sh as root"


_GIVEN: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, never one this process handed out before. The kernel may give a port just
    closed to the next bind(0): a Ray node asks for five ports in a row, and CI once got the dashboard's port again
    for metrics export, which `ray start` refuses."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port
    raise RuntimeError(f"no fresh port in 100 tries; {len(_GIVEN)} handed out already")


def http(url: str, body: dict | None = None, auth: tuple[str, str] | None = None,
         token: str | None = None, method: str | None = None) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method=method)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
            return r.status, json.loads(text) if text.startswith(("{", "[")) else text
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_for(check, what: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    tail = lambda: log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{tail()}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} not ready after {timeout:.0f}s:\n{tail()}")


def _stat(pid: int | str) -> list[str]:
    """/proc/<pid>/stat after the command name (which may hold spaces): fields 3, 4, … of proc(5) at index 0, 1, ….
    OSError when the process is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def session_pids(sid: int) -> list[int]:
    """Processes of the session a start_new_session child leads: ours, found by id."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = _stat(d.name)
            except OSError:
                continue
            if int(fields[3]) == sid:  # field 6 of stat: session id
                pids.append(int(d.name))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (those still alive)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = _stat(pid)
            total += int(fields[11]) + int(fields[12])  # stat fields 14, 15: utime, stime
    return total / tick


def kill_session(sid: int) -> int:
    pids = session_pids(sid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM our process group, then SIGKILL whatever is left of its session."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
    kill_session(proc.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def clean_env(tmp: Path) -> dict[str, str]:
    """This process's environment without Ray/MLflow/AWS settings (an in-process ray.init sets some)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env.update({"PATH": f"{BIN}:{env.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
                "NFNET_LAB_DATA": str(tmp / "no-local-data"), "NFNET_LAB_RESULTS": str(tmp / "no-local-results")})
    return env


# ---- PostgreSQL ----

def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return shutil.which(name) or (found[-1] if found else None)


def psql(port: int, password: str, db: str, sql: str) -> str:
    out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "-d", db, "-tAc", sql],
                         env={**os.environ, "PGPASSWORD": password}, capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.strip()


@contextlib.contextmanager
def postgres():
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not (initdb and pg_ctl and shutil.which("psql")):
        pytest.skip(NO_PG)
    # PostgreSQL refuses to run as root: as root, run it as the `postgres` user in a directory it owns.
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    tmp = Path(tempfile.mkdtemp(prefix="nfpg-"))
    data, sock, pwfile = tmp / "data", tmp / "sock", tmp / "pw"
    sock.mkdir()
    password = secrets.token_hex(16)
    pwfile.write_text(password)
    if as_pg:
        for p in (tmp, sock, pwfile):
            shutil.chown(p, "postgres")
    port = free_port()

    def run(*cmd):
        subprocess.run([*as_pg, *cmd], check=True, capture_output=True, text=True, timeout=120)

    try:
        run(initdb, "-D", str(data), "-U", "mlflow", f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8")
        run(pg_ctl, "-D", str(data), "-l", str(tmp / "pg.log"), "-w", "-t", "60", "start",
            "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c max_connections=40")
        for db in ("mlflow", "mlflow_auth"):
            psql(port, password, "postgres", f"CREATE DATABASE {db}")
        yield {"port": port, "password": password}
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_pg, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


# ---- S3 (moto's server mode, in this process) ----

@contextlib.contextmanager
def s3_server(*buckets: str):
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    for b in buckets:
        client.create_bucket(Bucket=b)
    try:
        yield {"endpoint": endpoint, "client": client, "env": env}
    finally:
        server.stop()


def s3_keys(s3: dict, bucket: str, prefix: str = "") -> list[str]:
    keys, token = [], None
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = s3["client"].list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


# ---- the team MLflow server ----

@contextlib.contextmanager
def team_mlflow(pg: dict, s3: dict, bucket: str, tmp: Path):
    """platform/mlflow/start.sh on PostgreSQL + S3 artifacts + basic auth; yields its URL, the admin and a
    non-admin worker user (what studies log as)."""
    port = free_port()
    admin = ("admin", secrets.token_hex(12))
    db = f"postgresql+psycopg://mlflow@127.0.0.1:{pg['port']}"
    env = clean_env(tmp)
    env.update({k: v for k, v in s3["env"].items() if k != "AWS_ENDPOINT_URL"})
    env.update({
        "PGPASSWORD": pg["password"],  # libpq reads it: no password in any URI or file
        "MLFLOW_BACKEND_STORE_URI": f"{db}/mlflow", "MLFLOW_AUTH_DATABASE_URI": f"{db}/mlflow_auth",
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/mlflow-artifacts",
        "MLFLOW_S3_ENDPOINT_URL": s3["endpoint"],
        "MLFLOW_AUTH_ADMIN_USERNAME": admin[0], "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_PORT": str(port), "MLFLOW_AUTH_CONFIG_DIR": str(tmp / "mlflow-auth"),
    })
    log = tmp / "mlflow-server.log"
    server = subprocess.Popen(["bash", str(ROOT / "platform/mlflow/start.sh")], env=env, cwd=tmp,
                              stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http(f"{url}/health")[0] == 200, "mlflow server", 120, server, log)
        worker = ("nfnet-worker", secrets.token_hex(12))
        code, body = http(f"{url}/api/2.0/mlflow/users/create", {"username": worker[0], "password": worker[1]},
                          auth=admin)
        assert code == 200, body
        yield {"url": url, "admin": admin, "worker": worker, "log": log, "proc": server}
    finally:
        stop(server)


def mlflow_runs(server: dict, experiment: str) -> list[dict]:
    api = f"{server['url']}/api/2.0/mlflow"
    code, exp = http(f"{api}/experiments/get-by-name?experiment_name={experiment}", auth=server["worker"])
    assert code == 200, exp
    runs, token = [], None
    while True:
        body = {"experiment_ids": [exp["experiment"]["experiment_id"]], "max_results": 200,
                **({"page_token": token} if token else {})}
        code, found = http(f"{api}/runs/search", body, auth=server["worker"])
        assert code == 200, found
        runs += found.get("runs", [])
        token = found.get("next_page_token")
        if not token:
            return runs


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


# ---- Ray nodes ----

class RayNode:
    """One Ray node in its own session: the head from platform/ray/start-head.sh, or a worker node joined with
    `ray start --address`. `kill()` is a lost machine: SIGKILL to every process of the node, nothing else."""

    def __init__(self, tmp: Path, env: dict[str, str], name: str, args: list[str], head_address: str | None = None):
        self.tmp, self.env, self.name, self.args, self.head_address = tmp, env, name, args, head_address
        self.proc: subprocess.Popen | None = None
        self.log = tmp / f"{name}.log"
        self.dashboard = free_port() if head_address is None else None

    def start(self, timeout: float = 120) -> RayNode:
        # Every agent port given: the raylet waits for an agent's port file (and exits after a fixed 15 s, which a
        # slow agent on 2 busy cores can miss: ray-project/ray#65983) only for a port left to the agent to choose.
        ports = ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
                 "--runtime-env-agent-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port())]
        if self.head_address is None:
            cmd = ["bash", str(ROOT / "platform/ray/start-head.sh"), "--block", "--port", str(free_port()),
                   "--ray-client-server-port", str(free_port()), "--temp-dir", str(self.tmp / "ray"),
                   *ports, *self.args]
            env = {**self.env, "RAY_DASHBOARD_PORT": str(self.dashboard)}
        else:
            # Its own temp dir, as on a machine of its own: nodes sharing one would share (and garbage-collect)
            # each other's unpacked job working dirs.
            cmd = ["ray", "start", "--block", "--address", self.head_address, "--disable-usage-stats",
                   "--temp-dir", str(self.tmp / self.name), *ports, *self.args]
            env = {**self.env, "RAY_AUTH_MODE": "token"}
        self.proc = subprocess.Popen(cmd, env=env, cwd=self.tmp, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: "Ray runtime started" in self.log.read_text(errors="replace"), f"ray node {self.name}",
                 timeout, self.proc, self.log)
        return self

    @property
    def address(self) -> str:
        text = self.log.read_text(errors="replace")
        return text.split("--address='", 1)[1].split("'", 1)[0]

    def kill(self) -> int:
        n = kill_session(self.proc.pid)
        self.proc.wait(timeout=30)
        return n

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()  # a test cluster has nothing to shut down gracefully (SIGTERM takes ~20 s)


def ray_logs(tmp: Path) -> str:
    """The tails of the cluster's error logs, for a failure message."""
    out = []
    for f in sorted(tmp.glob("*/session_*/logs/*")):
        if f.suffix == ".err" or f.name.startswith(("raylet.out", "runtime_env_setup", "job-driver")):
            text = f.read_text(errors="replace").strip()
            if text:
                out.append(f"--- {f.name}\n{text[-1500:]}")
    return "\n".join(out)[-8000:]

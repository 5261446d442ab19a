# The team MLflow server of platform/mlflow/start.sh for real: PostgreSQL backend, S3 artifacts (moto's S3 API
# on loopback), basic auth; the smoke study logs to it as a non-admin user over HTTP.
import base64
import glob
import json
import os
import secrets
import shutil
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
pytestmark = pytest.mark.slow
NO_PG = "PostgreSQL binaries (initdb, pg_ctl) not found; run platform/ci/install-test-deps.sh as root"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return shutil.which(name) or (found[-1] if found else None)


def http(url: str, body: dict | None = None, auth: tuple[str, str] | None = None) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
            return r.status, json.loads(text) if text.startswith("{") else text
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_for(check, what: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} not ready after {timeout:.0f}s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    # Only our own process group (start_new_session), never processes found by name.
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass


def psql(port: int, password: str, db: str, sql: str) -> str:
    out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "-d", db, "-tAc", sql],
                         env={**os.environ, "PGPASSWORD": password}, capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.strip()


@pytest.fixture
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
        run(initdb, "-D", str(data), "-U", "mlflow", f"--pwfile={pwfile}", "--auth=scram-sha-256",
            "-E", "UTF8")
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


@pytest.fixture
def s3(monkeypatch):
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="nfnet-lab")
        yield {"endpoint": endpoint, "client": client, "env": creds}
    finally:
        server.stop()


def test_team_server_postgres_s3_basic_auth(postgres, s3, tmp_path):
    port = free_port()
    admin = ("admin", secrets.token_hex(12))
    db = f"postgresql+psycopg://mlflow@127.0.0.1:{postgres['port']}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env.update(s3["env"])
    env.update({
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        "PGPASSWORD": postgres["password"],  # libpq reads it: no password in any URI or file
        "MLFLOW_BACKEND_STORE_URI": f"{db}/mlflow", "MLFLOW_AUTH_DATABASE_URI": f"{db}/mlflow_auth",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://nfnet-lab/mlflow-artifacts",
        "MLFLOW_S3_ENDPOINT_URL": s3["endpoint"],
        "MLFLOW_AUTH_ADMIN_USERNAME": admin[0], "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_PORT": str(port), "MLFLOW_AUTH_CONFIG_DIR": str(tmp_path / "auth"),
    })
    log = tmp_path / "server.log"
    server = subprocess.Popen(["bash", str(ROOT / "platform/mlflow/start.sh")], env=env, cwd=tmp_path,
                              stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    api = f"{url}/api/2.0/mlflow"
    try:
        wait_for(lambda: http(f"{url}/health")[0] == 200, "mlflow server", 120, server, log)
        # Basic auth is on: no credentials -> 401; the admin creates the worker user.
        assert http(f"{api}/experiments/search", {"max_results": 1})[0] == 401
        worker = ("nfnet-worker", secrets.token_hex(12))
        code, body = http(f"{api}/users/create", {"username": worker[0], "password": worker[1]}, auth=admin)
        assert code == 200, body
        assert http(f"{api}/experiments/search", {"max_results": 1}, auth=worker)[0] == 200

        # The smoke study as the worker user, credentials from the environment only.
        out = tmp_path / "out"
        study_env = {k: v for k, v in env.items() if not k.startswith(("MLFLOW_", "PG"))}
        study_env.update({"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": worker[0],
                          "MLFLOW_TRACKING_PASSWORD": worker[1], "NFNET_LAB_DATA": str(tmp_path / "data"),
                          "RAY_USAGE_STATS_ENABLED": "0"})
        study = subprocess.run([sys.executable, str(ROOT / "studies/agc_lambda.py"), "--smoke-test",
                                "--output", str(out)],
                               cwd=tmp_path, env=study_env, capture_output=True, text=True, timeout=300)
        assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]

        # Wrong credentials: one clear line before any trial, not a late traceback.
        wrong = subprocess.run([sys.executable, str(ROOT / "studies/agc_lambda.py"), "--smoke-test",
                                "--output", str(tmp_path / "out2")], cwd=tmp_path, capture_output=True, text=True,
                               env={**study_env, "MLFLOW_TRACKING_PASSWORD": "wrong"}, timeout=120)
        assert wrong.returncode == 2 and "refused the credentials" in wrong.stderr, wrong.stderr[-2000:]
        assert "Traceback" not in wrong.stderr and "wrong" not in wrong.stderr

        code, exp = http(f"{api}/experiments/get-by-name?experiment_name=agc_lambda", auth=worker)
        assert code == 200, exp
        search = {"experiment_ids": [exp["experiment"]["experiment_id"]], "max_results": 100}
        code, found = http(f"{api}/runs/search", search, auth=worker)
        assert code == 200, found
        runs = found["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parents = [r for r, t in zip(runs, tags) if t.get("role") == "study"]
        assert len(parents) == 1, tags
        parent_id = parents[0]["info"]["run_id"]
        children = [r for r, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parent_id]
        assert len(children) == 3, tags  # the smoke study: two scan trials, one full run
        params = {p["key"] for p in children[-1]["data"]["params"]}
        assert {"batch_size", "clip_threshold", "base_lr"} <= params
        # Credentials travel in a header only, never as logged params or tags.
        for r in runs:
            logged = r["data"].get("params", []) + r["data"]["tags"]
            assert not any(worker[1] in p["value"] or admin[1] in p["value"] for p in logged)

        code, arts = http(f"{api}/artifacts/list?run_id={parent_id}", auth=worker)
        assert code == 200, arts
        files = {f["path"]: f for f in arts.get("files", [])}
        assert {"stability_map.png", "summary.txt", "results.parquet"} <= set(files), files
        assert int(files["stability_map.png"]["file_size"]) > 1000
        # ... and they really are in the S3 bucket, uploaded through the server's artifact proxy.
        keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket="nfnet-lab").get("Contents", [])]
        assert any(k.startswith("mlflow-artifacts/") and k.endswith("/stability_map.png") for k in keys), keys
        # The runs are rows in PostgreSQL.
        n_rows = psql(postgres["port"], postgres["password"], "mlflow", "SELECT count(*) FROM runs")
        assert int(n_rows) == len(runs)
    finally:
        stop(server)

# The platform as a team runs it, on one machine: a two-node Ray cluster (a head from platform/ray/start-head.sh
# with token auth, a second node joined with `ray start --address`, each in its own process session), object
# storage (moto's S3 API), the team MLflow server of platform/mlflow/start.sh (PostgreSQL, S3 artifacts, basic
# auth). Studies arrive as `ray job submit`; a node is lost by SIGKILLing its whole session.
import json
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.services import (
    ROOT,
    RayNode,
    clean_env,
    cpu_seconds,
    http,
    mlflow_runs,
    postgres,
    psql,
    ray_logs,
    s3_keys,
    s3_server,
    session_pids,
    tags,
    team_mlflow,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BUCKET = "nfnet-lab"


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    tmp = Path(tmp_path_factory.mktemp("cluster"))
    ray_tmp = Path(f"/tmp/nc-{uuid.uuid4().hex[:6]}")  # Ray's socket paths are length-limited: a short root
    with postgres() as pg, s3_server(BUCKET) as s3, team_mlflow(pg, s3, BUCKET, tmp) as server:
        env = clean_env(tmp)
        env.update(s3["env"])
        env.update({
            # A failure shows where, not one line; a hung driver dumps its threads into the job log every 4 min.
            "NFNET_LAB_TRACEBACK": "1", "PYTHONFAULTHANDLER": "1", "PYTHONPATH": str(hang_dump(tmp)),
            "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_TOKEN_PATH": str(tmp / "auth_token"), "HOME": str(tmp / "home"),
            "MLFLOW_TRACKING_USERNAME": server["worker"][0], "MLFLOW_TRACKING_PASSWORD": server["worker"][1],
            # A lost node is declared dead after ~3 s instead of Ray's default ~30 s.
            "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3",
        })
        (tmp / "home").mkdir()
        ray_tmp.mkdir()
        head = RayNode(ray_tmp, env, "head", ["--num-cpus", "1", "--resources", '{"head": 1}'])
        second = None
        try:
            head.start()
            second = RayNode(ray_tmp, env, "node2", ["--num-cpus", "1", "--resources", '{"node2": 1}'],
                             head_address=head.address).start()
            url = f"http://127.0.0.1:{head.dashboard}"
            token = (tmp / "auth_token").read_text().strip()
            wait_for_nodes(url, token, 2)
            yield {"tmp": tmp, "ray_tmp": ray_tmp, "env": env, "head": head, "second": second, "url": url,
                   "token": token, "s3": s3, "pg": pg, "mlflow": server}
        finally:
            for node in (second, head):
                if node is not None:
                    node.stop()


def test_the_team_server_checks_a_password_once_and_a_change_at_once(platform):
    # platform/mlflow/start.sh turns on MLflow's credential cache: without it every request runs the password's
    # scrypt hash, which made hashing the team server's main work under a study's logging.
    from werkzeug.security import check_password_hash, generate_password_hash

    server = platform["mlflow"]
    api = f"{server['url']}/api/2.0/mlflow"
    probe = ("probe", secrets.token_hex(12))
    assert http(f"{api}/users/create", {"username": probe[0], "password": probe[1]}, auth=server["admin"])[0] == 200
    hashed, t0 = generate_password_hash(probe[1]), time.process_time()
    check_password_hash(hashed, probe[1])
    one_hash = time.process_time() - t0  # what one check costs on this machine
    pids = session_pids(server["proc"].pid)
    before = cpu_seconds(pids)
    for _ in range(20):
        assert http(f"{api}/experiments/search", {"max_results": 1}, auth=probe)[0] == 200
    spent = cpu_seconds(pids) - before
    print(f"\n20 authenticated requests: {spent:.2f} s of the server's CPU; one password check {one_hash:.3f} s")
    assert spent < 20 * one_hash / 2, (spent, one_hash)  # unchecked each time: 20 checks would cost 20 × one_hash
    # A password changed through the API holds from the next request: the old one is refused, not remembered.
    new = secrets.token_hex(12)
    assert http(f"{api}/users/update-password", {"username": probe[0], "password": new}, auth=server["admin"],
                method="PATCH")[0] == 200
    assert http(f"{api}/experiments/search", {"max_results": 1}, auth=probe)[0] == 401
    assert http(f"{api}/experiments/search", {"max_results": 1}, auth=(probe[0], new))[0] == 200


def hang_dump(tmp: Path) -> Path:
    d = tmp / "site"
    d.mkdir()
    (d / "sitecustomize.py").write_text(
        "import faulthandler, sys\n"
        "if any(a.startswith('studies/') for a in sys.argv):\n"
        "    faulthandler.dump_traceback_later(240, repeat=True)\n")
    return d


def alive_nodes(url: str, token: str) -> list[dict]:
    code, body = http(f"{url}/nodes?view=summary", token=token)
    assert code == 200, body
    return [n for n in body["data"]["summary"] if n["raylet"]["state"] == "ALIVE"]


def wait_for_nodes(url: str, token: str, n: int, timeout: float = 90) -> float:
    t0 = time.time()
    while len(alive_nodes(url, token)) != n:
        assert time.time() < t0 + timeout, f"cluster did not reach {n} alive nodes in {timeout:.0f}s"
        time.sleep(0.5)
    return time.time()


def submit(p: dict, args: list[str], name: str) -> str:
    sub_id = f"{name}-{uuid.uuid4().hex[:6]}"
    env = {**p["env"], "RAY_AUTH_MODE": "token", "RAY_API_SERVER_ADDRESS": p["url"]}
    for _ in range(10):  # a head node answers "No available agent to submit job" until its job agent is up
        out = subprocess.run(["ray", "job", "submit", "--runtime-env", "platform/runtime_env.yaml", "--working-dir",
                              ".", "--submission-id", sub_id, "--no-wait", "--", "python", *args],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        if out.returncode == 0 or "No available agent to submit job" not in out.stderr:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return sub_id


def job(p: dict, sub_id: str) -> dict:
    code, body = http(f"{p['url']}/api/jobs/{sub_id}", token=p["token"])
    assert code == 200, body
    return body


def job_logs(p: dict, sub_id: str) -> str:
    code, body = http(f"{p['url']}/api/jobs/{sub_id}/logs", token=p["token"])
    return body.get("logs", "") if isinstance(body, dict) else str(body)


def wait_job(p: dict, sub_id: str, timeout: float = 420) -> dict:
    t0 = time.time()
    while True:
        info = job(p, sub_id)
        if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        assert time.time() < t0 + timeout, f"job {sub_id} still {info['status']} after {timeout:.0f}s:\n" \
                                           f"{job_logs(p, sub_id)[-3000:]}\n{ray_logs(p['ray_tmp'])}"
        time.sleep(1)
    assert info["status"] == "SUCCEEDED", \
        f"job {info['status']}: {info.get('message')}\n{job_logs(p, sub_id)[-4000:]}\n{ray_logs(p['ray_tmp'])}"
    return info


def read_parquet(p: dict, uri: str):
    import pyarrow.parquet as pq

    import storage

    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs)


def local_leftovers(p: dict) -> list[str]:
    """What a study must never write on a node: local data, results or MLflow stores, in the job's working
    directories, in HOME or at the NFNET_LAB_* defaults."""
    roots = [p["tmp"] / "home", *p["ray_tmp"].glob("*/session_*/runtime_resources/working_dir_files/*")]
    bad = [str(q) for r in roots for q in r.rglob("*")
           if q.name in ("results", "mlruns", "mlflow.db", "ray_results", "data", "mlartifacts")]
    return bad + [v for k, v in p["env"].items() if k.startswith("NFNET_LAB_") and Path(v).exists()]


def test_study_as_a_ray_job_on_two_nodes_with_s3_and_the_team_server(platform, monkeypatch):
    p, s3, server = platform, platform["s3"], platform["mlflow"]
    for k, v in s3["env"].items():  # this process reads the bucket too
        monkeypatch.setenv(k, v)
    # Both doors are locked: the job server wants the Ray token, MLflow its users.
    assert http(f"{p['url']}/api/jobs/")[0] == 401 and http(f"{p['url']}/api/jobs/", token=p["token"])[0] == 200
    assert http(f"{server['url']}/api/2.0/mlflow/experiments/search", {"max_results": 1})[0] == 401

    out, data = f"s3://{BUCKET}/results", f"s3://{BUCKET}/data"
    # Two cells → two trials at once, one per node (1 CPU each), each a 2-worker DDP TorchTrainer inside its Tune
    # trial (checkpoints in S3); 80 full steps at batch 32 pass an epoch of the smoke data, so the full runs
    # checkpoint. At lr 1.6 both cells train in the scan (at the edge of a one-lr grid: no refinement).
    sub_id = submit(p, ["studies/agc_lambda.py", "--smoke-test", "--batch-sizes", "32", "64", "--lrs", "1.6",
                        "--max-steps", "80",
                        "--num-workers", "2", "--cpus-per-worker", "0.5", "--max-failures", "1",
                        "--output", out, "--data-root", data,
                        "--tracking-uri", server["url"]], "study")
    info = wait_job(p, sub_id)
    assert info["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")  # this checkout, uploaded
    assert ".venv/" in info["runtime_env"]["excludes"]

    results = read_parquet(p, f"{out}/agc_lambda/results.parquet").to_pylist()
    assert len(results) == 4 and len({r["trial_key"] for r in results}) == 4  # 2 cells × (1 scan + 1 full)
    assert {r["phase"] for r in results} == {"scan", "full"}
    assert all(r["status"] in ("completed", "diverged") for r in results), [r["error"] for r in results]
    assert {r["num_workers"] for r in results} == {2}
    nodes = {n["raylet"]["nodeId"] for n in alive_nodes(p["url"], p["token"])}
    assert {r["node_id"] for r in results} == nodes  # trials ran on both nodes
    cells = read_parquet(p, f"{out}/agc_lambda/cells.parquet")
    assert cells.num_rows == 2
    keys = s3_keys(s3, BUCKET)
    for f in ("stable_region.png", "stability_map.png", "lr_loss.png", "lr_accuracy.png", "summary.txt", "study.json"):
        assert f"results/agc_lambda/{f}" in keys, f
    assert any(k.startswith("data/synthetic-") and k.endswith("manifest.json") for k in keys)
    # Ray Train checkpoints and Tune's experiment state live in the bucket too.
    ckpts = [k for k in keys if k.startswith("results/agc_lambda/train/") and "/checkpoint_" in k]
    assert {k.split("/")[3] for k in ckpts} and all("_full_" in k.split("/")[3] for k in ckpts), ckpts
    assert any(k.startswith("results/agc_lambda/tune/") for k in keys)
    # MLflow artifacts went through the server's proxy into the bucket.
    assert any(k.startswith("mlflow-artifacts/") and k.endswith("/stability_map.png") for k in keys)
    assert local_leftovers(p) == []

    runs = mlflow_runs(server, "agc_lambda")
    parents = [r for r in runs if tags(r).get("role") == "study"]
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    children = [r for r in runs if tags(r).get("mlflow.parentRunId") == parents[0]["info"]["run_id"]]
    assert len(children) == len(runs) - 1 == 4
    assert {c["info"]["run_id"] for c in children} == {r["mlflow_run_id"] for r in results}
    params = [{x["key"]: x["value"] for x in c["data"]["params"]} for c in children]
    assert all(q["num_workers"] == "2" and {"batch_size", "lambda", "base_lr"} <= set(q) for q in params)
    assert all("loss/train" in {m["key"] for m in c["data"].get("metrics", [])} for c in children)
    assert int(psql(p["pg"]["port"], p["pg"]["password"], "mlflow", "SELECT count(*) FROM runs")) == len(runs)
    secrets_ = (server["worker"][1], server["admin"][1])
    for r in runs:  # credentials travel in a header only, never as logged params or tags
        logged = r["data"].get("params", []) + r["data"].get("tags", [])
        assert not any(s in x["value"] for x in logged for s in secrets_)

    # Wrong credentials: one clear line before any trial, no traceback, no secret echoed.
    env = {**clean_env(p["tmp"]), "MLFLOW_TRACKING_URI": server["url"],
           "MLFLOW_TRACKING_USERNAME": server["worker"][0], "MLFLOW_TRACKING_PASSWORD": "wrong-password"}
    wrong = subprocess.run([sys.executable, str(ROOT / "studies/agc_lambda.py"), "--smoke-test", "--output",
                            str(p["tmp"] / "out2")], cwd=p["tmp"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode == 2 and "refused the credentials" in wrong.stderr, wrong.stderr[-2000:]
    assert "Traceback" not in wrong.stderr and "wrong-password" not in wrong.stderr


# 16 px images (the smoke study's): a quarter of 32 px's pixels per step, for the reference and the restored run;
# the run still trains (one worker in-process: loss 2.33 → 1.98 over its 128 steps, ✓).
TRAIN = ["studies/train.py", "--model", "nf_resnet_cifar", "--model-overrides", '{"width": 16, "depth": 1}',
         "--dataset-params", '{"n_train": 1024, "n_val": 128, "image_size": 16}', "--batch-size", "64", "--epochs", "8",
         "--num-workers", "2", "--max-failures", "3", "--checkpoint-every-epochs", "1", "--clipping", "agc",
         "--lambda", "0.04", "--base-lr", "0.4", "--seed", "3", "--data-root", f"s3://{BUCKET}/data",
         "--storage-path", f"s3://{BUCKET}/train", "--experiment", "node_loss"]


def registered_epochs(p: dict, prefix: str) -> list[int]:
    """Epochs of the checkpoints Ray Train's controller has registered for the run (its snapshot file)."""
    snaps = [k for k in s3_keys(p["s3"], BUCKET, prefix) if k.endswith("checkpoint_manager_snapshot.json")]
    if not snaps:
        return []
    body = p["s3"]["client"].get_object(Bucket=BUCKET, Key=snaps[0])["Body"].read()
    return sorted(r["metrics"]["epoch"] for r in json.loads(body)["checkpoint_results"])


def final_numbers(server: dict, run_id: str) -> dict:
    import mlflow

    client = mlflow.MlflowClient(server["url"])
    return json.loads(Path(client.download_artifacts(run_id, "final_metrics.json")).read_text())


def test_a_lost_node_mid_trial_restores_from_s3_and_finishes_with_the_same_numbers(platform, monkeypatch):
    p, server = platform, platform["mlflow"]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", server["worker"][0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server["worker"][1])
    for k, v in p["s3"]["env"].items():
        monkeypatch.setenv(k, v)
    common = [*TRAIN, "--tracking-uri", server["url"]]
    ref = wait_job(p, submit(p, [*common, "--run-name", "reference"], "reference"))
    assert ref["status"] == "SUCCEEDED"

    t0 = time.time()
    sub_id = submit(p, [*common, "--run-name", "lost-node"], "lost-node")
    # Kill the second node once the run's controller has registered two checkpoints (epochs 1 and 2) in S3: a
    # checkpoint counts from then on (files uploaded but not yet registered would be ignored on restore).
    while True:
        registered = registered_epochs(p, "train/lost-node")
        if len(registered) >= 2:
            break
        assert job(p, sub_id)["status"] in ("PENDING", "RUNNING"), job_logs(p, sub_id)[-3000:]
        assert time.time() < t0 + 300, "no registered checkpoint after 300 s"
        time.sleep(0.2)
    t_kill = time.time()
    killed = p["second"].kill()
    t_dead = wait_for_nodes(p["url"], p["token"], 1)
    p["second"].start()  # the machine comes back (a preempted VM replaced): same resources, a new node id
    t_back = wait_for_nodes(p["url"], p["token"], 2)
    info = wait_job(p, sub_id)
    t_end = time.time()
    logs = job_logs(p, sub_id)
    print(f"\nnode-loss timeline (s after submit): checkpoints of epochs {registered} at kill {t_kill - t0:.1f} "
          f"({killed} processes); node dead {t_dead - t0:.1f}; node back {t_back - t0:.1f}; job done {t_end - t0:.1f}")
    assert info["status"] == "SUCCEEDED"
    assert "resumed from epoch" in logs, logs[-3000:]
    resumed = {int(ln.split("resumed from epoch ")[1].split()[0]) for ln in logs.splitlines() if "resumed from" in ln}
    print(f"resumed from epoch {resumed}")
    assert len(resumed) == 1 and resumed.pop() >= max(registered)  # the latest registered one (or a later one)

    runs = mlflow_runs(server, "node_loss")
    by_name = {}
    for r in runs:
        by_name.setdefault(r["info"]["run_name"].rsplit("-", 2)[0], []).append(r)
    # A finished run's name carries its verdict's mark in front ('✓ lost-node').
    assert sorted(by_name) == ["✓ lost-node", "✓ reference"] and all(len(v) == 1 for v in by_name.values()), by_name
    lost, ref_run = by_name["✓ lost-node"][0], by_name["✓ reference"][0]
    assert lost["info"]["status"] == "FINISHED"
    a, b = final_numbers(server, ref_run["info"]["run_id"]), final_numbers(server, lost["info"]["run_id"])
    print(f"reference: {a}\nlost node: {b}")
    for k in ("status", "steps", "best_val_acc", "final_train_loss", "final_val_acc", "diverged_step"):
        assert a.get(k) == b.get(k), (k, a.get(k), b.get(k))
    assert local_leftovers(p) == []


def node_of_trials(p: dict) -> set[str]:
    """Nodes where a Tune function trial's actor is alive now (Ray's state API on the dashboard)."""
    code, body = http(f"{p['url']}/api/v0/actors?limit=1000&detail=true", token=p["token"])
    assert code == 200, body
    return {a["node_id"] for a in body["data"]["result"]["result"]
            if a.get("class_name") == "ImplicitFunc" and a.get("state") == "ALIVE"}


def test_in_process_trials_on_a_lost_node_are_retried_by_tune_not_recorded_failed(platform, monkeypatch):
    p, server = platform, platform["mlflow"]
    for k, v in p["s3"]["env"].items():
        monkeypatch.setenv(k, v)
    out = f"s3://{BUCKET}/retried"
    # One-CPU trials run in the Tune trial's own process (no worker group); 2 scan runs of a cell per trial.
    sub_id = submit(p, ["studies/agc_lambda.py", "--smoke-test", "--name", "retried", "--batch-sizes", "32", "64",
                        "--lrs", "0.4", "1.6", "--max-steps", "30",
                        "--output", out, "--data-root", f"s3://{BUCKET}/data", "--tracking-uri", server["url"]],
                    "retried")
    second = next(n["raylet"]["nodeId"] for n in alive_nodes(p["url"], p["token"])
                  if n["raylet"]["resourcesTotal"].get("node2"))
    t0 = time.time()
    while second not in node_of_trials(p):
        assert job(p, sub_id)["status"] in ("PENDING", "RUNNING"), job_logs(p, sub_id)[-3000:]
        assert time.time() < t0 + 300, "no trial on the second node after 300 s"
        time.sleep(0.3)
    time.sleep(2)  # into its first training run
    p["second"].kill()
    wait_for_nodes(p["url"], p["token"], 1)
    p["second"].start()
    wait_for_nodes(p["url"], p["token"], 2)
    wait_job(p, sub_id)
    logs = job_logs(p, sub_id)
    assert "Trial task failed" in logs, logs[-3000:]  # the lost trial was retried, not skipped

    rows = read_parquet(p, f"{out}/retried/results.parquet").to_pylist()
    # 2 cells × (2 scan [+ 1 refinement] + 1 or 2 full), each once
    assert len({r["trial_key"] for r in rows}) == len(rows) and sum(r["phase"] == "scan" for r in rows) == 4
    assert {r["cell"] for r in rows if r["phase"] == "full"} == {r["cell"] for r in rows}
    assert all(r["status"] in ("completed", "diverged") for r in rows), [r["error"] for r in rows]
    runs = mlflow_runs(server, "retried")
    children = [r for r in runs if tags(r).get("role") != "study"]
    assert len(children) == len(rows) and {c["info"]["run_id"] for c in children} == {r["mlflow_run_id"] for r in rows}
    assert {r["info"]["status"] for r in runs} == {"FINISHED"}  # the killed attempt's run was continued, not left

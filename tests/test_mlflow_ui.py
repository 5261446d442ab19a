# The MLflow UI, rendered by headless Chromium in a fresh browser profile, shows what the smoke study logged: the
# link the study prints opens the Runs table in MLflow's training view (not its GenAI overview) with the study run
# and its trials, each trial named by its verdict and what differs; the study run's description holds the frontier
# table; its artifacts preview the frontier (frontier.md, cells.csv) and render the stability map.
import html
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import free_port, http, stop, wait_for

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = (
    "chromium not installed; run platform/ci/install-test-deps.sh as root (apt-get install chromium)"
)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)]


def chromium(profile: Path, url: str, *args: str) -> str:
    """`url` rendered by headless Chromium with the profile folder `profile` (a new folder: a fresh browser, with
    nothing remembered of an earlier visit, such as MLflow's last chosen view)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=15000", *args, url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # our own process group only: chromium's zygote and renderers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"chromium exited {proc.returncode} on {url}"
    return out


@pytest.fixture
def ui(tmp_path):
    # The smoke study, run from tmp_path so its sqlite store and ./mlruns artifacts stay there.
    db = f"sqlite:///{tmp_path}/mlflow.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update({"NFNET_LAB_DATA": str(tmp_path / "data"), "RAY_USAGE_STATS_ENABLED": "0"})
    # lr 25.6 diverges: the table must show a diverged trial as such, not as a success
    study = subprocess.run([sys.executable, str(ROOT / "studies/agc_lambda.py"), "--smoke-test", "--lrs", "0.4",
                            "25.6", "--output", str(tmp_path / "out"), "--tracking-uri", db],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]
    (link,) = re.findall(r"open (http://127\.0\.0\.1:5000/\S+)", study.stdout)  # the link the study prints

    port = free_port()
    log = tmp_path / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log.open("w"),
        stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http(f"{url}/health")[0] == 200, "mlflow server", 90, server, log)
        yield {"url": url, "db": db, "tmp": tmp_path, "link": link.replace("http://127.0.0.1:5000", url)}
    finally:
        stop(server)


def test_the_printed_link_opens_the_training_view_with_the_study_and_its_trials(ui):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=ui["db"])
    exp = client.get_experiment_by_name("agc_lambda")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("role") == "study")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    diverged = next(r for r in children if r.data.tags["verdict"] == "diverged")
    eid, pid = exp.experiment_id, parent.info.run_id
    base = f"{ui['url']}/#/experiments/{eid}"
    assert ui["link"].startswith(f"{base}/runs?workflowType=machine_learning")

    # The printed link, in a fresh profile (chromium() gives each call its own): the training view's Runs table,
    # listing the study run and every trial by name; not the GenAI overview (Traces, Judges, "Evaluation runs").
    dom = chromium(ui["tmp"] / "link", ui["link"], "--dump-dom")
    assert re.search(rf'href="#/experiments/{eid}/runs/{pid}[^"]*"[^>]*>(?:<[^>]+>)*agc_lambda<', dom), \
        "the study run is not in the rendered runs table"
    for ch in children:
        assert html.escape(ch.info.run_name) in dom, f"trial {ch.info.run_name!r} is not in the runs table"
    assert "Evaluation runs" not in dom and "Judges" not in dom, "the link opened MLflow's GenAI view"
    assert diverged.info.run_name.startswith("✗ b64 λ") and "lr25.6 scan" in diverged.info.run_name

    # The study run's overview: its description holds the frontier table.
    dom = chromium(ui["tmp"] / "study", f"{base}/runs/{pid}?workflowType=machine_learning", "--dump-dom")
    assert "The stable region" in dom and "Largest base lr that trains" in dom
    # The frontier previewed: frontier.md rendered as a table, cells.csv as a table, the map as an image.
    dom = chromium(ui["tmp"] / "md", f"{base}/runs/{pid}/artifacts/frontier.md?workflowType=machine_learning",
                   "--dump-dom")
    assert re.search(r'role="columnheader"[^>]*>(?:<[^>]+>)*λ=0\.04<', dom), "frontier.md is not a table"
    dom = chromium(ui["tmp"] / "csv", f"{base}/runs/{pid}/artifacts/cells.csv?workflowType=machine_learning",
                   "--dump-dom")
    assert "Previewing the first" in dom and "max_stable_lr" in dom, "cells.csv is not previewed as a table"
    dom = chromium(ui["tmp"] / "png", f"{base}/runs/{pid}/artifacts/stability_map.png", "--dump-dom")
    assert re.search(r'<img alt="stability_map\.png" src="blob:', dom), "stability_map.png is not rendered"
    # A trial's page links its parent.
    dom = chromium(ui["tmp"] / "trial", f"{base}/runs/{diverged.info.run_id}", "--dump-dom")
    assert re.search(rf'Parent run</div>.*?<a href="#/experiments/{eid}/runs/{pid}">agc_lambda</a>', dom), \
        "the trial's page does not link its parent run"

    shot = ui["tmp"] / "mlflow.png"
    chromium(ui["tmp"] / "shot", ui["link"], f"--screenshot={shot}", "--window-size=1400,900")
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1400, 900)
        colors = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 200, "the screenshot is (nearly) blank"

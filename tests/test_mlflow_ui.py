# The MLflow UI, rendered by headless Chromium, shows what the smoke study logged: the study's parent run in
# the experiment's run list, the trial nested under it, and the stability map among the parent's artifacts.
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


def chromium(tmp: Path, url: str, *args: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium'}", "--virtual-time-budget=15000", *args, url]
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
    study = subprocess.run([sys.executable, str(ROOT / "studies/agc_lambda.py"), "--smoke-test",
                            "--output", str(tmp_path / "out"), "--tracking-uri", db],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]

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
        yield {"url": url, "db": db, "tmp": tmp_path}
    finally:
        stop(server)


def test_ui_shows_study_parent_child_and_stability_map(ui):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=ui["db"])
    exp = client.get_experiment_by_name("agc_lambda")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("role") == "study")
    child = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    eid, pid = exp.experiment_id, parent.info.run_id
    base = f"{ui['url']}/#/experiments/{eid}"

    name = re.escape(parent.info.run_name)
    # The run list: the parent run, by name, linking to its run page.
    dom = chromium(ui["tmp"], f"{base}/runs", "--dump-dom")
    link = rf'href="#/experiments/{eid}/runs/{pid}"[^>]*>(?:<[^>]+>)*{name}<'
    assert re.search(link, dom), "the parent run is not in the rendered run list"
    # The trial's page: its name, and its parent run linked under "Parent run".
    dom = chromium(ui["tmp"], f"{base}/runs/{child.info.run_id}", "--dump-dom")
    assert child.info.run_name in dom
    link = rf'Parent run</div>.*?<a href="#/experiments/{eid}/runs/{pid}">{name}</a>'
    assert re.search(link, dom), "the trial's page does not link its parent run"
    # The parent's artifact view renders the stability map as an image fetched from the server.
    dom = chromium(ui["tmp"], f"{base}/runs/{pid}/artifacts/stability_map.png", "--dump-dom")
    assert re.search(r'<img alt="stability_map\.png" src="blob:', dom), "stability_map.png is not rendered"

    shot = ui["tmp"] / "mlflow.png"
    chromium(ui["tmp"], f"{base}/runs/{pid}/artifacts/stability_map.png", f"--screenshot={shot}",
             "--window-size=1400,900")
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1400, 900)
        colors = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 200, "the screenshot is (nearly) blank"

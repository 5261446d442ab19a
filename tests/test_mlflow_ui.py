# The MLflow UI as a user meets it: the smoke study (two cells), served as the README says (`mlflow ui --app-name
# nfnet-lab`), opened in headless Chromium with a fresh profile at 1500×950. The printed link opens the training
# view's runs table with the study run first and each cell's runs together in lr order, the verdict, phase and
# reason visible; a click on a run, on its breadcrumb and back never leaves the training view; a trial's
# description explains its verdict; the study run's description opens with the frontier table and the findings
# and widens nothing; its artifacts preview the frontier (frontier.md, cells.csv) and render the stability map.
# Screenshots of each step are left in the test's folder (kept by pytest under its basetemp).
import html
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import Browser
from tests.services import free_port, http, stop, wait_for

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = (
    "chromium not installed; run platform/ci/install-test-deps.sh as root (apt-get install chromium)"
)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)]
WIDTH, HEIGHT = 1500, 950


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


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    # The smoke study in two cells, run from its folder so its sqlite store and artifacts stay there.
    tmp = tmp_path_factory.mktemp("mlflow_ui")
    db = f"sqlite:///{tmp}/mlflow.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update({"NFNET_LAB_DATA": str(tmp / "data"), "RAY_USAGE_STATS_ENABLED": "0"})
    # lr 25.6 diverges: the table must show a diverged trial as such, not as a success. 96-step scans (half the
    # smoke budget's examples): lr 1.6 trains with AGC (then refined and run in full), not without clipping.
    study = subprocess.run([sys.executable, str(ROOT / "studies/agc_lambda.py"), "--smoke-test", "--lrs", "1.6",
                            "25.6", "--scan-examples", "4096", "--lambdas", "0.04", "none", "--output",
                            str(tmp / "out"), "--tracking-uri", db],
                           cwd=tmp, env=env, capture_output=True, text=True, timeout=420)
    assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]
    (link,) = re.findall(r"open (http://127\.0\.0\.1:5000/\S+)", study.stdout)  # the link the study prints
    # The README's serve command: the nfnet-lab server app (studies/training/mlflow_app.py).
    assert "mlflow ui --app-name nfnet-lab --workers 1" in study.stdout
    # A quiet console: neither Ray's token-auth WARNING nor MLflow's INFO lines about creating its tables.
    for noise in ("Token authentication is", "Creating initial MLflow database tables", "Updating database tables"):
        assert noise not in study.stdout + study.stderr, noise

    port = free_port()
    log = tmp / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "nfnet-lab", "--backend-store-uri", db,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp, env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log.open("w"),
        stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http(f"{url}/health")[0] == 200, "mlflow server", 90, server, log)
        yield {"url": url, "db": db, "tmp": tmp, "link": link.replace("http://127.0.0.1:5000", url),
               "stdout": study.stdout}
    finally:
        stop(server)


def study_runs(ui):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=ui["db"])
    exp = client.get_experiment_by_name("agc_lambda")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("role") == "study")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, exp.experiment_id, parent, children


def test_the_printed_link_opens_the_training_view_with_the_study_and_its_trials(ui):
    client, eid, parent, children = study_runs(ui)
    diverged = next(r for r in children if r.data.tags["verdict"] == "diverged")
    pid = parent.info.run_id
    base = f"{ui['url']}/#/experiments/{eid}"
    assert ui["link"].startswith(f"{base}/runs?workflowType=machine_learning")

    # The printed link, in a fresh profile (chromium() gives each call its own): the training view's Runs table,
    # listing the study run and every trial by name; not the GenAI overview (Traces, Judges, "Evaluation runs").
    dom = chromium(ui["tmp"] / "link", ui["link"], "--dump-dom")
    assert re.search(rf'href="#/experiments/{eid}/runs/{pid}[^"]*"[^>]*>(?:<[^>]+>)*agc_lambda<', dom), \
        "the study run is not in the rendered runs table"
    for ch in children:
        assert html.escape(ch.info.run_name) in dom, f"trial {ch.info.run_name!r} is not in the runs table"
    genai = re.search(r"<a [^>]*>(?:<[^>]+>)*(?:Evaluation runs|Judges)<", dom)
    assert not genai, "the link opened MLflow's GenAI view"
    assert diverged.info.run_name.startswith("✗ b64 λ") and "lr25.6 scan" in diverged.info.run_name

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
    # The diverged run's loss/train chart shows the epoch it diverged in (the spike up to the divergence), neither
    # left out nor the absurd mean of the steps after it (3e18 flattened the chart).
    def history(key):
        return [m.value for m in sorted(client.get_metric_history(diverged.info.run_id, key), key=lambda m: m.step)]

    epochs, steps = history("loss/train"), history("loss/train_step")
    assert epochs and steps[0] < epochs[-1] <= max(steps), f"loss/train hides the divergence: {epochs} {steps}"


GENAI = ("Evaluation runs", "Judges", "Evaluations")  # GenAI's links (a run's breadcrumb: "Evaluations")


def in_training_view(b: Browser, what: str) -> None:
    links = set(b.eval("[...document.querySelectorAll('a')].map(a => a.innerText.trim())"))
    shown = [w for w in GENAI if w in links]  # GenAI's sidebar and breadcrumb links (the text may quote them)
    assert not shown, f"{what}: MLflow shows its GenAI view ({shown}) at {b.url()}"
    assert b.local_storage("mlflow.workflowType_v1") == '"machine_learning"', what


ROWS = """[...document.querySelectorAll('a[href*="/runs/"]')].map(a => [a.closest('[row-index]'), a.innerText.trim()])
  .filter(([row, name]) => row && name).map(([row, name]) => [Number(row.getAttribute('row-index')), name])"""


def test_a_users_clicks_never_leave_the_training_view(ui):
    client, eid, parent, children = study_runs(ui)
    diverged = next(r for r in children if r.data.tags["verdict"] == "diverged")
    shots = ui["tmp"] / "screens"
    shots.mkdir(exist_ok=True)
    with Browser(CHROMIUM, ui["tmp"] / "clicks", WIDTH, HEIGHT) as b:
        # 1. The printed link: the study's view, the study run first, each cell's runs together in lr order.
        b.goto(ui["link"])
        b.wait_text(diverged.info.run_name)
        in_training_view(b, "the printed link")
        b.screenshot(shots / "1-link.png")
        rows = dict(b.eval(ROWS))
        names = [rows[i] for i in sorted(rows)]
        assert names[0] == "agc_lambda", names
        cells = [re.sub(r"^\S+ ", "", n).split(" lr")[0] for n in names[1:]]
        assert cells == sorted(cells, key=cells.index) and len(set(cells)) == 2, f"a cell's runs apart: {names}"
        for cell in set(cells):
            lrs = [float(n.split(" lr")[1].split()[0]) for n in names[1:] if f" {cell} lr" in f" {n}"]
            assert lrs == sorted(lrs), f"{cell}: runs not in lr order: {names}"
        # the verdict, the phase and the reason are on screen, not past its right edge
        right = b.eval("Object.fromEntries([...document.querySelectorAll('.ag-header-cell')].map(h => "
                       "[h.innerText.trim(), h.getBoundingClientRect().right]))")
        for col in ("verdict", "phase", "reason"):
            assert col in right and right[col] <= WIDTH, f"column {col} off screen: {right}"

        # 2. A click on a trial: its page, still the training view, its description explaining its verdict.
        b.click_text(diverged.info.run_name)
        b.wait_text("diverged at step")
        in_training_view(b, "a run opened from the table")
        assert "peak lr" in b.text() and "base lr" in b.text()
        b.screenshot(shots / "2-run.png")

        # 3. Its breadcrumb back to the experiment: the runs table, still the training view.
        b.click(f"[...document.querySelectorAll('a')].find(a => /#\\/experiments\\/{eid}(\\/runs)?([?]|$)/"
                ".test(a.getAttribute('href') || '') && a.innerText.trim() === 'agc_lambda')", "the breadcrumb")
        b.wait(f"/experiments\\/{eid}\\/runs([?]|$)/.test(location.href.split('#')[1] || '')", "the runs table")
        b.wait_text(diverged.info.run_name)
        in_training_view(b, "the breadcrumb")
        b.screenshot(shots / "3-breadcrumb.png")

        # 4. Back: the run again, in the training view.
        b.back()
        b.wait_text("diverged at step")
        in_training_view(b, "back")

        # 5. The study run: its description opens with the frontier table and the findings; nothing widens the page.
        b.goto(f"{ui['url']}/#/experiments/{eid}/runs/{parent.info.run_id}")
        b.wait_text("Largest base lr that trains")
        in_training_view(b, "the study run")
        text = b.text()
        assert text.index("Largest base lr that trains") < text.index("Findings") < text.index("trials in")
        assert b.eval("document.documentElement.scrollWidth") <= WIDTH, "something widens the page"
        b.screenshot(shots / "4-study-run.png")

"""An MLflow server app (`mlflow server --app-name nfnet-lab`, or `nfnet-lab-auth` with MLflow's basic auth) that
opens every page in MLflow's model-training view, in any browser, whatever link was followed.

Why a server app: MLflow 3.17's UI decides between its two views (GenAI: traces, judges, "Evaluation runs"; model
training: runs, charts) from the page URL's `workflowType` parameter, else from the browser's stored choice (local
storage `mlflow.workflowType_v1`, written when the user clicks "Model training" or "GenAI" in the sidebar), else
GenAI. The experiment's kind tag is not read (the "workflow navigation" flag is compiled in as on), and the server
has no option for it. The UI's own links (a run, a breadcrumb, the experiments list) drop the URL parameter, so a
fresh browser falls into GenAI on its first click. This app serves MLflow's unchanged UI with one line in front of
it that stores the training view as the browser's choice when it has none; a choice the user made is kept. The
same line keeps MLflow's Assistant panel from opening itself over the runs table on a first visit, and gives an
experiment that names a default view (a study's) that view as the browser's own, where it has none: a breadcrumb
back to the experiment opens the study's table, not MLflow's default.

Self-contained (MLflow and Flask only): platform/mlflow/start.sh installs this one file into MLflow's own image."""
from __future__ import annotations

import json
import os

STORED_CHOICE = "mlflow.workflowType_v1"  # MLflow 3.17's useLocalStorage key: `${key}_v${version}`
TRAINING_VIEW = "machine_learning"
# On a local server MLflow 3.17 opens its Assistant panel (a third of a 1,500 px screen, over the runs table) on a
# browser's first visit, once, and remembers that it did: the app says it already has (its button stays).
ASSISTANT_OPENED = "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1"
PRESETS = {STORED_CHOICE: TRAINING_VIEW, ASSISTANT_OPENED: True}


def _preset_script(values: dict) -> str:
    """A script storing each value (as JSON, as MLflow does) under its key where the browser has none yet. Every
    '<' is escaped (\\u003c in the JS strings): a tag's text can never close the script."""
    def js(text: str) -> str:
        return json.dumps(text).replace("<", "\\u003c")

    sets = "".join(f"if(localStorage.getItem({js(k)})===null)localStorage.setItem({js(k)},{js(json.dumps(v))});"
                   for k, v in values.items())
    return f"<script>try{{{sets}}}catch(e){{}}</script>"


PRESET = _preset_script(PRESETS)

# An experiment tag naming one of its saved views (`mlflow.sharedViewState.<key>`, studies/sweep/report.py) as its
# runs table's default: what a breadcrumb or the experiments list opens, not MLflow's default (sorted by date, the
# study's run collapsed over its trials). Stored where MLflow 3.17 keeps a browser's own view of an experiment.
DEFAULT_VIEW_TAG = "nfnet_lab.default_view"
SHARED_VIEW_TAG = "mlflow.sharedViewState."


def _own_view_key(experiment_id: str) -> str:
    return f"MLflowLocalStorage-1.1-ExperimentPage-{json.dumps([experiment_id])}-ReactComponentState"


def default_views(experiments) -> dict[str, dict]:
    """{browser storage key: view state} for every experiment whose DEFAULT_VIEW_TAG names a saved view it has."""
    out = {}
    for exp in experiments:
        tags = exp.tags or {}
        key = tags.get(DEFAULT_VIEW_TAG)
        try:
            state = json.loads(json.loads(tags[SHARED_VIEW_TAG + key])["state"])
        except (KeyError, TypeError, ValueError):
            continue
        out[_own_view_key(exp.experiment_id)] = state
    return out


def _presets() -> dict:
    """PRESETS and the experiments' default views, read from the tracking store for each page load (the UI loads
    its page once; every later view is its own routing); without them where the store cannot say."""
    try:
        from mlflow.entities import ViewType
        from mlflow.server.handlers import _get_tracking_store

        exps = _get_tracking_store().search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000)
        return {**PRESETS, **default_views(exps)}
    except Exception:
        return PRESETS


def with_training_view(index_html: str, preset: str = PRESET) -> str:
    """MLflow's index.html with the preset first in <head>: it runs before the UI's bundle (a deferred script)."""
    head = index_html.find("<head>")
    if head < 0:
        return preset + index_html
    at = head + len("<head>")
    return index_html[:at] + preset + index_html[at:]


def _serve_index(flask_app):
    def serve():
        from flask import Response, send_from_directory

        path = os.path.join(flask_app.static_folder, "index.html")
        if not os.path.exists(path):
            return send_from_directory(flask_app.static_folder, "index.html")  # MLflow's own 404
        with open(path, encoding="utf-8") as f:
            return Response(with_training_view(f.read(), _preset_script(_presets())), mimetype="text/html")

    return serve


def _patched():
    """MLflow's Flask app with its index page (endpoint `serve`, every UI route) answered by _serve_index."""
    from mlflow.server import app as flask_app

    if "serve" not in flask_app.view_functions:
        raise RuntimeError("MLflow's server has no 'serve' endpoint any more: nfnet-lab's app needs updating")
    flask_app.view_functions["serve"] = _serve_index(flask_app)
    return flask_app


def _asgi() -> bool:
    """`mlflow server` runs uvicorn (an ASGI app) unless given --gunicorn-opts or --waitress-opts (WSGI)."""
    return os.environ.get("_MLFLOW_SGI_NAME", "uvicorn") == "uvicorn"


def create_app():
    """Entry point `nfnet-lab` (group mlflow.app): MLflow's server, pages opening in the training view."""
    flask_app = _patched()
    if not _asgi():
        return flask_app
    from mlflow.server.fastapi_app import app  # what `mlflow server` runs by default: it mounts flask_app

    return app


def create_auth_app():
    """Entry point `nfnet-lab-auth`: the same with MLflow's basic auth (its `basic-auth` app), for a team server."""
    flask_app = _patched()
    from mlflow.server.auth import create_app as basic_auth

    return basic_auth(flask_app)

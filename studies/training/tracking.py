"""MLflow tracking through an explicit MlflowClient (no global active-run state), so the same code logs from the
driver, a Tune trial or Ray Train's rank-0 worker into one run id."""
from __future__ import annotations

import functools
import json
import math
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studies.training.config import PROJECT_DIR

# MLflow run status for each training status: a divergence is a result, not an error.
RUN_STATUS = {"completed": "FINISHED", "diverged": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI a command uses: the one given as --tracking-uri (made absolute), else the default. A
    given one holds no credentials: a command line shows in the process list and in Ray job entrypoints."""
    if not uri:
        return default_tracking_uri()
    check_no_credentials(uri, "--tracking-uri")
    return absolute_tracking_uri(uri, "--tracking-uri")


def default_tracking_uri() -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return absolute_tracking_uri(env)
    # Absolute path: Ray changes the working directory inside workers and trials.
    return f"sqlite:///{PROJECT_DIR / 'mlflow.db'}"


# 'mlflow.internal:5000' (or 'user@host:5000/'): a server without its scheme, which MLflow would take for a
# local file store named after the host.
HOST_PORT = re.compile(r"(?:(?P<user>[^/@]*)@)?(?P<host>[A-Za-z0-9][A-Za-z0-9-]*(?:\.[A-Za-z0-9-]+)*:\d{1,5})"
                       r"(?P<rest>/.*)?", re.DOTALL)


def absolute_tracking_uri(uri: str, given: str = "tracking URI") -> str:
    """`given` names where the URI came from in a refusal: the flag, or the default 'tracking URI'."""
    if uri.startswith("sqlite:") and not uri.startswith("sqlite:///"):
        raise ValueError(f"{given} {redact(uri)!r}: a SQLite URI takes three slashes and a path, e.g. "
                         f"sqlite:///{Path(uri.split(':', 1)[1].lstrip('/') or 'mlflow.db').resolve()}")
    if "://" not in uri and uri.endswith((".db", ".sqlite")):
        raise ValueError(f"{given} {uri!r} looks like a SQLite file; use sqlite:///{Path(uri).resolve()}")
    server = HOST_PORT.fullmatch(uri)
    if server:
        raise ValueError(f"{given} {redact(uri)!r} is a server without its scheme (MLflow would make a local folder "
                         f"of it); use http://{server['host']}{server['rest'] or ''}")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a plain directory: file store
        return f"file://{Path(uri).resolve()}"
    return uri


def artifact_location(uri: str) -> str | None:
    """Artifacts of a local store go beside its database, not into ./mlruns of whatever working directory a
    Ray trial happens to have; servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail before any trial starts when the tracking store cannot be reached."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            raise ConnectionError(
                f"MLflow tracking server {redact(uri)} is unreachable ({e}); start it (see platform/mlflow/) or "
                "pass --tracking-uri / MLFLOW_TRACKING_URI pointing at a running server"
            ) from None
        check_credentials(uri, timeout)
    elif parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            raise FileNotFoundError(f"MLflow sqlite store {redact(uri)}: directory {db.parent} does not exist; "
                                    "create it")
    elif parsed.scheme not in ("file", "databricks", "postgresql", "mysql", ""):
        raise ValueError(f"unsupported MLflow tracking URI {redact(uri)!r}; use http(s)://, sqlite:///ABS/PATH or "
                         "a path")


def check_credentials(uri: str, timeout: float = 5.0) -> None:
    """One authenticated request, so wrong credentials fail before any trial (not as a late traceback)."""
    import base64
    import urllib.error
    import urllib.request

    p = urllib.parse.urlparse(uri)
    user = p.username or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = p.password or os.environ.get("MLFLOW_TRACKING_PASSWORD")
    base = p._replace(netloc=p.hostname + (f":{p.port}" if p.port else "")).geturl().rstrip("/")
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default")
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode())
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        req.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    try:
        urllib.request.urlopen(req, timeout=timeout).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise PermissionError(
                f"MLflow server {redact(uri)} refused the credentials (HTTP {e.code}); set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account of that server") from None
    except OSError:
        pass  # reachable a moment ago: a slow or odd server is left to MLflow's own retries


def _user_part(uri: str) -> tuple[str, str, str] | None:
    """(scheme://, user part, host and the rest) of a URI with a user part before its host (also a scheme-less
    'user:pw@host:5000'), else None."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        server = HOST_PORT.fullmatch(uri)
        if server is None or server["user"] is None:
            return None
        return "", server["user"], server["host"] + (server["rest"] or "")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    return (f"{scheme}://", userinfo, host + slash + path) if at else None


def redact(uri: str) -> str:
    """The URI without its secret (it goes into summaries, params and logs): user:***@ for user:password@, and
    ***@ for a bare user part, which may be a token. Never raises: it also shows the URIs that are refused."""
    parts = _user_part(uri)
    if parts is None:
        return uri
    prefix, userinfo, rest = parts
    user, colon, _ = userinfo.partition(":")
    return f"{prefix}{user + ':***' if colon else '***'}@{rest}"


def check_no_credentials(uri: str, given: str = "--tracking-uri") -> None:
    """Refuse user:password@ (or a token as the user) in a URI, as `storage` refuses them in storage URIs: the
    URI shows in logs, the process list and Ray job entrypoints. The refusal shows the URI without them."""
    parts = _user_part(uri)
    if parts is None or not parts[1]:
        return
    prefix, userinfo, rest = parts
    database = prefix.startswith(("postgresql", "mysql"))
    if database and ":" not in userinfo:
        return  # a database user name alone; its password comes from the environment
    env = "PGPASSWORD or ~/.pgpass for PostgreSQL" if database else \
        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
    raise ValueError(f"{given} {prefix}***@{rest}: credentials in a URI end up in logs, the process list and Ray "
                     f"job entrypoints; remove them and use the environment ({env})")


# MLflow's INFO lines a run has nothing to say about ("Creating initial MLflow database tables...", "Updating
# database tables", alembic's "Context impl SQLiteImpl."): a study's console shows its own lines only.
QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration")


def _client(uri: str):
    import logging

    from mlflow.tracking import MlflowClient

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


@functools.cache  # once per process: every trial's row and run carry it
def git_commit(short: bool = True) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=PROJECT_DIR,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# A run's verdict in front of its name (the runs table shows names, not tags): trained, stalled, collapsed (left
# its start, never blew up), diverged; failed and stopped runs have no verdict. The same word is the `verdict` tag.
MARKS = {"trained": "✓", "stalled": "≈", "collapsed": "↯", "diverged": "✗", "failed": "!", "stopped": "■"}


def marked_name(name: str, status: str, verdict: str | None) -> str:
    mark = MARKS.get(verdict or status, "")
    return f"{mark} {name}" if mark else name


# The code that computes a run's numbers (not the sweep around it, which only decides which runs happen).
_NUMERIC_CODE = ("nfnet", "storage", "studies/training")


@functools.cache
def code_version() -> str:
    """Hash of the source that computes a run's numbers: recorded per row and in study.json, so a --resume under
    other code is told (a git commit is not enough: uncommitted edits, or an install without .git)."""
    import hashlib

    h = hashlib.sha1()
    for d in _NUMERIC_CODE:
        for f in sorted((PROJECT_DIR / d).glob("*.py")):
            h.update(f"{d}/{f.name}\0".encode() + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


@functools.cache
def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"cpu x{os.cpu_count()}"


def _tag_filter(key: str, value: str) -> str:
    """An MLflow search filter for one tag value. MLflow's parser has no escape inside a quoted string, so a value
    with ' is quoted with " (the study's own keys are hex and never need it)."""
    if "'" not in value:
        return f"tags.`{key}` = '{value}'"
    if '"' not in value:
        return f'tags.`{key}` = "{value}"'
    raise ValueError(f"tag {key}: a value with both quote characters cannot be searched for: {value!r}")


class Tracker:
    """One MLflow run, addressed by id."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = _client(uri)

    @classmethod
    def create(cls, uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
               parent_run_id: str | None = None, reuse_tag: tuple[str, str] | None = None,
               reopen: bool = False) -> Tracker:
        """A new run, or the existing one whose tag `reuse_tag` matches (a resumed study never duplicates). An
        ended run with that tag is never appended to: it is replaced (its caller died before recording it), or,
        with `reopen` (a study's own run, the parent of its trials), set running again."""
        client = _client(uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment,
                                                                        artifact_location=artifact_location(uri))
        if reuse_tag is not None:
            k, v = reuse_tag
            found = client.search_runs([exp_id], filter_string=_tag_filter(k, v), max_results=1)
            if found and (found[0].info.status == "RUNNING" or reopen):  # a retried or resumed run continues
                if found[0].info.status != "RUNNING":
                    client.update_run(found[0].info.run_id, status="RUNNING")
                return cls(uri, found[0].info.run_id)
            if found:  # ended, but its caller never recorded it (died in between): a fresh run, never appended to
                client.delete_run(found[0].info.run_id)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if reuse_tag is not None:
            all_tags[reuse_tag[0]] = reuse_tag[1]
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
        if reuse_tag is None:
            return cls(uri, run.info.run_id)
        # A create retried by the HTTP client after a lost response (a server restart) makes a second run with the
        # same key: keep the oldest, delete the others, so every key has one run.
        same = client.search_runs([exp_id], filter_string=_tag_filter(k, v),
                                  order_by=["attributes.start_time ASC"], max_results=50)
        for dup in same[1:]:
            client.delete_run(dup.info.run_id)
        return cls(uri, same[0].info.run_id if same else run.info.run_id)

    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        if tags:  # one request, not one per tag
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, d: dict[str, Any], name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_text(json.dumps(d, indent=2, default=str))
            self.log_artifact(p)

    def log_figure(self, fig, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            fig.savefig(p, dpi=120, bbox_inches="tight")
            self.log_artifact(p)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def end(self, status: str, verdict: str | None = None, name: str | None = None) -> None:
        """Mark the run ended; with `name`, renamed to it behind its verdict's mark ('✗ b1024 λ0.16 lr3.2 scan s0').
        One status a reader can trust: a judged run's `verdict` tag (its `status` would only repeat it less
        precisely: completed or diverged), else the `status` tag (failed, stopped)."""
        self.set_tags({"verdict": verdict} if verdict else {"status": status})
        if name:
            self.client.update_run(self.run_id, name=marked_name(name, status, verdict))
        self.client.set_terminated(self.run_id, RUN_STATUS.get(status, "FINISHED"))


# The loop's metrics under MLflow sections. MLflow groups a run's charts by the part before the first '/' and
# sorts the sections by name (its charts view, 3.17), so the names are chosen for that order: the loss first, then
# the optimizer, stability (AGC's clipped fractions, gradient norms, the noise scale), throughput, top-1 accuracy.
# `step` and `epoch` are the x axis, not metrics; text (status) is a tag. The Parquet tables keep the loop's names.
SECTIONS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_loss_step": "loss/train_step",
            "lr": "opt/lr", "agc_clipped_frac": "stability/agc_clipped_frac",
            "grad_norm_before": "stability/grad_norm_before_clip", "grad_norm_after": "stability/grad_norm_after_clip",
            "gns": "stability/grad_noise_scale", "images_per_sec": "throughput/images_per_sec",
            "step_time_ms": "throughput/step_time_ms", "train_acc": "top1/train", "val_acc": "top1/val",
            "best_val_acc": "top1/best_val"}
NOT_METRICS = {"step", "epoch", "diverged_step"}


def mlflow_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The loop's numeric metrics by their MLflow names (SECTIONS; a stage's AGC fraction `agc_clipped_frac.stem`
    is `stability/agc_clipped_frac/stem`); non-finite values are left out (MLflow charts break on NaN)."""
    out = {}
    for k, v in metrics.items():
        if k in NOT_METRICS or not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            continue
        name = SECTIONS.get(k)
        if name is None:
            head, dot, stage = k.partition(".")
            name = f"{SECTIONS[head]}/{stage}" if dot and head in SECTIONS else f"other/{k}"
        out[name] = float(v)
    return out


@dataclass(frozen=True)
class Tracking:
    """Where a run's metrics go from the process that trains it: its MLflow run (by id) on the tracking store, and
    whether MLflow's system metrics are sampled into it. Made on the driver once the run exists
    (runner.train_and_track), carried to the process that trains (in-process, or each Ray Train worker), where
    rank 0 logs through it (session.Session)."""

    uri: str
    run_id: str
    system_metrics: bool = False  # sample CPU/GPU/memory into the run (full runs; scans last seconds)

    def logger(self) -> MetricLogger:
        return MetricLogger(self.uri, self.run_id)


class MetricLogger:
    """The loop's metrics (by their MLflow names) into one run, buffered: sent together every `every_s` seconds
    (and by flush(), at the end of a run), one request per batch. While the tracking server is unreachable they
    wait (up to `max_pending` steps, oldest dropped first) and go out with the next flush that gets through;
    training never stops for tracking."""

    def __init__(self, uri: str, run_id: str, every_s: float = 5.0, max_pending: int = 10_000):
        self.tracker = Tracker(uri, run_id)
        self.pending: list[tuple[dict[str, Any], int]] = []
        self.every_s, self.max_pending, self.failures = every_s, max_pending, 0
        self.last = time.monotonic()

    def __call__(self, metrics: dict[str, Any], step: int) -> None:
        self.pending.append((mlflow_metrics(metrics), step))
        del self.pending[: max(0, len(self.pending) - self.max_pending)]
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> bool:
        from mlflow.entities import Metric

        self.last = time.monotonic()
        ts = int(time.time() * 1000)
        while self.pending:
            batch = self.pending[:100]  # MLflow takes up to 1000 metrics a request
            items = [Metric(k, float(v), ts, step) for metrics, step in batch for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
            try:
                if items:
                    self.tracker.client.log_batch(self.tracker.run_id, metrics=items[:1000])
            except Exception as e:  # any tracking error: keep the metrics, keep training
                self.failures += 1
                if self.failures == 1:
                    print(f"warning: MLflow unreachable ({type(e).__name__}); buffering metrics", flush=True)
                return False
            del self.pending[: len(batch)]
        return True

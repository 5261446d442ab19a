import math

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from studies import signal_prop

ALPHA = 0.2
NF, NO_WS, BN = "nf_resnet_cifar", "nf_resnet_cifar:no_ws", "bn_resnet_cifar"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("signal_prop")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = signal_prop.main(["--smoke-test", "--output", str(tmp / "results"), "--tracking-uri", uri])
    return out, uri


def stages(rows, model):
    by = {}
    for r in rows:
        if r["model"] == model:
            by.setdefault(r["stage"], []).append(r)
    return list(by.values())


def test_nf_resnet_variance_grows_by_alpha_squared_and_resets(smoke):
    out, _ = smoke
    nf = stages(out["rows"], NF)
    assert [len(s) for s in nf] == [4, 4, 4]
    for stage in nf:
        for k, r in enumerate(stage, start=1):  # every stage starts with a transition: 1 + k·α²
            assert r["var"] == pytest.approx(1 + k * ALPHA**2, rel=0.15), r
            assert r["expected_var"] == pytest.approx(1 + k * ALPHA**2)
            assert r["mean_sq"] < 0.01 * r["var"]  # Scaled WS: no mean shift
            assert 0.6 < r["residual_var"] < 1.2
        steps = [b["var"] - a["var"] for a, b in zip(stage, stage[1:])]
        assert all(0.01 < d < 0.06 for d in steps), steps
    for prev, nxt in zip(nf, nf[1:]):
        assert nxt[0]["var"] < prev[-1]["var"]


def test_without_ws_the_mean_shift_grows_with_depth(smoke):
    rows = [r for r in smoke[0]["rows"] if r["model"] == NO_WS]
    nf = [r for r in smoke[0]["rows"] if r["model"] == NF]
    assert rows[-1]["mean_sq"] > 20 * rows[0]["mean_sq"]
    assert rows[-1]["mean_sq"] > 0.5 * rows[-1]["var"]
    assert all(a["mean_sq"] > 100 * b["mean_sq"] for a, b in zip(rows[4:], nf[4:]))
    assert rows[-1]["var"] > 1.3 * rows[-1]["expected_var"]  # drifts off the analytic variance


def test_bn_resnet_branch_is_normalized_and_stream_resets(smoke):
    bn = stages(smoke[0]["rows"], BN)
    assert all(r["residual_var"] == pytest.approx(1.0, abs=1e-3) for s in bn for r in s)
    assert all(math.isnan(r["expected_var"]) for s in bn for r in s)
    for stage in bn:
        assert all(b["var"] > a["var"] for a, b in zip(stage, stage[1:]))
    for prev, nxt in zip(bn, bn[1:]):
        assert nxt[0]["var"] < 0.6 * prev[-1]["var"]


def test_outputs_and_mlflow_run(smoke):
    out, uri = smoke
    files = out["files"]
    img = Image.open(files["signal_prop.png"]).convert("RGB")
    assert img.width > 1200 and img.height > 300
    assert len(img.getcolors(maxcolors=1 << 20)) > 100
    table = pq.read_table(files["signal_prop.parquet"])
    assert table.num_rows == 36
    assert table.schema.names == ["model", "block", "name", "stage", "mean_sq", "var", "residual_var", "expected_var"]
    measured = ["model", "block", "mean_sq", "var", "residual_var"]  # expected_var holds NaN (≠ NaN) for BN
    assert table.select(measured).equals(out["table"].select(measured))
    summary = open(files["summary.txt"]).read()
    assert summary == out["summary"]
    assert f"{NF} (12 blocks)" in summary and "falls back at 2 of 2 stage transitions" in summary

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["models"] == f"{NF} {NO_WS} {BN}" and run.data.params["image_size"] == "32"
    history = client.get_metric_history(out["run_id"], f"{NO_WS}/mean_sq")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(12))
    assert {m.step: m.value for m in history}[11] == pytest.approx(out["rows"][12 + 11]["mean_sq"])
    assert {a.path for a in client.list_artifacts(out["run_id"])} == set(files)

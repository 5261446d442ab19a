import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from studies import agc_lambda, analysis, batch_scaling, hpo, schema, search
from studies.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY_FLAGS = ["--model-overrides", '{"width": 8, "depth": 1}', "--dataset-params", '{"n_train": 512, "n_val": 128}']


def common_flags(tmp_path, name="s"):
    return ["--output", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--data-root", str(tmp_path / "data"), "--name", name]


def mlflow_runs(tmp_path, experiment):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("role") == "study"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return c, parents, children


# ---- the frontier: pure functions over hand-made rows ----

def _row(cell, b, lam, lr, status, seed=0, phase="scan", loss=2.0, acc=None):
    return {"cell": cell, "batch_size": b, "model": "nf_resnet_cifar", "clipping": "none" if lam == "none" else "agc",
            "clip_threshold": None if lam == "none" else float(lam), "lambda": lam, "base_lr": lr, "seed": seed,
            "status": status, "phase": phase, "final_train_loss": loss, "best_val_acc": acc}


def test_frontier_majority_of_seeds_ties_missing_and_first_lr_diverging():
    a, b, c = "batch_size=64 lambda=none", "batch_size=1024 lambda=none", "batch_size=1024 lambda=0.01"
    rows = [
        # a: 0.2 and 0.4 train in 2 of 3 seeds, 0.8 in 1 of 3 (not a majority) -> frontier 0.4; 1.6 trains again
        # but lies beyond the first unstable lr.
        *[_row(a, 64, "none", lr, {"c": "completed", "d": "diverged"}[st], seed=s) for lr, sts in
          ((0.2, "ccd"), (0.4, "cdc"), (0.8, "dcd"), (1.6, "ccc")) for s, st in enumerate(sts)],
        # b: the smallest lr already diverges -> no stable lr at all.
        *[_row(b, 1024, "none", lr, "diverged", seed=s) for lr in (0.2, 0.4) for s in range(3)],
        # c: a missing seed (one row lost) and a failed run do not decide; a 1-1 tie is not a majority.
        _row(c, 1024, "0.01", 0.2, "completed", 0), _row(c, 1024, "0.01", 0.2, "completed", 1),
        _row(c, 1024, "0.01", 0.4, "completed", 0), _row(c, 1024, "0.01", 0.4, "failed", 1),
        _row(c, 1024, "0.01", 0.8, "completed", 0), _row(c, 1024, "0.01", 0.8, "diverged", 1),
    ]
    cells = {r["cell"]: r for r in analysis.frontier_table(pa.Table.from_pylist(rows)).to_pylist()}
    assert (cells[a]["max_stable_lr"], cells[a]["first_unstable_lr"]) == (0.4, 0.8)
    assert cells[a]["stable_fraction"] == pytest.approx(3 / 4) and not cells[a]["max_stable_lr_at_edge"]
    assert cells[b]["max_stable_lr"] is None and cells[b]["first_unstable_lr"] == 0.2
    assert cells[b]["stable_fraction"] == 0 and cells[b]["scan_diverged"] == 6
    assert cells[c]["max_stable_lr"] == 0.4 and cells[c]["first_unstable_lr"] == 0.8
    assert cells[c]["failed_trials"] == 1

    # Full runs go to the lowest-loss stable lrs inside the frontier; equal losses go to the smaller lr.
    chosen = analysis.full_phase_lrs([
        *rows, _row(c, 1024, "0.01", 0.2, "completed", 2, loss=1.5)], top=2)
    assert chosen[a] == [0.2, 0.4] and chosen[b] == [] and chosen[c] == [0.2, 0.4]
    assert analysis.full_phase_lrs([_row(a, 64, "none", lr, "completed", loss=2.0) for lr in (0.1, 0.2, 0.4)],
                                   top=1) == {a: [0.1]}


def test_frontier_summary_states_both_effects_and_says_when_not_shown():
    def cells(no_clip_1024, agc_1024):
        rows = []
        for b, nc, ag in ((64, 3.2, 6.4), (1024, no_clip_1024, agc_1024)):
            for lam, top in (("none", nc), ("0.01", ag)):
                cell = f"batch_size={b} lambda={lam}"
                for lr in (0.2, 0.4, 0.8, 1.6, 3.2, 6.4):
                    rows.append(_row(cell, b, lam, lr, "completed" if lr <= top else "diverged"))
                rows.append(_row(cell, b, lam, min(top, 0.4), "completed", phase="full", acc=0.5))
        return analysis.frontier_table(rows)

    shown = analysis.frontier_summary(cells(0.4, 1.6))
    assert "≥6.4" in shown  # stable up to the largest lr tried
    assert "falls as the batch grows: 3.2 at batch 64 → 0.4 at batch 1024 (÷8)" in shown
    assert "at batch 1024 AGC λ=0.01 trains up to lr 1.6, 4× the 0.4 without clipping" in shown
    assert "NOT SHOWN" not in shown
    hidden = analysis.frontier_summary(cells(3.2, 3.2))
    assert hidden.count("NOT SHOWN") == 2


def test_top_k_mean_is_the_papers_best_4_of_5():
    assert analysis.top_k_mean([0.1, 0.5, 0.4, 0.3, 0.2], 4) == pytest.approx((0.5 + 0.4 + 0.3 + 0.2) / 4)
    assert analysis.top_k_mean([float("nan"), 0.3], None) == pytest.approx(0.3)


def test_specs_scan_then_full_and_paper_protocol():
    fixed = TrainConfig(model_overrides={"width": 8, "depth": 1}, epochs=2, warmup_steps=0)
    st = search.Study("s", search.Preset(grid={"batch_size": [64, 256], "clip_threshold": [0.01, None]},
                                         fixed={}, lrs=(0.2, 0.4, 0.8), scan_steps=10, seeds=2), fixed)
    specs = search.scan_specs(st, n_train=1024)
    assert len(specs) == 4 * 3 * 2 and len({s.key for s in specs}) == len(specs)
    cfg = TrainConfig.from_dict(specs[0].config)
    # The scan runs the first 10 steps of the full run's 2 epochs × 16 steps, without evaluation.
    assert (cfg.max_steps, cfg.schedule_steps, cfg.eval_every_epochs) == (10, 32, 0)
    none = [TrainConfig.from_dict(s.config) for s in specs if "lambda=none" in s.cell]
    assert all(c.clipping == "none" and c.clip_threshold is None for c in none)
    paper = search.Study("p", search.Preset(grid={"batch_size": [256], "clip_threshold": [0.01]}, fixed={},
                                            lrs=(0.1,), seeds=5, best_k=4), fixed)
    full = search.full_specs(paper, None)
    assert [TrainConfig.from_dict(s.config).seed for s in full] == [0, 1, 2, 3, 4]
    assert {TrainConfig.from_dict(s.config).lr for s in full} == {0.1}  # linear scaling: 0.1 × 256/256


# ---- bad input: one clear line, before any trial ----

@pytest.mark.parametrize("flags, msg", [
    (["--batch-sizes", "100000"], "larger than the training split"),
    (["--lambdas", "-0.1"], "λ must be > 0"),
    (["--lambdas", "0.02", "0.02"], "lists a value twice"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--max-concurrent", "-1"], "--max-concurrent must be >= 1"),
    (["--max-failures", "-1"], "max_failures must be >= 0"),
    (["--gns-every-steps", "-1"], "gns_every_steps must be >= 0"),
    (["--image-size", "-5"], "image_size must be positive"),
    (["--base-lr", "0.3"], "--base-lr does nothing in this study"),
    (["--clipping", "none"], "--clipping does nothing"),
    (["--name", "lr's test"], "--name"),
    (["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    (["--dataset", "cifar10", "--dataset-params", '{"path": "/no/such/dir"}'], "/no/such/dir"),
    (["--use-gpu", "true"], "GPU"),
    (["--batch-sizes", "100", "--num-workers", "8"], "not divisible by num_workers 8"),
    (["--dataset-params", '{"num_train": 5000}'], "did you mean n_train"),
    (["--model-overrides", '{"widht": 16}'], "widht"),
    (["--data-root", "data"], "relative path"),
    (["--output", "s3:/bucket"], "s3:/bucket"),
    (["--output", "/proc/no-such-dir"], "cannot write"),
    (["--tracking-uri", "sqlite://mlflow.db"], "three slashes"),
    (["--tracking-uri", "mlflow.db"], "looks like a SQLite file"),
])
def test_bad_study_input_fails_before_any_trial(tmp_path, flags, msg, ray_cluster, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a bad path taken for a relative one would land here
    base = ["--smoke-test", *common_flags(tmp_path)]
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        agc_lambda.main(base + flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and "Traceback" not in err
    assert len(err.strip().splitlines()[-1]) > 30 and time.time() - t0 < 30  # one clear line, at once
    assert not (tmp_path / "out" / "s" / "results").exists()
    assert not (tmp_path / "out" / "s" / "study.json").exists()  # the fixed command is not told to --resume
    assert not (tmp_path / "s3:").exists()  # 's3:/bucket' was not taken for a relative folder


# ---- end to end through Ray Tune ----

def _grid_flags(tmp_path, name, *extra):
    return ["--smoke-test", *common_flags(tmp_path, name), *TINY_FLAGS, "--batch-sizes", "32", "64",
            "--lambdas", "0.04", "none", "--lrs", "0.1", "0.8", "25.6", "--scan-steps", "4", "--full-top", "1",
            "--max-steps", "8", "--warmup-steps", "0", *extra]


def _rows(out, phase=None):
    keep = ("trial_key", "phase", "cell", "batch_size", "clipping", "clip_threshold", "base_lr", "lr", "seed",
            "status", "diverged_step", "steps", "best_val_acc", "final_train_loss")
    return sorted(tuple(r[k] for k in keep) for r in out["results"].to_pylist() if phase in (None, r["phase"]))


@pytest.mark.ray
def test_two_phase_study_end_to_end_and_independent_of_concurrency(tmp_path, ray_cluster):
    one = agc_lambda.main(_grid_flags(tmp_path, "one", "--max-concurrent", "1"))
    two = agc_lambda.main(_grid_flags(tmp_path, "two", "--max-concurrent", "2"))
    assert _rows(one) == _rows(two)  # the same seed gives the same rows, however many trials run at once

    res = one["results"]
    rows = res.to_pylist()
    scan = [r for r in rows if r["phase"] == "scan"]
    full = [r for r in rows if r["phase"] == "full"]
    assert len(scan) == 4 * 3 and all(r["steps"] <= 4 and r["best_val_acc"] is None for r in scan)
    assert any(r["status"] == "diverged" for r in scan)  # lr 25.6 blows up
    for r in rows:  # the values the trial ran with, under TrainConfig's names
        assert r["lr"] == pytest.approx(r["base_lr"] * r["batch_size"] / 256)
        assert (r["clipping"], r["clip_threshold"]) in (("agc", 0.04), ("none", None))
        assert r["model"] == "nf_resnet_cifar" and r["node_id"] and r["mlflow_run_id"]
    cells = {c["cell"]: c for c in one["cells"].to_pylist()}
    assert len(cells) == 4 and len(full) == sum(c["max_stable_lr"] is not None for c in cells.values())
    for r in full:  # full runs at the cell's best stable lr only, for the whole budget, evaluated
        assert r["base_lr"] <= cells[r["cell"]]["max_stable_lr"] and r["steps"] == 8 or r["status"] == "diverged"
    assert all(c["best_val_acc"] is not None for c in cells.values() if c["max_stable_lr"] is not None)

    d = tmp_path / "out" / "one"
    assert pq.read_table(d / "cells.parquet").num_rows == 4 and pq.read_table(d / "results.parquet").num_rows == 16
    import numpy as np
    from PIL import Image

    for png in ("stable_region.png", "stability_map.png", "lr_sensitivity.png"):
        img = np.asarray(Image.open(d / png).convert("L"))
        assert img.shape[1] > 400 and len(np.unique(img)) > 20, png  # a real picture, not a blank canvas

    c, parents, children = mlflow_runs(tmp_path, "one")
    assert len(parents) == 1 and len(children) == res.num_rows and parents[0].info.status == "FINISHED"
    assert {ch.data.tags["trial_key"] for ch in children} == {r["trial_key"] for r in rows}
    arts = {a.path for a in c.list_artifacts(parents[0].info.run_id)}
    assert {"stable_region.png", "stability_map.png", "lr_sensitivity.png", "cells.parquet"} <= arts
    assert "max_stable_lr/lambda_0.04" in parents[0].data.metrics
    hist = c.get_metric_history(parents[0].info.run_id, "max_stable_lr/lambda_0.04")
    assert sorted(m.step for m in hist) == [32, 64]  # step = batch size: the frontier charted over the batch
    by_id = {ch.info.run_id: ch for ch in children}
    for r in rows:
        params = by_id[r["mlflow_run_id"]].data.params
        assert int(params["batch_size"]) == r["batch_size"] and float(params["base_lr"]) == r["base_lr"]
        assert ("clip_threshold" in params) == (r["clipping"] == "agc")  # no unused λ without clipping
        assert by_id[r["mlflow_run_id"]].data.tags["lambda"] == r["lambda"]

    # The same output again without --resume is refused; --resume with other flags too.
    with pytest.raises(SystemExit):
        agc_lambda.main(_grid_flags(tmp_path, "one", "--max-concurrent", "1"))
    with pytest.raises(SystemExit):
        agc_lambda.main(_grid_flags(tmp_path, "one", "--max-concurrent", "1", "--resume", "--epochs", "3"))

    # --resume across the phase boundary: drop the full phase's rows (as if the driver died after the scan);
    # only the full runs are redone, into the same MLflow runs.
    results_dir = tmp_path / "out" / "one" / "results" / "results"
    for part in results_dir.glob("part-*.parquet"):
        if pq.read_table(part).column("phase").to_pylist() == ["full"]:
            part.unlink()
    again = agc_lambda.main(_grid_flags(tmp_path, "one", "--max-concurrent", "1", "--resume"))
    assert _rows(again) == _rows(one)
    _, parents, children = mlflow_runs(tmp_path, "one")
    assert len(parents) == 1 and len(children) == res.num_rows


def test_a_cell_whose_model_cannot_be_built_is_refused_before_any_trial(tmp_path):
    study = search.Study(
        name="fails", preset=search.Preset(grid={"model_overrides": [{"width": 8, "depth": 1},
                                                                     {"width": -4, "depth": 1}]}, fixed={}),
        fixed=TrainConfig(max_steps=4, batch_size=32, dataset_params={"n_train": 256, "n_val": 64},
                          data_root=str(tmp_path / "data")),
        output=str(tmp_path / "out"), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", max_concurrent=2)
    with pytest.raises(ValueError, match="width must be >= 1, got -4"):
        search.run_study(study)
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


@pytest.mark.ray
@pytest.mark.parametrize("module", [batch_scaling, hpo])
def test_every_study_smoke_test(tmp_path, ray_cluster, module, capfd):
    out = module.main(["--smoke-test", *common_flags(tmp_path, module.__name__.split(".")[-1])])
    assert out["results"].num_rows >= 1 and out["complete"]
    # Tune keeps its JSON/CSV trial logs (its analysis reads them) and writes no TensorBoard files, whose writer
    # warned "NaN or Inf" on metrics that are NaN on purpose
    printed = "".join(capfd.readouterr())
    assert "NaN or Inf" not in printed and "Failed to fetch metrics" not in printed
    tune_files = {p.name for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert {"result.json", "progress.csv"} <= tune_files
    assert not any(n.startswith("events.out.tfevents") for n in tune_files)
    assert set(out["results"].column("status").to_pylist()) <= {"completed", "diverged"}
    figs = [n for n in out["files"] if n.endswith(".png")]
    assert figs and all(Path(out["files"][n]).stat().st_size > 5000 for n in figs)
    if module is hpo:
        assert set(out["best_params"]) == {"base_lr", "clip_threshold", "augment_strength"}
        rows = out["results"].to_pylist()  # the row holds the values TPE chose, under TrainConfig's names
        assert {(r["base_lr"], r["clip_threshold"], r["augment_strength"]) for r in rows} == \
            {(t.params["base_lr"], t.params["clip_threshold"], t.params["augment_strength"])
             for t in hpo.optuna_study(out["results"], hpo.PRESETS["smoke"].tpe).trials}


def test_local_paths_refused_on_a_multi_node_cluster(tmp_path):
    study = search.Study(name="x", preset=search.Preset(grid={"batch_size": [32]}, fixed={}),
                         fixed=TrainConfig(data_root="s3://bucket/data"), output="relative/results",
                         tracking_uri="sqlite:////abs/mlflow.db")
    search.check_cluster_paths(study, nodes=1)  # a laptop: fine
    with pytest.raises(ValueError, match="--output relative/results.*--tracking-uri") as e:
        search.check_cluster_paths(study, nodes=3)
    assert "--data-root s3://" not in str(e.value)  # remote data is fine


def test_results_schema_is_derived_from_the_summary_and_config():
    names = schema.results_schema().names
    for col in ("batch_size", "clipping", "clip_threshold", "base_lr", "lr", "seed", "model", "phase", "status",
                "diverged_step", "best_val_acc", "final_train_loss", "steps", "node_id", "mlflow_run_id"):
        assert col in names, col
    assert not [n for n in names if n.startswith(("sci_", "nui_", "metric_"))]
    readme = (ROOT / "README.md").read_text()
    for col in names + list(analysis.CELL_COLUMNS):  # the public tables are documented, column by column
        assert f"`{col}`" in readme, col
    assert json.loads(json.dumps(schema.RunSummary(status="completed").scalars()))["status"] == "completed"


def test_a_second_study_on_the_same_output_is_refused(tmp_path, ray_cluster, capsys):
    import storage

    held = storage.acquire_lock(str(tmp_path / "out" / "s"), owner="study s", heartbeat=False)  # the first study
    try:
        with pytest.raises(SystemExit) as e:
            agc_lambda.main(["--smoke-test", *common_flags(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "is in use by study s" in err and "another --output" in err
        assert not (tmp_path / "out" / "s" / "results").exists()
    finally:
        held.release()


def test_fractional_gpus_pack_small_trials():
    cfg = TrainConfig(use_gpu=True, gpus_per_worker=0.25, cpus_per_worker=2)
    assert search.cluster_concurrency(cfg, {"CPU": 16, "GPU": 1}) == 4  # four CIFAR-size trials share one GPU
    assert search.cluster_concurrency(cfg.replace(gpus_per_worker=1.0), {"CPU": 16, "GPU": 1}) == 1
    assert search.cluster_concurrency(cfg, {"CPU": 4, "GPU": 1}) == 2  # then the CPUs are the limit
    # platform/README.md's worked example: 8 GPU workers per trial on 4 × 8-GPU, 96-CPU nodes
    big = TrainConfig(use_gpu=True, num_workers=8, cpus_per_worker=8)
    assert search.cluster_concurrency(big, {"CPU": 384, "GPU": 32}) == 4
    with pytest.raises(RuntimeError, match="--max-concurrent"):  # a fixed CPU-only cluster
        search.cluster_concurrency(big, {"CPU": 8})
    with pytest.raises(ValueError, match="gpus_per_worker"):
        TrainConfig(gpus_per_worker=1.5)


def test_autoscaling_cluster_is_sized_by_its_maximum_and_path_checked(tmp_path, monkeypatch):
    # platform/cluster/aws.yaml as `ray up` leaves it on the head: no GPU node is up at start (head only, CPU 0).
    monkeypatch.setenv("NFNET_LAB_AUTOSCALER_CONFIG", str(ROOT / "platform/cluster/aws.yaml"))
    most = search._autoscaler_resources()
    # max_workers 8 overall, richest first: 4 × p4d (8 GPU, 96 CPU) then 4 × g5 (1 GPU, 16 CPU)
    assert most["GPU"] == 4 * 8 + 4 * 1 and most["CPU"] == 4 * 96 + 4 * 16
    cap = search.Capacity(now={"CPU": 0.0}, max=most, nodes=1)
    imagenet = search.Study(name="i", preset=agc_lambda.PRESETS["imagenet"],
                            fixed=TrainConfig(**agc_lambda.PRESETS["imagenet"].fixed, data_root="/data"),
                            output="/results", tracking_uri="http://mlflow:5000")
    assert search.cluster_concurrency(imagenet.fixed, cap) == 4  # 4 trials × 8 GPUs, not "0 GPU(s)"
    with pytest.raises(RuntimeError, match="0 GPU"):  # the same cluster read from its live nodes alone
        search.cluster_concurrency(imagenet.fixed, search.Capacity(now={"CPU": 0.0}))
    with pytest.raises(ValueError, match="autoscales.*--output /results"):  # one node up, but it will grow
        search.check_cluster_paths(imagenet, cap.nodes, cap.autoscaling)
    search.check_cluster_paths(imagenet, cap.nodes, autoscaling=False)  # a fixed one-node cluster: local is fine
    gcp = search.autoscaler_max({"max_workers": 2, "head_node_type": "h",
                                 "available_node_types": {"h": {"resources": {"CPU": 4}},
                                                          "a": {"max_workers": 5, "resources": {"GPU": 1}},
                                                          "b": {"max_workers": 1, "resources": {"GPU": 8}}}})
    assert gcp == {"CPU": 4.0, "GPU": 8.0 + 1.0}  # cap 2 nodes: the 8-GPU one, then one 1-GPU

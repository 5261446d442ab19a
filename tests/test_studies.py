import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from studies import agc_lambda, batch_scaling, findings, frontier, hpo, schema, search
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


# ---- the design: every trial known before it runs ----

def test_specs_scan_then_full_and_paper_protocol():
    fixed = TrainConfig(model_overrides={"width": 8, "depth": 1}, epochs=2, warmup_steps=0)
    st = search.Study("s", search.Preset(grid={"batch_size": [64, 256], "clip_threshold": [0.01, None]},
                                         fixed={}, lrs=(0.2, 0.4, 0.8), scan_steps=10, scan_examples=1280, seeds=2),
                      fixed)
    specs = search.scan_specs(st, n_train=1024)
    assert len(specs) == 4 * 3 * 2 and len({s.key for s in specs}) == len(specs)
    by_batch = {TrainConfig.from_dict(s.config).batch_size: TrainConfig.from_dict(s.config) for s in specs}
    # The scan budget is a floor in steps AND examples (batch 64: 1280 / 64 = 20 steps; batch 256: 10 steps),
    # longer than the 2-epoch full run at batch 256 (8 steps): the full run's length never cuts it.
    assert (by_batch[64].max_steps, by_batch[256].max_steps) == (20, 10)
    assert all((c.lr_schedule, c.eval_every_epochs, c.schedule_steps) == ("constant", 0, None)
               for c in by_batch.values())
    none = [TrainConfig.from_dict(s.config) for s in specs if "lambda=none" in s.cell]
    assert all(c.clipping == "none" and c.clip_threshold is None for c in none)
    paper = search.Study("p", search.Preset(grid={"batch_size": [256], "clip_threshold": [0.01]}, fixed={},
                                            lrs=(0.1,), seeds=5, best_k=4), fixed)
    full = search.full_specs(paper, None)
    assert [TrainConfig.from_dict(s.config).seed for s in full] == [0, 1, 2, 3, 4]
    assert {TrainConfig.from_dict(s.config).lr for s in full} == {0.1}  # linear scaling: 0.1 × 256/256


def test_a_scan_runs_past_the_warmup_to_the_lr_it_is_labelled_with():
    from studies import loop

    # cifar10-like: 2 warmup epochs at batch 256 of 50k images are 390 steps, longer than the 100-step scan.
    fixed = TrainConfig(epochs=30, warmup_epochs=2, batch_size=256)
    st = search.Study("w", search.Preset(grid={"batch_size": [256, 4096]}, fixed={}, lrs=(0.4,), scan_steps=100),
                      fixed)
    for spec in search.scan_specs(st, n_train=50_000):
        cfg = TrainConfig.from_dict(spec.config)
        total, schedule, warmup = loop.run_length(cfg, 50_000 // cfg.batch_size)
        assert total == warmup + 100 and warmup == round(2 * (50_000 // cfg.batch_size))
        assert loop.lr_at(total - 1, schedule, warmup, cfg.lr, cfg.lr_schedule) == pytest.approx(cfg.lr)
        assert loop.lr_at(warmup - 1, schedule, warmup, cfg.lr, cfg.lr_schedule) == pytest.approx(cfg.lr)
    # Every preset of every grid study: each scan ends at its peak lr, after at least its budget of steps.
    for module in (agc_lambda, batch_scaling):
        for name, preset in module.PRESETS.items():
            if not preset.scan_steps:
                continue
            study = search.Study(name, preset, TrainConfig(**preset.fixed))
            for spec in search.scan_specs(study, n_train=50_000):
                cfg = TrainConfig.from_dict(spec.config)
                total, schedule, warmup = loop.run_length(cfg, 50_000 // cfg.batch_size)
                assert total - warmup >= preset.scan_steps, (module.__name__, name)
                assert loop.lr_at(total - 1, schedule, warmup, cfg.lr, cfg.lr_schedule) == pytest.approx(cfg.lr)


def test_a_budget_the_data_cannot_fill_is_said_before_any_trial():
    fixed = TrainConfig(epochs=2, warmup_steps=0)
    st = search.Study("b", search.Preset(grid={"batch_size": [64, 256, 1024]}, fixed={}, lrs=(0.4,),
                                         scan_steps=40), fixed)
    notes = search.budget_notes(st, n_train=1500)  # 1,500 real images: batch 1024 has 1 step per epoch
    assert len(notes) == 2
    assert notes[0].startswith("at batch 256 the full run (10 steps) is shorter than its scan (40 steps")
    assert notes[1].startswith("batch 1024 gives 1 step(s) per epoch of the 1500 training images (2 steps")
    assert search.budget_notes(st, n_train=100_000) == []


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
    # The smoke preset's data and scan budget (≥ 8192 examples: 256 steps at batch 32, 128 at 64), enough for
    # this data to leave chance loss; lr 25.6 blows up. The full runs are as long as batch 32's scan, so they can
    # confirm its frontier (shorter ones are flagged in a budget note, and did not hold).
    return ["--smoke-test", *common_flags(tmp_path, name), "--batch-sizes", "32", "64", "--lambdas", "0.04", "none",
            "--lrs", "0.4", "1.6", "25.6", "--full-top", "1", "--max-steps", "320", *extra]


def _rows(out, phase=None):
    keep = ("trial_key", "phase", "cell", "batch_size", "clipping", "clip_threshold", "base_lr", "lr", "seed",
            "status", "verdict", "diverged_step", "steps", "best_val_acc", "final_train_loss")
    return sorted(tuple(r[k] for k in keep) for r in out["results"].to_pylist() if phase in (None, r["phase"]))


@pytest.mark.ray
def test_three_phase_study_end_to_end_and_independent_of_concurrency(tmp_path, ray_cluster):
    one = agc_lambda.main(_grid_flags(tmp_path, "one", "--max-concurrent", "1"))
    two = agc_lambda.main(_grid_flags(tmp_path, "two", "--max-concurrent", "2"))
    assert _rows(one) == _rows(two)  # the same seed gives the same rows, however many trials run at once

    res = one["results"]
    rows = res.to_pylist()
    scan = [r for r in rows if r["phase"] == "scan"]
    refine = [r for r in rows if r["phase"] == "refine"]
    full = [r for r in rows if r["phase"] == "full"]
    assert len(scan) == 4 * 3 and all(r["best_val_acc"] is None for r in scan + refine)
    # A scan: the full run's warmup (1 epoch of 2048 images), then its budget at the peak lr.
    assert {(r["batch_size"], r["steps"]) for r in scan if r["status"] == "completed"} == {(32, 64 + 256),
                                                                                         (64, 32 + 128)}
    assert any(r["verdict"] == "diverged" for r in scan) and any(r["verdict"] == "trained" for r in scan)
    for r in rows:  # the values the trial ran with, under TrainConfig's names
        assert r["lr"] == pytest.approx(r["base_lr"] * r["batch_size"] / 256)
        assert (r["clipping"], r["clip_threshold"]) in (("agc", 0.04), ("none", None))
        assert r["model"] == "nf_resnet_cifar" and r["node_id"] and r["mlflow_run_id"]
        assert r["verdict"] in ("trained", "stalled", "diverged") and r["initial_train_loss"] > 2.0
    # Each phase is the pure function of the rows before it.
    assert {r["cell"]: r["base_lr"] for r in refine} == frontier.refine_lrs(scan)
    chosen = frontier.full_phase_lrs(scan + refine, top=1)
    assert sorted((r["cell"], r["base_lr"]) for r in full) == sorted((c, lr) for c, lrs in chosen.items()
                                                                     for lr in lrs)
    cells = {c["cell"]: c for c in one["cells"].to_pylist()}
    found = [c for c in cells.values() if c["frontier"] == "found"]
    assert len(cells) == 4 and found
    for c in found:  # every frontier is checked over the full budget, and has an accuracy
        assert c["frontier_holds"] is not None and c["best_val_acc"] is not None, c
    # AGC's frontier holds: its lr, trained over the whole budget, trains. (Without clipping the refined edge at
    # batch 64 learned in its 128-step scan, then stalled over 320 steps: the study says so, as it must.)
    assert all(c["frontier_holds"] for c in found if c["lambda"] == "0.04")
    held = sum(c["frontier_holds"] for c in found)
    assert f"the frontier lr trained over the full budget in {held} of {len(found)} cells" in one["summary"]
    for c in found:
        assert ("NOT held" in findings.cell_sentence(c["batch_size"], "", c)) is (not c["frontier_holds"])
    assert all(r["steps"] == 320 for r in full if r["status"] == "completed")
    assert "budget:" not in one["summary"]

    d = tmp_path / "out" / "one"
    assert pq.read_table(d / "cells.parquet").num_rows == 4
    assert pq.read_table(d / "results.parquet").num_rows == len(rows)
    import numpy as np
    from PIL import Image

    for png in FIGURES:
        img = np.asarray(Image.open(d / png).convert("L"))
        assert img.shape[1] > 400 and len(np.unique(img)) > 20, png  # a real picture, not a blank canvas

    c, parents, children = mlflow_runs(tmp_path, "one")
    assert len(parents) == 1 and len(children) == res.num_rows and parents[0].info.status == "FINISHED"
    assert {ch.data.tags["trial_key"] for ch in children} == {r["trial_key"] for r in rows}
    arts = {a.path for a in c.list_artifacts(parents[0].info.run_id)}
    assert {*FIGURES, "cells.parquet"} <= arts
    assert {"max_stable_lr/lambda_0.04", "lr_sensitivity/lambda_0.04"} <= set(parents[0].data.metrics)
    hist = c.get_metric_history(parents[0].info.run_id, "lr_sensitivity/lambda_0.04")
    assert sorted(m.step for m in hist) == [32, 64]  # step = batch size: charted over the batch
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


FIGURES = ("stable_region.png", "stability_map.png", "lr_loss.png", "lr_accuracy.png")


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
    for col in names + list(frontier.CELL_COLUMNS):  # the public tables are documented, column by column
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

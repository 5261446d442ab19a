"""Whole studies through Ray Tune: three phases end to end; every study's smoke test."""
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from studies import agc_lambda, augmentation, batch_scaling, hpo
from studies.sweep import findings, frontier
from tests.helpers import FIGURES, common_flags, mlflow_runs


def _grid_flags(tmp_path, name, *extra):
    # The smoke preset's data and scan budget (≥ 8192 examples: 128 steps at batch 64, 64 at 128), enough for
    # this data to leave chance loss; lr 25.6 blows up. The full runs are as long as batch 64's scan, so they can
    # confirm its frontier (shorter ones are flagged in a budget note, and did not hold). Batches 64 and 128, not
    # 32 and 64: the same examples in half the steps, ~40% less time for every phase (the test runs the study,
    # then every phase after its scan again); each phase still runs, and without clipping batch 128 stays
    # undecided (no lr trains in its scan).
    return ["--smoke-test", *common_flags(tmp_path, name), "--batch-sizes", "64", "128", "--lambdas", "0.04", "none",
            "--lrs", "0.4", "1.6", "25.6", "--full-top", "1", "--max-steps", "160", "--replicates", "2", *extra]


def _rows(out, phase=None):
    keep = ("trial_key", "phase", "cell", "batch_size", "clipping", "lambda", "base_lr", "peak_lr", "seed",
            "status", "verdict", "diverged_step", "steps", "best_val_acc", "final_train_loss")
    return sorted(tuple(r[k] for k in keep) for r in out["results"].to_pylist() if phase in (None, r["phase"]))


@pytest.mark.ray
def test_three_phase_study_end_to_end_and_independent_of_concurrency(tmp_path, ray_cluster):
    # Two trials at once here; the resume below redoes every phase after the scan one at a time, to the same rows.
    one = agc_lambda.main(_grid_flags(tmp_path, "one", "--max-concurrent", "2"))

    res = one["results"]
    rows = res.to_pylist()
    scan = [r for r in rows if r["phase"] == "scan"]
    refine = [r for r in rows if r["phase"] == "refine"]
    replicate = [r for r in rows if r["phase"] == "replicate"]
    full = [r for r in rows if r["phase"] == "full"]
    assert len(scan) == 4 * 3 and all(r["best_val_acc"] is None for r in scan + refine)
    # A scan: the full run's warmup (1 epoch of 2048 images), then its budget at the peak lr.
    assert {(r["batch_size"], r["steps"]) for r in scan if r["status"] == "completed"} == {(64, 32 + 128),
                                                                                         (128, 16 + 64)}
    assert any(r["verdict"] == "diverged" for r in scan) and any(r["verdict"] == "trained" for r in scan)
    for r in rows:  # the values the trial ran with, under TrainConfig's public names
        assert r["peak_lr"] == pytest.approx(r["base_lr"] * r["batch_size"] / 256)
        assert (r["clipping"], r["lambda"]) in (("agc", 0.04), ("none", None))
        assert r["model"] == "nf_resnet_cifar" and r["node_id"] and r["mlflow_run_id"]
        assert r["verdict"] in ("trained", "stalled", "collapsed", "diverged") and r["initial_train_loss"] > 2.0
    # Each phase is the pure function of the rows before it.
    assert {r["cell"]: r["base_lr"] for r in refine} == frontier.refine_lrs(scan)
    # Replication: every deciding lr of the final majority frontier rests on 2 seeds (the fixed point).
    assert replicate and {r["seed"] for r in replicate} == {1}
    assert frontier.replication_needed(scan + refine + replicate, 2) == {}
    chosen = frontier.full_phase_lrs(scan + refine + replicate, top=1)
    assert sorted((r["cell"], r["base_lr"], r["seed"]) for r in full) == sorted(
        (c, lr, s) for c, lrs in chosen.items() for lr in lrs for s in (0, 1))  # every full lr at both seeds
    cells = {c["cell"]: c for c in one["cells"].to_pylist()}
    found = [c for c in cells.values() if c["frontier"] == "found"]
    assert len(cells) == 4 and found
    for c in found:  # every frontier is checked over the full budget, and has an accuracy
        assert c["frontier_holds"] is not None and c["best_val_acc"] is not None, c
    # AGC's frontier holds: its lr, trained over the whole budget, trains. (Without clipping a frontier can learn in
    # its short scan, then stall over the whole budget: the study says so, as it must.)
    assert all(c["frontier_holds"] for c in found if c["lambda"] == 0.04)
    held = sum(c["frontier_holds"] for c in found)
    assert f"the frontier lr trained over the full budget in {held} of {len(found)} cells" in one["summary"]
    for c in found:
        assert ("NOT held" in findings.cell_sentence(c["batch_size"], "", c)) is (not c["frontier_holds"])
    assert all(r["steps"] == 160 for r in full if r["status"] == "completed")
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
    assert {*FIGURES, "cells.parquet", "cells.csv", "frontier.md"} <= arts
    pm = parents[0].data.metrics
    assert {"max_stable_lr/lambda_0.04", "lr_sensitivity/lambda_0.04"} <= set(pm)  # a series over the batches
    for cell in one["cells"].to_pylist():  # beside it a flat metric per cell that has a frontier, none elsewhere
        lam = "none" if cell["lambda"] is None else f"{cell['lambda']:g}"
        assert (f"max_stable_lr/b{cell['batch_size']}/lambda_{lam}" in pm) is (cell["frontier"] == "found"), cell
    hist = c.get_metric_history(parents[0].info.run_id, "lr_sensitivity/lambda_0.04")
    assert sorted(m.step for m in hist) == [64, 128]  # step = batch size: charted over the batch
    cells = {(r["batch_size"], r["lambda"]): r for r in one["cells"].to_pylist()}
    assert pm["max_stable_lr/b64/lambda_0.04"] == cells[64, 0.04]["max_stable_lr"]
    # The study run: described (the frontier table in it), its params the design and what is really fixed.
    params, tags = parents[0].data.params, parents[0].data.tags
    note = tags["mlflow.note.content"]  # the frontier table first (cells padded for MLflow's renderer), findings
    assert note.startswith("**Largest base lr that trains**") and "| &emsp;batch&emsp; |" in note
    assert "**Findings**" in note and tags["order"] == "!"  # the study run first in the study's view
    assert params["grid.batch_size"] == "64, 128" and params["grid.lambda"] == "0.04, none"
    assert params["design.base_lrs"] == "0.4, 1.6, 25.6" and params["fixed.max_steps"] == "160"
    assert not {"fixed.batch_size", "fixed.lambda", "fixed.clipping", "fixed.base_lr", "fixed.peak_lr",
                "fixed.seed"} & set(params)  # the grid, the lr design and the seeding set these per trial
    assert tags["mlflow.source.name"] == "studies/agc_lambda.py" and tags["mlflow.user"]
    exp = c.get_experiment(parents[0].info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "How to read this experiment" in exp.tags["mlflow.note.content"]
    assert "mlflow.sharedViewState.study" in exp.tags
    assert f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" in one["summary"]
    from studies.training.tracking import MARKS as marks  # ↯ collapsed too
    by_id, digests = {ch.info.run_id: ch for ch in children}, set()
    for r in rows:
        ch = by_id[r["mlflow_run_id"]]
        # named what differs first, behind the verdict's mark; the verdict a tag too; the dataset an MLflow input
        assert ch.info.run_name.startswith(f"{marks[r['verdict']]} b{r['batch_size']} λ") and \
            f" lr{r['base_lr']:.4g} {r['phase']} s{r['seed']}" in ch.info.run_name, ch.info.run_name  # as tables
        assert ch.data.tags["verdict"] == r["verdict"] and ch.data.tags["mlflow.source.name"] == "studies/agc_lambda.py"
        (ds,) = [d.dataset for d in ch.inputs.dataset_inputs]
        assert ds.name.startswith("synthetic-") and ds.name in ds.source and len(ds.digest) == 16
        digests.add(ds.digest)
        params = ch.data.params
        assert int(params["batch_size"]) == r["batch_size"] and float(params["base_lr"]) == r["base_lr"]
        assert params["lambda"] == ("none" if r["lambda"] is None else f"{r['lambda']:g}")  # one name for λ
        assert "clip_threshold" not in params and "lr" not in params
        assert by_id[r["mlflow_run_id"]].data.tags["lambda"] == params["lambda"]
    assert len(digests) == 1  # one dataset, one digest

    # The same output again without --resume is refused; --resume with other flags too.
    with pytest.raises(SystemExit):
        agc_lambda.main(_grid_flags(tmp_path, "one", "--max-concurrent", "2"))
    with pytest.raises(SystemExit):
        agc_lambda.main(_grid_flags(tmp_path, "one", "--max-concurrent", "2", "--resume", "--epochs", "3"))

    # --resume across a phase boundary: drop every row after the scan's (as if the driver died once the scan was
    # done); only those runs are redone, into the same MLflow runs, and one at a time they give the rows that two at
    # once gave: the same seed gives the same rows, however many trials run at once.
    results_dir = tmp_path / "out" / "one" / "results" / "results"
    dropped = 0
    for part in results_dir.glob("part-*.parquet"):
        if pq.read_table(part).column("phase").to_pylist() != ["scan"]:
            part.unlink()
            dropped += 1
    assert dropped == len(rows) - len(scan)
    again = agc_lambda.main(_grid_flags(tmp_path, "one", "--max-concurrent", "1", "--resume"))
    assert _rows(again) == _rows(one)
    _, parents, children = mlflow_runs(tmp_path, "one")
    assert len(parents) == 1 and len(children) == res.num_rows


@pytest.mark.ray
@pytest.mark.parametrize("module", [batch_scaling, hpo, augmentation])
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
    if module is augmentation:  # the map's rows are augmentation strengths, at the preset's one batch
        assert [(c["augment_strength"], c["batch_size"]) for c in out["cells"].to_pylist()] == [(0.0, 64), (1.0, 64)]
        assert {r["augment_strength"] for r in out["results"].to_pylist()} == {0.0, 1.0}
        table = out["summary"].split("largest base lr that trains", 1)[1].splitlines()
        assert table[1].split() == ["augmentation", "λ=0.04"] and table[2].split()[0] == "0"
    if module is hpo:
        assert set(out["best_params"]) == {"base_lr", "lambda", "augment_strength"}
        rows = out["results"].to_pylist()  # the row holds the values TPE chose, under their public names
        assert {(r["base_lr"], r["lambda"], r["augment_strength"]) for r in rows} == \
            {(t.params["base_lr"], t.params["lambda"], t.params["augment_strength"])
             for t in hpo.optuna_study(out["results"], hpo.PRESETS["smoke"].tpe).trials}


@pytest.mark.ray
def test_a_driver_that_loses_the_study_lock_stops_and_writes_nothing_more(tmp_path, ray_cluster, capsys):
    """A second driver takes the study mid-scan (the lock file names it): the first starts no trial after that,
    every row write of its trials is refused by the fence, and it ends with one line saying to --resume later."""
    import json
    import threading
    import time

    study_dir = tmp_path / "out" / "lost"
    results = study_dir / "results" / "results"
    taken, stop = {}, threading.Event()

    def intruder():
        while not stop.is_set():
            parts = sorted(results.glob("part-*.parquet")) if results.exists() else []
            if parts:  # the first row is in: now another driver holds the study
                held = json.loads((study_dir / ".lock").read_text())
                (study_dir / ".lock").write_text(json.dumps({**held, "owner": "study intruder", "token": "theirs",
                                                             "generation": held["generation"] + 1}))
                taken["parts"] = {p.name for p in parts}
                return
            time.sleep(0.05)

    t = threading.Thread(target=intruder, daemon=True)
    t.start()
    try:
        with pytest.raises(SystemExit) as e:
            agc_lambda.main(_grid_flags(tmp_path, "lost", "--max-concurrent", "1"))
    finally:
        stop.set()
        t.join()
    assert e.value.code == 2 and taken
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no longer held by this study (generation 1; now" in err and "in use by study intruder" in err
    assert err.endswith("continue with --resume")
    # nothing after the loss: at most the parts that were being written as the lock was taken
    after = {p.name for p in results.glob("part-*.parquet")} - taken["parts"]
    assert len(after) <= 1, after
    assert not (study_dir / "cells.parquet").exists()  # the report was not written under a lost lock
    assert len(pq.read_table(results).to_pylist()) < 12


@pytest.mark.ray
def test_a_new_output_gets_its_own_mlflow_runs(tmp_path, ray_cluster):
    """The same study name in a second output, then in the first again after its folder was deleted: each gets
    its own parent run and children, and no run is appended to (issue 21, item 3)."""
    import shutil

    def run(out):
        flags = ["--smoke-test", "--output", str(tmp_path / out), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                 "--data-root", str(tmp_path / "data"), "--name", "same", "--batch-sizes", "32", "--lambdas", "0.04",
                 "--lrs", "0.4", "--max-steps", "16", "--full-top", "1", "--max-concurrent", "1",
                 "--warmup-epochs", "0.25", "--scan-examples", "512"]  # 32-step scans (were 320): three studies
        return agc_lambda.main(flags)

    outs = [run("a"), run("b")]
    shutil.rmtree(tmp_path / "a")
    outs.append(run("a"))
    c, parents, children = mlflow_runs(tmp_path, "same")
    assert len(parents) == 3 and all(p.info.status == "FINISHED" for p in parents)
    by_parent = {p.info.run_id: [ch for ch in children if ch.data.tags["mlflow.parentRunId"] == p.info.run_id]
                 for p in parents}
    ids = {r["mlflow_run_id"] for o in outs for r in o["results"].to_pylist()}
    assert len(ids) == sum(o["results"].num_rows for o in outs)  # no row shares a run with another study's
    for kids in by_parent.values():
        assert len(kids) == outs[0]["results"].num_rows
        for ch in kids:  # every step logged once
            steps = [m.step for m in c.get_metric_history(ch.info.run_id, "loss/train_step")]
            assert steps and len(steps) == len(set(steps)), steps

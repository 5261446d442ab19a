"""--dry-run: every phase's runs (exact for the scan, the most there can be after it), steps and examples each,
and the time here; it writes nothing and starts nothing."""
import os

import pytest

from studies import agc_lambda
from studies.sweep import design, dry_run, phases
from studies.training.config import TrainConfig
from tests.test_sweep_phases import run_all, study


def test_the_dry_run_prints_every_phase_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import ray

    from studies.training import runner

    def no_ray(*a, **kw):
        raise AssertionError("a dry run started Ray")

    monkeypatch.setattr(ray, "init", no_ray)  # this process may hold another test's Ray already
    monkeypatch.setattr(runner, "init_ray", no_ray)
    out, db = tmp_path / "out", tmp_path / "m.db"
    res = agc_lambda.main(["--dry-run", "--output", str(out), "--tracking-uri", f"sqlite:///{db}",
                           "--batch-sizes", "64", "1024", "--lambdas", "0.01", "none", "--data-root",
                           str(tmp_path / "data")])
    text = capsys.readouterr().out
    assert res["complete"] and res["dry_run"]
    assert not out.exists() and not db.exists() and not (tmp_path / "data").exists()
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    # laptop: 4 cells × 8 lrs, 1 seed; scans of ≥ 96 steps and ≥ 20480 examples after no warmup
    assert rows["scan"].split()[1:4] == ["32", "b64", "320"] and "b1024 96" in rows["scan"]
    assert rows["refine"].split()[1:3] == ["≤", "4"]  # one lr per cell, 1 seed
    assert rows["replicate"].split()[1:3] == ["≤", "24"]  # ≤ 3 deciding lrs × 2 more seeds per cell
    assert rows["full"].split()[1:3] == ["≤", "24"] and "b64 1536" in rows["full"]  # 2 lrs × 3 seeds; 6 epochs
    assert "time here" in text and "ms" in text.split("time:")[1]
    total = [w for w in rows["all"].split() if w.endswith("min") or w.endswith("s")]
    assert rows["all"].split()[1:3] == ["≤", "84"] and total


def test_the_bounds_hold_for_what_the_phases_then_run():
    st = study()  # 1 cell, 3 lrs, replicates 3: tests/test_sweep_phases.py's
    bounds = {b.phase: b for b in dry_run.phase_bounds(st, dry_run.DataSize(1024, 256, 16, 10))}
    for trains in (lambda lr, seed: lr <= 0.2, lambda lr, seed: lr < 0.2 or lr == 0.2 and seed == 10):
        rows = []
        seen, _ = run_all(phases.Plan(st, 1024), rows, trains)
        ran = {}
        for name, n, _done in seen:
            ran[name] = ran.get(name, 0) + n
        assert ran["scan"] == bounds["scan"].count and bounds["scan"].exact
        assert all(ran[p] <= bounds[p].count for p in ("refine", "full"))
        first_round = [n for name, n, _ in seen if name == "replicate"][0]
        assert first_round <= bounds["replicate"].count
        assert len({(r["phase"], r["base_lr"], r["seed"]) for r in rows}) == len(rows)  # no run twice
    # each run's length is the one its Spec carries: 10 scan steps after no warmup; 2 epochs of 16 steps in full
    assert bounds["scan"].runs[0].steps == design.scan_specs(st, 1024)[0].config.max_steps == 10
    assert bounds["full"].runs[0].steps == 2 * 1024 // 64 and bounds["full"].runs[0].eval_examples == 2 * 256


def test_a_gpu_study_on_a_machine_without_one_gets_counts_but_no_time(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    st = design.Study("g", design.Preset(grid={"batch_size": [256]}, fixed={}, lrs=(0.1, 0.2), seeds=2),
                      TrainConfig(use_gpu=True, dataset="cifar10", epochs=1), max_concurrent=1)
    text = dry_run.dry_run(st)
    assert "full" in text and "time: not estimated (the study trains on GPUs" in text
    line = [x for x in text.splitlines() if x.startswith("  full")][0]
    assert line.split()[1:4] == ["4", "b256", str(50000 // 256)]  # 2 lrs × 2 seeds, exact without a scan


def test_a_missing_image_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        agc_lambda.main(["--dry-run", "--preset", "laptop", "--dataset", "imagefolder", "--dataset-params",
                         f'{{"path": "{tmp_path / "nope"}"}}', "--output", str(tmp_path / "o")])
    assert e.value.code == 2 and "not a directory" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")

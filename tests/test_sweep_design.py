"""The design: every trial known before it runs."""

import pytest

from studies import agc_lambda, batch_scaling
from studies.sweep import design
from studies.sweep.cells import Cell
from studies.training import schedule
from studies.training.config import TrainConfig


def test_specs_scan_then_full_and_paper_protocol():
    fixed = TrainConfig(model_overrides={"width": 8, "depth": 1}, epochs=2, warmup_steps=0)
    st = design.Study("s", design.Preset(grid={"batch_size": [64, 256], "clip_threshold": [0.01, None]},
                                         fixed={}, lrs=(0.2, 0.4, 0.8), scan_steps=10, scan_examples=1280, seeds=2),
                      fixed)
    specs = design.scan_specs(st, n_train=1024)
    assert len(specs) == 4 * 3 * 2 and len({s.key for s in specs}) == len(specs)
    by_batch = {s.config.batch_size: s.config for s in specs}
    # The scan budget is a floor in steps AND examples (batch 64: 1280 / 64 = 20 steps; batch 256: 10 steps),
    # longer than the 2-epoch full run at batch 256 (8 steps): the full run's length never cuts it.
    assert (by_batch[64].max_steps, by_batch[256].max_steps) == (20, 10)
    assert all((c.lr_schedule, c.eval_every_epochs, c.schedule_steps) == ("constant", 0, None)
               for c in by_batch.values())
    none = [s.config for s in specs if "lambda=none" in s.cell.label]
    assert all(c.clipping == "none" and c.clip_threshold is None for c in none)
    paper = design.Study("p", design.Preset(grid={"batch_size": [256], "clip_threshold": [0.01]}, fixed={},
                                            lrs=(0.1,), seeds=5, best_k=4), fixed)
    full = design.full_specs(paper, None)
    assert [s.config.seed for s in full] == [0, 1, 2, 3, 4]
    assert {s.config.lr for s in full} == {0.1}  # linear scaling: 0.1 × 256/256


def test_a_scan_runs_past_the_warmup_to_the_lr_it_is_labelled_with():

    # cifar10-like: 2 warmup epochs at batch 256 of 50k images are 390 steps, longer than the 100-step scan.
    fixed = TrainConfig(epochs=30, warmup_epochs=2, batch_size=256)
    st = design.Study("w", design.Preset(grid={"batch_size": [256, 4096]}, fixed={}, lrs=(0.4,), scan_steps=100),
                      fixed)
    for spec in design.scan_specs(st, n_train=50_000):
        cfg = spec.config
        total, sched, warmup = schedule.run_length(cfg, 50_000 // cfg.batch_size)
        assert total == warmup + 100 and warmup == round(2 * (50_000 // cfg.batch_size))
        assert schedule.lr_at(total - 1, sched, warmup, cfg.lr, cfg.lr_schedule) == pytest.approx(cfg.lr)
        assert schedule.lr_at(warmup - 1, sched, warmup, cfg.lr, cfg.lr_schedule) == pytest.approx(cfg.lr)
    # Every preset of every grid study: each scan ends at its peak lr, after at least its budget of steps.
    for module in (agc_lambda, batch_scaling):
        for name, preset in module.PRESETS.items():
            if not preset.scan_steps:
                continue
            study = design.Study(name, preset, TrainConfig(**preset.fixed))
            for spec in design.scan_specs(study, n_train=50_000):
                cfg = spec.config
                total, sched, warmup = schedule.run_length(cfg, 50_000 // cfg.batch_size)
                assert total - warmup >= preset.scan_steps, (module.__name__, name)
                assert schedule.lr_at(total - 1, sched, warmup, cfg.lr, cfg.lr_schedule) == pytest.approx(cfg.lr)


def test_a_budget_the_data_cannot_fill_is_said_before_any_trial():
    fixed = TrainConfig(epochs=2, warmup_steps=0)
    st = design.Study("b", design.Preset(grid={"batch_size": [64, 256, 1024]}, fixed={}, lrs=(0.4,),
                                         scan_steps=40), fixed)
    notes = design.budget_notes(st, n_train=1500)  # 1,500 real images: batch 1024 has 1 step per epoch
    assert len(notes) == 2
    assert notes[0].startswith("at batch 256 the full run (10 steps) is shorter than its scan (40 steps")
    assert notes[1].startswith("batch 1024 gives 1 step(s) per epoch of the 1500 training images (2 steps")
    assert design.budget_notes(st, n_train=100_000) == []


@pytest.mark.parametrize("low, high", [(0.8, 0.05), (0.0, 1.0), (0.05, float("inf")), (float("nan"), 1.0)])
def test_a_log_grid_refuses_bounds_it_cannot_span(low, high):
    with pytest.raises(ValueError, match="a log grid needs finite 0 < low <= high"):
        design.log_grid(low, high)  # was () (the lr design fell back to one lr) or a ZeroDivisionError


@pytest.mark.parametrize("lrs, line", [
    ((0.1, 0.1), "--lrs lists a value twice ([0.1, 0.1]); list each once"),
    ((0.1, float("inf")), "--lrs must be finite numbers > 0, got [0.1, inf]"),
    ((float("nan"),), "--lrs must be finite numbers > 0, got [nan]"),
])
def test_an_lr_design_that_would_run_a_trial_twice_or_at_no_lr_is_refused(lrs, line):
    with pytest.raises(ValueError) as e:
        design.Study("s", design.Preset(grid={"batch_size": [64]}, fixed={}, lrs=lrs), TrainConfig())
    assert str(e.value) == line


def test_run_names_put_what_differs_first_and_hpo_names_what_tpe_chose():
    fixed = TrainConfig(model_overrides={"width": 8, "depth": 1}, epochs=2, warmup_steps=0)
    st = design.Study("s", design.Preset(grid={"batch_size": [1024], "clip_threshold": [0.16, None]}, fixed={},
                                         lrs=(3.2,), scan_steps=10), fixed)
    assert [s.label for s in design.scan_specs(st, n_train=4096)] == ["b1024 λ0.16 lr3.2 scan s0",
                                                                      "b1024 λnone lr3.2 scan s0"]
    assert Cell((("batch_size", 256), ("clip_threshold", 0.02), ("augment_strength", 0.5))).short == \
        "b256 λ0.02 aug0.5"
    assert Cell((("variant", "nf_resnet+agc"),)).short == "nf_resnet+agc"


def test_the_study_runs_params_are_its_design_and_what_it_really_holds_fixed():
    fixed = TrainConfig(model_overrides={"width": 8, "depth": 1}, batch_size=512, clip_threshold=0.3, epochs=2)
    st = design.Study("s", design.Preset(grid={"batch_size": [64, 256], "clip_threshold": [0.01, None]}, fixed={},
                                         lrs=(0.2, 0.4), scan_steps=10, seeds=2), fixed, seed=3)
    p = design.design_params(st, concurrency=2)
    assert p["grid.batch_size"] == "64, 256" and p["grid.lambda"] == "0.01, none"
    assert p["design.base_lrs"] == "0.2, 0.4" and p["design.seeds"] == "2" and p["study.seed"] == "3"
    assert p["fixed.epochs"] == "2" and p["fixed.model_overrides.width"] == "8"
    # the grid overrides batch_size and λ (and so clipping), the lr design base_lr (and so peak_lr), seeds the seed
    assert not {k for k in p if k.split(".", 1)[-1] in ("batch_size", "lambda", "clipping", "base_lr", "peak_lr",
                                                        "seed") and k.startswith("fixed.")}
    tpe = design.Study("h", design.Preset(grid={"batch_size": [256]}, fixed={}, trials=4,
                                          tpe={"base_lr": (0.05, 1.6, True), "clip_threshold": (0.005, 0.32, True)}),
                       fixed)
    q = design.design_params(tpe, concurrency=1)
    assert q["tpe.lambda"] == "0.005 .. 0.32 (log)" and q["design.trials"] == "4" and "design.base_lrs" not in q
    assert "fixed.lambda" not in q and "fixed.base_lr" not in q and q["fixed.clipping"] == "agc"


def test_replication_reruns_the_deciding_lrs_at_the_seeds_they_lack_and_full_runs_every_seed():
    fixed = TrainConfig(model_overrides={"width": 8, "depth": 1}, epochs=2, warmup_steps=0)
    st = design.Study("s", design.Preset(grid={"batch_size": [64], "clip_threshold": [0.01]}, fixed={},
                                         lrs=(0.1, 0.2, 0.4), scan_steps=10, full_top=1, replicates=3), fixed,
                      seed=10)

    def row(lr, verdict, seed=10, phase="scan"):
        return {"cell": "batch_size=64 lambda=0.01", "base_lr": lr, "seed": seed, "phase": phase,
                "status": "completed", "verdict": verdict, "initial_train_loss": 2.3,
                "final_train_loss": (1.8 if lr == 0.2 else 2.0) if verdict == "trained" else 2.3}

    rows = [row(0.1, "trained"), row(0.2, "trained"), row(0.4, "stalled")]
    specs = design.replicate_specs(st, rows, n_train=1024)
    # best = frontier = 0.2 (the lowest loss), first failure 0.4: each at seeds 11 and 12; 0.1 stays at one seed.
    assert sorted((s.config.base_lr, s.config.seed) for s in specs) == [(0.2, 11), (0.2, 12), (0.4, 11), (0.4, 12)]
    assert {s.phase for s in specs} == {"replicate"} and all(s.config.lr_schedule == "constant" for s in specs)
    assert [s.key for s in design.replicate_specs(st, rows, 1024)] == [s.key for s in specs]  # deterministic
    rows += [row(s.config.base_lr, "trained" if s.config.base_lr == 0.2 else "stalled", s.config.seed, "replicate")
             for s in specs]
    assert design.replicate_specs(st, rows, 1024) == []  # every deciding lr rests on 3 seeds
    full = design.full_specs(st, rows)
    assert sorted((s.config.base_lr, s.config.seed) for s in full) == [(0.2, 10), (0.2, 11), (0.2, 12)]
    one = design.Study("s", design.Preset(grid={"batch_size": [64], "clip_threshold": [0.01]}, fixed={},
                                          lrs=(0.1, 0.2, 0.4), scan_steps=10), fixed)
    assert design.replicate_specs(one, rows, 1024) == []  # replicates=1: no replication


def test_replicates_below_one_is_refused():
    with pytest.raises(ValueError, match="--replicates must be >= 1"):
        design.Study("s", design.Preset(grid={"batch_size": [64]}, fixed={}, replicates=0), TrainConfig())


def test_the_order_tag_sorts_a_studys_runs_cell_by_cell_each_in_lr_order():
    # From the typed cell, never its label: numbers by size (64 before 256 before 1024), no clipping last.
    cells = Cell.grid({"batch_size": [1024, 64, 256], "clip_threshold": [0.04, None, 0.01]})
    runs = [(c, lr, phase) for c in cells
            for lr, phase in ((3.2, "scan"), (0.4, "full"), (12.8, "scan"), (0.4, "scan"), (0.5657, "refine"))]
    keys = {r: design.Spec(r[2], r[0], TrainConfig(base_lr=r[1])).order for r in runs}
    ordered = [(c.value("batch_size"), c.value("clip_threshold"), lr, ph) for c, lr, ph in sorted(runs, key=keys.get)]
    assert ordered[:6] == [(64, 0.01, 0.4, "scan"), (64, 0.01, 0.4, "full"), (64, 0.01, 0.5657, "refine"),
                           (64, 0.01, 3.2, "scan"), (64, 0.01, 12.8, "scan"), (64, 0.04, 0.4, "scan")]
    assert [r[:2] for r in ordered[::5]] == [(b, lam) for b in (64, 256, 1024) for lam in (0.01, 0.04, None)]
    assert all(design.STUDY_ORDER < k for k in keys.values())  # the study run first
    # a seed sorts after the phase; a JSON axis (spaces in its text) is one value
    seeds = sorted(design.Spec("scan", cells[0], TrainConfig(seed=s)).order for s in (10, 2))
    assert [k.split()[-1] for k in seeds] == ["000002", "000010"]
    (wide,) = Cell.grid({"batch_size": [64], "model_overrides": [{"width": 8}], "clip_threshold": [None]})
    assert design.Spec("scan", wide, TrainConfig()).order.split(" ")[1:4] == ['~{"width":', '8}', "~none"]

"""The phases as a sequence: each computed once at its boundary from the rows so far; 'not yet' (Blocked) and
'nothing left' (FINISHED) are different answers; `complete` asks the same of a finished table."""
from studies.sweep import design, phases
from studies.training.config import TrainConfig

FIXED = TrainConfig(model_overrides={"width": 8, "depth": 1}, epochs=2, warmup_steps=0)


def study(replicates=3):
    return design.Study("s", design.Preset(grid={"batch_size": [64], "clip_threshold": [0.01]}, fixed={},
                                           lrs=(0.1, 0.2, 0.4), scan_steps=10, full_top=1, replicates=replicates),
                        FIXED, seed=10)


def row(spec, trains):
    """A recorded run: lr 0.2 trains best, lrs above 0.2 stall (so the frontier is 0.2, refined to 0.2828)."""
    c = spec.config
    trained = trains(c.base_lr, c.seed)
    return {"trial_key": spec.key, "cell": spec.cell.label, "base_lr": c.base_lr, "seed": c.seed, "phase": spec.phase,
            "status": "completed", "verdict": "trained" if trained else "stalled", "initial_train_loss": 2.3,
            "final_train_loss": (1.8 if c.base_lr == 0.2 else 2.0) if trained else 2.3, "best_val_acc": 0.5}


def run_all(plan, rows, trains=lambda lr, seed: lr <= 0.2):
    """Drive the plan like the searcher: each Step's runs recorded before the next boundary."""
    seen = []
    while isinstance(step := plan.next(rows), phases.Step):
        seen.append((step.phase.name, len(step.todo), step.done))
        rows += [row(s, trains) for s in step.todo]
    return seen, step


def test_the_plan_walks_scan_refine_replication_rounds_and_full_then_finishes():
    st, rows = study(), []
    seen, end = run_all(phases.Plan(st, 1024), rows)
    # scan 3 lrs; refine 1 (√(0.2·0.4)); replicate best = frontier 0.2 and first failure 0.2828, 2 more seeds each;
    # then full at the frontier on 3 seeds
    assert seen == [("scan", 3, 0), ("refine", 1, 0), ("replicate", 4, 0), ("full", 3, 0)]
    assert end is phases.FINISHED and phases.complete(st, rows, 1024)
    assert sorted((r["phase"], r["base_lr"], r["seed"]) for r in rows if r["phase"] == "refine") == \
        [("refine", 0.2828, 10)]


def test_a_round_that_moves_the_frontier_asks_for_another():
    st, rows = study(), []
    plan = phases.Plan(st, 1024)
    # lr 0.2 trains on the scan's seed only: round 1 (0.2 and 0.2828 at seeds 11, 12) moves the majority frontier
    # down to 0.1, which has one seed: round 2 replicates it
    seen, _ = run_all(plan, rows, lambda lr, seed: lr < 0.2 or lr == 0.2 and seed == 10)
    assert [s for s in seen if s[0] == "replicate"] == [("replicate", 4, 0), ("replicate", 2, 0)]
    assert phases.complete(st, rows, 1024)


def test_runs_without_a_row_block_the_next_phase_and_resume_starts_where_rows_end():
    st, rows = study(), []
    plan = phases.Plan(st, 1024)
    scan = plan.next(rows)
    rows += [row(s, lambda lr, seed: lr <= 0.2) for s in scan.todo[:2]]  # one scan run lost to infrastructure
    blocked = plan.next(rows)
    assert isinstance(blocked, phases.Blocked) and blocked.phase == "scan"
    assert [s.key for s in blocked.missing] == [scan.todo[2].key]
    assert not phases.complete(st, rows, 1024)
    # --resume: a new plan hands out only the missing scan run ('2 already done'), then goes on
    resumed = phases.Plan(st, 1024)
    step = resumed.next(rows)
    assert (step.phase.name, [s.key for s in step.todo], step.done) == ("scan", [scan.todo[2].key], 2)
    rows.append(row(step.todo[0], lambda lr, seed: lr <= 0.2))
    seen, end = run_all(resumed, rows)
    assert [s[0] for s in seen] == ["refine", "replicate", "full"] and end is phases.FINISHED
    # a finished study resumed again: every phase's runs are recorded, nothing is handed out
    assert phases.Plan(st, 1024).next(rows) is phases.FINISHED


def test_without_replication_or_scan_the_phases_are_skipped():
    st, rows = study(replicates=1), []
    seen, _ = run_all(phases.Plan(st, 1024), rows)
    assert [s[0] for s in seen] == ["scan", "refine", "full"]
    paper = design.Study("p", design.Preset(grid={"batch_size": [256], "clip_threshold": [0.01]}, fixed={},
                                            lrs=(0.1,), seeds=2), FIXED)
    rows = []
    assert run_all(phases.Plan(paper, 1024), rows)[0] == [("full", 2, 0)]

"""The frontier, the cells table and the findings as pure functions over hand-made rows."""
import pyarrow as pa
import pytest

from studies.sweep import findings, frontier, layout

ONE = "; one seed, no spread to weigh it against."  # an effect of an unreplicated study says so


START = 2.30
LOSS = {"t": 1.8, "s": 2.29, "c": 2.30, "d": None, "f": None}  # trained, stalled, collapsed, diverged, failed
STATUS = {"t": "completed", "s": "completed", "c": "completed", "d": "diverged", "f": "failed"}
LOW = {"c": 1.9}  # the lowest tenth of a collapsed run's curve: it learned, then fell back to chance


def _row(cell, b, lam, lr, v, seed=0, phase="scan", loss=None, acc=None):
    """A results row; `v` is t(rained), s(talled), c(ollapsed), d(iverged) or f(ailed). Verdicts are judged from
    the losses (no `verdict` column), as for rows written before it existed."""
    return {"cell": cell, "batch_size": b, "model": "nf_resnet_cifar", "clipping": "none" if lam == "none" else "agc",
            "lambda": None if lam == "none" else float(lam), "base_lr": lr, "seed": seed,
            "status": STATUS[v], "phase": phase, "initial_train_loss": START,
            "final_train_loss": LOSS[v] if loss is None else loss, "final_train_loss_se": 0.01, "best_val_acc": acc,
            "lowest_train_loss": LOW.get(v), "highest_train_loss": None}


def _cell(rows):
    return frontier.frontier_table(pa.Table.from_pylist(rows)).to_pylist()


def _lrs(cell, b, lam, pattern, lrs=(0.1, 0.2, 0.4, 0.8, 1.6), losses=None, **kw):
    losses = losses or [None] * len(pattern)
    return [_row(cell, b, lam, lr, v, loss=loss, **kw) for lr, v, loss in zip(lrs, pattern, losses)]


def test_slow_small_lrs_do_not_cut_the_frontier_and_a_stalled_lr_ends_it():
    a = "batch_size=64 lambda=none"
    # 0.1 stalls (too slow for the scan), 0.2–0.8 train, 0.4 best; 1.6 stalls: heavy clipping kept it finite.
    rows = _lrs(a, 64, "none", "sttts", losses=[None, 2.0, 1.5, 1.9, None])
    (c,) = _cell(rows)
    assert (c["frontier"], c["best_scan_lr"], c["max_stable_lr"], c["first_unstable_lr"]) == ("found", 0.4, 0.8, 1.6)
    assert c["first_unstable_verdict"] == "stalled" and not c["max_stable_lr_at_edge"]
    assert (c["scan_trained"], c["scan_stalled"], c["scan_diverged"]) == (3, 2, 0)
    assert c["stable_fraction"] == pytest.approx(3 / 5)
    # LR sensitivity: mean of min(loss, start) over the grid − the best: (2.29+2.0+1.5+1.9+2.29)/5 − 1.5.
    assert c["lr_sensitivity"] == pytest.approx((2.29 + 2.0 + 1.5 + 1.9 + 2.29) / 5 - 1.5)
    assert c["frontier_loss"] == pytest.approx(1.9) and c["start_loss"] == pytest.approx(START)
    text = findings.cell_sentence(64, "no clipping", c)
    assert text == ("batch 64, no clipping trains up to lr 0.8 (loss 1.90, start 2.30); lr 1.6 stalls (loss 2.29): "
                    "the edge is a budget limit")
    assert (c["first_unstable_kind"], c["best_scan_lr_at_low_edge"], c["max_stable_lr_at_low_edge"]) == \
        ("budget", False, False)


def test_a_cell_where_nothing_trains_is_undecided_or_none_never_a_number():
    u, n = "batch_size=64 lambda=0.01", "batch_size=1024 lambda=none"
    rows = _lrs(u, 64, "0.01", "sssdd") + _lrs(n, 1024, "none", "ddd")
    cells = {c["cell"]: c for c in _cell(rows)}
    assert cells[u]["frontier"] == "undecided" and cells[u]["max_stable_lr"] is None
    assert cells[n]["frontier"] == "none" and cells[n]["max_stable_lr"] is None
    assert findings.frontier_text(cells[u]) == "undecided" and findings.frontier_text(cells[n]) == "none"
    assert "undecided" in findings.cell_sentence(64, "λ=0.01", cells[u])
    # Diverged runs count at the start loss: every lr the same, so the curve is flat.
    assert cells[n]["lr_sensitivity"] == pytest.approx(0.0)
    assert frontier.full_phase_lrs(rows, top=2) == {u: [], n: []}
    # Nothing to refine where nothing trains; a cell below the grid tries the lr √2 below its smallest.
    assert frontier.refine_lrs(rows) == {n: 0.07071}
    assert findings.cell_sentence(1024, "no clipping", cells[n]) == \
        "batch 1024, no clipping: no lr trains — every lr tried diverged"


def test_a_cell_whose_smallest_lr_already_fails_by_an_instability_lies_below_the_grid():
    """Measured on the laptop preset with 128-step scans: batch 1024 without clipping collapsed at 0.025 and 0.05,
    was held at chance at 0.1 and 0.2 and diverged above. A longer scan cannot help there (the study used to say
    "raise --scan-steps"): even the smallest lr is too large. So the cell is `none`, its smallest lr is its first
    failing lr (replicated like any deciding lr), and the refinement tries √2 below it."""
    a, lrs = "batch_size=1024 lambda=none", (0.025, 0.05, 0.1, 0.2, 0.4)
    scan = _lrs(a, 1024, "none", "ccssd", lrs=lrs)
    (c,) = _cell(scan)
    assert (c["frontier"], c["max_stable_lr"], c["first_unstable_lr"], c["first_unstable_verdict"],
            c["first_unstable_kind"]) == ("none", None, 0.025, "collapsed", "instability")
    assert c["max_stable_lr_by_seed"] == [0.0]  # the seed's own frontier: below the grid
    assert findings.cell_sentence(1024, "no clipping", c) == (
        "batch 1024, no clipping: no lr trains — the smallest lr tried, 0.025, already collapses: the frontier lies "
        "below the grid (smaller lrs: --lr-range)")
    assert frontier.refine_lrs(scan) == {a: 0.01768}
    assert frontier.replication_needed(scan, 3) == {a: {0.025: {0}}}

    # Replicated: a majority of the smallest lr's seeds fails by an instability, so the bound rests on it.
    two_of_three = scan + [_row(a, 1024, "none", 0.025, v, seed=s, phase="replicate") for s, v in ((1, "t"), (2, "c"))]
    (c,) = _cell(two_of_three)
    assert c["frontier"] == "none" and (c["first_unstable_failed"], c["first_unstable_decided"]) == (2, 3)
    assert findings.support_text(c) == "none (0.025 fails 2/3)"
    assert "already collapses (in 2/3 seeds)" in findings.cell_sentence(1024, "no clipping", c)
    assert frontier.replication_needed(two_of_three, 3) == {}  # the fixed point
    assert sorted(zip(c["seed_list"], c["max_stable_lr_by_seed"])) == [(0, 0.0), (1, 0.025), (2, 0.0)]

    # Split seeds (trained, collapsed, stalled): no majority of instabilities, and none trains: undecided.
    split = scan + [_row(a, 1024, "none", 0.025, v, seed=s, phase="replicate") for s, v in ((1, "t"), (2, "s"))]
    (c,) = _cell(split)
    assert c["frontier"] == "undecided" and c["first_unstable_lr"] is None
    assert frontier.replication_needed(split, 3) == {}
    # 1 of 2 decided seeds is not a majority either, whatever the severer failure.
    (c,) = _cell(_lrs(a, 1024, "none", "sdd", lrs=lrs[:3]) + [_row(a, 1024, "none", 0.025, "d", seed=1)])
    assert c["frontier"] == "undecided"
    # A smallest lr that stalls is a budget limit (too slow for the scan), not a frontier below the grid.
    (c,) = _cell(_lrs(a, 1024, "none", "sccdd", lrs=lrs))
    assert c["frontier"] == "undecided" and "raise --scan-steps" in findings.cell_sentence(1024, "no clipping", c)

    # The refinement below the grid trains: the frontier is found there, bracketed by the smallest grid lr.
    found = scan + [_row(a, 1024, "none", 0.01768, "t", phase="refine")]
    (c,) = _cell(found)
    assert (c["frontier"], c["max_stable_lr"], c["first_unstable_lr"], c["max_stable_lr_at_low_edge"]) == \
        ("found", 0.01768, 0.025, True)
    assert frontier.replication_needed(found, 3) == {a: {0.01768: {0}, 0.025: {0}}}


def test_seeds_that_disagree_go_by_a_strict_majority():
    c = "batch_size=256 lambda=0.04"
    rows = [*(_row(c, 256, "0.04", 0.2, v, seed=s) for s, v in enumerate("ttd")),  # 2 of 3: trains
            *(_row(c, 256, "0.04", 0.4, v, seed=s) for s, v in enumerate("tdf")),  # 1 of 2 decided: does not
            *(_row(c, 256, "0.04", 0.8, v, seed=s, loss=2.1) for s, v in enumerate("ttt"))]  # beyond the failure
    (cell,) = _cell(rows)
    assert (cell["max_stable_lr"], cell["first_unstable_lr"], cell["first_unstable_verdict"]) == (0.2, 0.4, "diverged")
    assert cell["failed_trials"] == 1


def test_the_refinement_lr_and_the_full_phase_lrs():
    a, b = "batch_size=64 lambda=none", "batch_size=64 lambda=0.01"
    rows = _lrs(a, 64, "none", "tttd", losses=[1.7, 1.5, 1.9, None]) + _lrs(b, 64, "0.01", "ttttt")
    assert frontier.refine_lrs(rows) == {a: pytest.approx(0.5657)}  # √(0.4 × 0.8): the frontier at √2 resolution
    # Full runs: the best lr that trains, and the frontier itself (is it still training over the full budget?).
    assert frontier.full_phase_lrs(rows, top=1) == {a: [0.2, 0.4], b: [0.1, 1.6]}
    assert frontier.full_phase_lrs(rows, top=2) == {a: [0.1, 0.2, 0.4], b: [0.1, 0.2, 1.6]}
    # The refinement's row joins the cell's lrs: trained, it becomes the frontier; else the first failure.
    for v, edge, fail in (("t", 0.5657, 0.8), ("s", 0.4, 0.5657)):
        (cell,) = _cell(_lrs(a, 64, "none", "tttd") + [_row(a, 64, "none", 0.5657, v, phase="refine")])
        assert (cell["max_stable_lr"], cell["first_unstable_lr"]) == (edge, fail)
        assert cell["lrs_tried"] == 5
    (cell,) = _cell(_lrs(b, 64, "0.01", "ttttt"))
    assert cell["max_stable_lr_at_edge"] and findings.frontier_text(cell) == "≥1.6"


def test_the_frontier_is_checked_over_the_full_budget():
    a = "batch_size=64 lambda=none"
    scan = _lrs(a, 64, "none", "ttd")
    for v, held in (("t", True), ("s", False), ("d", False)):
        full = [_row(a, 64, "none", 0.2, v, phase="full", acc=0.4), _row(a, 64, "none", 0.1, "t", phase="full",
                                                                         acc=0.5)]
        (cell,) = _cell(scan + full)
        assert cell["frontier_holds"] is held and (cell["best_val_acc"], cell["best_base_lr"]) == (0.5, 0.1)
        assert (cell["full_trials"], cell["full_trained"]) == (2, 1 + (v == "t"))
        if not held:
            assert "NOT held over the full budget" in findings.cell_sentence(64, "no clipping", cell)


def test_findings_state_both_effects_with_numbers_and_say_when_not_shown():
    def summary(nc_1024, agc_1024):
        rows = []
        for b, nc, ag in ((64, "ttttd", "tttttd"), (1024, nc_1024, agc_1024)):
            for lam, pat in (("none", nc), ("0.01", ag)):
                cell = f"batch_size={b} lambda={lam}"
                rows += _lrs(cell, b, lam, pat, lrs=(0.1, 0.2, 0.4, 0.8, 1.6, 3.2))
        return findings.frontier_summary(frontier.frontier_table(rows))

    shown = summary("tdd", "tttss")
    assert "falls as the batch grows: 0.8 at batch 64 → 0.1 at batch 1024 (÷8)" in shown
    assert "at batch 1024 AGC λ=0.01 trains up to lr 0.4, 4× the 0.1 without clipping" in shown
    assert "1/2/0" not in shown and "3/2/0" in shown  # verdict counts per cell
    # Both effects are shown; only the scaling of the no-clipping frontier (peak 0.2 at 64 → 0.4 at 1024: one lr
    # step of the grid) is too little to call.
    assert shown.count("NOT SHOWN") == 1 and "too little to call (α = 0.25 (one seed)" in shown
    rows = []
    for b, nc in ((64, "ttttd"), (1024, "tdd")):
        for lam, pat in (("none", nc), ("0.01", "tttss")):
            rows += _lrs(f"batch_size={b} lambda={lam}", b, lam, pat, lrs=(0.1, 0.2, 0.4, 0.8, 1.6, 3.2))
    rows.append(_row("batch_size=1024 lambda=none", 1024, "none", 0.1, "s", phase="full", acc=0.1))
    weak = findings.frontier_summary(frontier.frontier_table(rows))
    assert "4× the 0.1 without clipping (and without clipping lr 0.1 did not even train over the full budget)" in weak
    top = findings.frontier_summary(frontier.frontier_table(
        _lrs("batch_size=64 lambda=none", 64, "none", "ttt", lrs=(0.1, 0.2, 0.4))
        + _lrs("batch_size=1024 lambda=none", 1024, "none", "tdd", lrs=(0.1, 0.2, 0.4))))
    assert "falls as the batch grows: ≥0.4 at batch 64 → 0.1 at batch 1024 (÷≥4)" + ONE in top  # a lower bound at 64
    edge = summary("tdd", "tttttt")  # AGC trains up to the largest lr tried: the ratio is a lower bound too
    assert "at batch 1024 AGC λ=0.01 trains up to lr ≥3.2, ≥32× the 0.1 without clipping" + ONE in edge
    nothing = summary("ddd", "tts")
    assert "(no lr tried trains at the largest batch, down to 0.1)" in nothing
    assert "where no lr tried trains without clipping (down to 0.1)" in nothing
    hidden = summary("ttttd", "ttttd")  # no fall, and AGC only 1×
    assert hidden.count("NOT SHOWN") == 2
    undecided = summary("sss", "tttss")  # no-clipping undecided at batch 1024: neither effect can be read
    assert undecided.count("NOT SHOWN") == 3 and "undecided" in undecided  # nor its scaling with the batch
    assert ("NOT SHOWN: at batch 1024 the frontier without clipping is undecided (no lr trained in its scan, where "
            "AGC λ=0.01 trained up to lr 0.4 in the same budget; a longer scan may find one), so AGC cannot be "
            "compared.") in undecided


def test_top_k_mean_is_the_papers_best_4_of_5():
    assert frontier.top_k_mean([0.1, 0.5, 0.4, 0.3, 0.2], 4) == pytest.approx((0.5 + 0.4 + 0.3 + 0.2) / 4)
    assert frontier.top_k_mean([float("nan"), 0.3], None) == pytest.approx(0.3)


def _three_axis_rows():
    """batch {64, 1024} × augmentation {0, 1} × λ {0.01, none}: without clipping the frontier falls with the
    batch, and further under strong augmentation; λ=0.01 holds it."""
    pats = {(64, 0, "none"): "ttttd", (1024, 0, "none"): "ttddd", (64, 1, "none"): "tttdd", (1024, 1, "none"): "tdddd",
            (64, 0, "0.01"): "tttts", (1024, 0, "0.01"): "tttss", (64, 1, "0.01"): "tttts", (1024, 1, "0.01"): "tttss"}
    rows = []
    for (b, a, lam), pat in pats.items():
        cell = f"batch_size={b} augment_strength={a} lambda={lam}"
        rows += [r | {"augment_strength": float(a)} for r in _lrs(cell, b, lam, pat)]
    return rows


def test_a_third_axis_gets_a_map_per_value_in_the_table_the_words_and_the_metrics():
    cells = frontier.frontier_table(_three_axis_rows())
    got = cells.to_pylist()
    # Map order: facet (augmentation), then row (batch), then column (λ, no clipping last).
    assert [(c["augment_strength"], c["batch_size"], c["lambda"]) for c in got] == [
        (0.0, 64, 0.01), (0.0, 64, None), (0.0, 1024, 0.01), (0.0, 1024, None),
        (1.0, 64, 0.01), (1.0, 64, None), (1.0, 1024, 0.01), (1.0, 1024, None)]
    grids = layout.grids_of(cells)
    assert [g.facet for g in grids] == ["augment_strength=0", "augment_strength=1"]
    assert all(g.rows == [64, 1024] and g.cols == ["λ=0.01", "no clipping"] for g in grids)
    assert grids[1].at[1024, "no clipping"]["max_stable_lr"] == 0.1
    text = findings.frontier_summary(cells)
    assert "  augment_strength=1:" in text
    assert ("[augment_strength=0] without clipping the largest lr that trains falls as the batch grows: 0.8 at batch "
            "64 → 0.2 at batch 1024 (÷4)" + ONE) in text
    assert ("[augment_strength=1] at batch 1024 AGC λ=0.01 trains up to lr 0.4, 4× the 0.1 without clipping"
            + ONE) in text
    assert "augment_strength=1, batch 1024, no clipping trains up to lr 0.1" in text
    md = findings.frontier_markdown(cells)
    assert md.count("**Largest base lr that trains") == 2 and "— augment_strength=1" in md
    assert "| 1024 | 0.4 | 0.1 |" in md
    metrics = {(k, step): v for k, v, step in layout.cell_metrics(cells)}
    assert metrics["max_stable_lr/b1024/augment_strength_1/lambda_none", 0] == 0.1
    assert metrics["max_stable_lr/augment_strength_1/lambda_none", 1024] == 0.1  # a series over batch sizes


def test_augmentation_as_the_rows_at_one_batch_reads_the_frontier_and_accuracy_along_it():
    rows = []
    for a, nc, agc, acc_nc, acc_agc in ((0.0, "tttdd", "tttts", 0.60, 0.62), (0.5, "ttddd", "tttts", 0.50, 0.58),
                                        (1.0, "tdddd", "tttss", 0.30, 0.55)):
        for lam, pat, acc in (("none", nc, acc_nc), ("0.01", agc, acc_agc)):
            cell = f"augment_strength={a:g} lambda={lam}"
            rows += [r | {"augment_strength": a} for r in _lrs(cell, 512, lam, pat)]
            rows.append(_row(cell, 512, lam, 0.1, "t", phase="full", acc=acc) | {"augment_strength": a})
    cells = frontier.frontier_table(rows)
    (g,) = layout.grids_of(cells)
    assert (g.layout.row_axis, g.rows, g.cols) == ("augment_strength", [0, 0.5, 1], ["λ=0.01", "no clipping"])
    text = findings.frontier_summary(cells)
    assert text.splitlines()[1].split() == ["augmentation", "λ=0.01", "no", "clipping"]  # rows: augmentation
    assert ("without clipping the largest lr that trains falls as augmentation grows: 0.4 at augmentation 0 → 0.1 "
            "at augmentation 1 (÷4)" + ONE) in text
    assert "without clipping the best val top-1 falls as augmentation grows: 0.600 at augmentation 0 → 0.300" in text
    assert "at augmentation 1 AGC λ=0.01 reaches top-1 0.550, +0.250 over the 0.300 without clipping" + ONE in text
    assert "at augmentation 1 AGC λ=0.01 trains up to lr 0.4, 4× the 0.1 without clipping" + ONE in text
    metrics = {(k, step) for k, _, step in layout.cell_metrics(cells)}
    assert ("max_stable_lr/aug0.5/lambda_none", 0) in metrics
    assert not any(step for _, step in metrics)  # augmentation is no MLflow step: flat metrics only


def test_accuracy_within_the_noise_margin_is_not_called_a_finding():
    rows = []
    for a, acc_nc, acc_agc in ((0.0, 0.60, 0.61), (1.0, 0.59, 0.60)):
        for lam, acc in (("none", acc_nc), ("0.01", acc_agc)):
            cell = f"augment_strength={a:g} lambda={lam}"
            rows += _lrs(cell, 512, lam, "ttt") + [_row(cell, 512, lam, 0.1, "t", phase="full", acc=acc)]
    text = findings.frontier_summary(frontier.frontier_table(rows))
    assert "NOT SHOWN: without clipping the best val top-1 does not fall (by ≥ 0.02) from augmentation 0 to 1" in text
    assert "NOT SHOWN: at augmentation 1 AGC's best top-1 (λ=0.01, 0.600) is not ≥ 0.02 above no clipping's 0.590." \
        in text


# ---- replication where it decides (issue 30) ----

def _seeds(cell, b, lam, lr, pattern, phase="replicate", **kw):
    """Runs of one lr at seeds 0, 1, …: pattern 'tts' = seed 0 trained, seed 1 trained, seed 2 stalled."""
    return [_row(cell, b, lam, lr, v, seed=s, phase=phase if s else "scan", **kw) for s, v in enumerate(pattern)]


def test_replication_asks_for_the_deciding_lrs_until_each_rests_on_its_seeds():
    a = "batch_size=256 lambda=0.01"
    scan = _lrs(a, 256, "0.01", "sttts", losses=[None, 2.0, 1.5, 1.9, None])  # best 0.4, frontier 0.8, fails 1.6
    need = frontier.replication_needed(scan, 3)
    assert need == {a: {0.4: {0}, 0.8: {0}, 1.6: {0}}}  # the slow 0.1 and the inner 0.2 are not replicated
    assert frontier.replication_needed(scan, 1) == {}  # 1 = no replication
    # The majority agrees with seed 0: nothing more to run (the fixed point).
    done = [r for r in scan if r["base_lr"] in (0.1, 0.2)] + _seeds(a, 256, "0.01", 0.4, "ttt", loss=1.5) \
        + _seeds(a, 256, "0.01", 0.8, "ttt", loss=1.9) + _seeds(a, 256, "0.01", 1.6, "sss")
    assert frontier.replication_needed(done, 3) == {}
    # The majority moves the frontier: 0.8 fails in 2 of 3 seeds, so 0.4 is the frontier and 0.8 its first
    # failure; the best lr moves to 0.2 (0.4's mean loss is now higher), which has one run: replicate it.
    moved = [r for r in scan if r["base_lr"] in (0.1, 0.2)] + _seeds(a, 256, "0.01", 0.4, "ttt", loss=2.1) \
        + _seeds(a, 256, "0.01", 0.8, "tss") + _seeds(a, 256, "0.01", 1.6, "sss")
    f = frontier.frontier_of(moved)
    assert (f.max_stable.lr, f.first_unstable.lr) == (0.4, 0.8)
    assert frontier.replication_needed(moved, 3) == {a: {0.2: {0}}}


def test_a_tie_between_seeds_is_not_a_majority():
    a = "batch_size=64 lambda=none"
    rows = _lrs(a, 64, "none", "tt", lrs=(0.1, 0.2)) + _seeds(a, 64, "none", 0.4, "ts")  # 1 of 2 trained
    f = frontier.frontier_of(rows)
    assert (f.max_stable.lr, f.first_unstable.lr, f.first_unstable.verdict) == (0.2, 0.4, "stalled")


def test_every_number_says_the_agreement_it_rests_on_and_its_spread():
    a = "batch_size=256 lambda=0.01"
    rows = [r for r in _lrs(a, 256, "0.01", "tt", lrs=(0.1, 0.2))] + _seeds(a, 256, "0.01", 0.4, "ttt") \
        + _seeds(a, 256, "0.01", 0.8, "tss") + _seeds(a, 256, "0.01", 1.6, "sss")
    rows += [_row(a, 256, "0.01", 0.4, "t", seed=s, phase="full", acc=acc) for s, acc in enumerate((0.5, 0.6, 0.7))]
    (c,) = _cell(rows)
    assert (c["max_stable_lr"], c["max_stable_lr_trained"], c["max_stable_lr_decided"]) == (0.4, 3, 3)
    assert (c["first_unstable_lr"], c["first_unstable_failed"], c["first_unstable_decided"]) == (0.8, 2, 3)
    assert findings.support_text(c) == "0.4 (3/3; 0.8 fails 2/3)"
    # Seed 0 alone trains up to 0.8; seeds 1 and 2 up to 0.4: the spread of the frontier over seeds.
    assert (c["seed_list"], c["max_stable_lr_by_seed"]) == ([0, 1, 2], [0.8, 0.4, 0.4])
    assert (c["max_stable_lr_min"], c["max_stable_lr_max"]) == (0.4, 0.8)
    assert findings.spread_text(c) == "0.4–0.8 (3 seeds)"
    assert c["best_val_acc"] == pytest.approx(0.6) and c["best_val_acc_sd"] == pytest.approx(0.1)
    assert (c["best_val_acc_min"], c["best_val_acc_max"], c["best_val_acc_seeds"]) == (0.5, 0.7, 3)
    assert (c["frontier_holds"], c["frontier_holds_trained"], c["frontier_holds_decided"]) == (True, 3, 3)
    text = findings.cell_sentence(256, "λ=0.01", c)
    assert "trains up to lr 0.4 (in 3/3 seeds)" in text and "lr 0.8 stalls (in 2/3 seeds)" in text
    assert "the seeds' own frontiers: 0.4–0.8 (3 seeds)" in text
    summary = findings.frontier_summary(frontier.frontier_table(rows))
    assert "0.4 (3/3; 0.8 fails 2/3)" in summary and "0.600 ± 0.100 @0.4" in summary
    # One seed: the bare number, no agreement or spread to show.
    (one,) = _cell(_lrs(a, 256, "0.01", "tts", lrs=(0.1, 0.2, 0.4)))
    assert findings.support_text(one) == "0.2" and findings.spread_text(one) == "-"


def _map(nc_small, nc_large, agc_large):
    """A 2 × 2 map (batch 64, 1024 × λ 0.01, none) whose deciding lrs are replicated; each argument gives per
    seed (0, 1, 2) the verdicts at lrs 0.1 … 1.6 as 'ttdd…'."""
    rows = []
    for b, lam, per_seed in ((64, "none", nc_small), (1024, "none", nc_large), (1024, "0.01", agc_large),
                             (64, "0.01", ["ttttt"] * 3)):
        cell = f"batch_size={b} lambda={lam}"
        for s, pattern in enumerate(per_seed):
            rows += _lrs(cell, b, lam, pattern, seed=s, phase="scan" if s == 0 else "replicate")
    return rows


def test_a_difference_within_the_seeds_spread_is_never_called_a_finding():
    # Every seed agrees: batch 64 trains up to 0.8, batch 1024 to 0.1; AGC at 1024 up to 0.8.
    apart = findings.frontier_summary(frontier.frontier_table(_map(["ttttd"] * 3, ["tdddd"] * 3, ["ttttd"] * 3)))
    assert ("without clipping the largest lr that trains falls as the batch grows: 0.8 at batch 64 → 0.1 at "
            "batch 1024 (÷8); holds in 3 of 3 seeds.") in apart
    assert "AGC λ=0.01 trains up to lr 0.8, 8× the 0.1 without clipping; holds in 3 of 3 seeds." in apart
    # The majority says the same, but seed 2's batch-1024 control trains up to 0.8 and seed 1's AGC only to 0.1:
    # the seeds' ranges overlap, so neither effect is called, and the seeds that broke it are named.
    within = findings.frontier_summary(frontier.frontier_table(
        _map(["ttttd"] * 3, ["tdddd", "tdddd", "ttttd"], ["ttttd", "tdddd", "ttttd"])))
    assert "NOT SHOWN: without clipping the largest lr that trains falls from batch 64 to 1024 in the majority" \
        in within
    assert "within the seeds' spread (0.8 vs 0.1–0.8); holds in 2 of 3 seeds (seed 2 broke it)." in within
    assert "NOT SHOWN: at batch 1024 AGC λ=0.01 trains up to lr 0.8, 8× the 0.1 without clipping in the majority" \
        in within
    assert "(seed 1, 2 broke it)" in within


# ---- why the edge fails (issue 32): stalled vs collapsed, the edge's kind, a best lr at the smallest lr tried ----

def test_a_collapse_above_the_frontier_is_an_instability_and_a_stall_a_budget_limit():
    a, b = "batch_size=256 lambda=none", "batch_size=1024 lambda=none"
    rows = _lrs(a, 256, "none", "sttcdc") + _lrs(b, 1024, "none", "ttsss")
    cells = {c["cell"]: c for c in _cell(rows)}
    ca, cb = cells[a], cells[b]
    assert (ca["max_stable_lr"], ca["first_unstable_lr"], ca["first_unstable_verdict"]) == (0.4, 0.8, "collapsed")
    assert ca["first_unstable_kind"] == "instability" and (ca["scan_collapsed"], ca["scan_stalled"]) == (1, 1)
    assert cb["first_unstable_kind"] == "budget" and cb["scan_collapsed"] == 0
    assert findings.cell_sentence(256, "no clipping", ca).endswith(
        "lr 0.8 collapses (loss 2.30): the edge is an instability")
    text = findings.frontier_summary(frontier.frontier_table(rows))
    assert ("the first lr that fails above the frontier: an instability in 1 of 2 cells (1 collapsed, 0 diverged), "
            "a budget limit in 1 (stalled: batch 1024 no clipping)") in text
    assert "scan runs trained / stalled / collapsed / diverged:" in text and "2/1/1/1" in text
    # The frontier is the same as if the collapse had been a stall: both fail.
    (same,) = _cell(_lrs(a, 256, "none", "sttsdc"))
    assert same["max_stable_lr"] == 0.4 and same["first_unstable_verdict"] == "stalled"


def test_seeds_that_fail_differently_take_the_commonest_failure_and_a_tie_the_severer():
    c = "batch_size=256 lambda=0.04"
    for pattern, verdict in (("cst", "collapsed"), ("ccs", "collapsed"), ("ssc", "stalled"), ("cdt", "diverged")):
        rows = _lrs(c, 256, "0.04", "t", lrs=(0.1,)) + [_row(c, 256, "0.04", 0.2, v, seed=s)
                                                         for s, v in enumerate(pattern)]
        (cell,) = _cell(rows)
        assert cell["first_unstable_verdict"] == verdict, pattern


def test_a_best_lr_at_the_smallest_lr_tried_is_marked_as_an_upper_bound_on_the_optimum():
    a = "batch_size=1024 lambda=none"
    rows = _lrs(a, 1024, "none", "tdd", lrs=(0.025, 0.05, 0.1))
    rows.append(_row(a, 1024, "none", 0.025, "t", phase="full", acc=0.16))
    (c,) = _cell(rows)
    assert (c["best_scan_lr"], c["best_scan_lr_at_low_edge"], c["max_stable_lr_at_low_edge"]) == (0.025, True, True)
    assert (c["lowest_lr_tried"], c["highest_lr_tried"]) == (0.025, 0.1)
    # The frontier there is bracketed (0.05 diverged): a number, not a bound; the best lr is the bound.
    assert findings.frontier_text(c) == "0.025"
    assert "its best lr is the smallest tried (≤0.025: the optimum may lie below)" in \
        findings.cell_sentence(1024, "no clipping", c)
    text = findings.frontier_summary(frontier.frontier_table(rows))
    assert "0.160 @≤0.025" in text and "0.160 @ ≤0.025" in findings.frontier_markdown(frontier.frontier_table(rows))
    (inside,) = _cell(_lrs(a, 1024, "none", "sttd", losses=[None, 1.7, 1.9, None], lrs=(0.025, 0.05, 0.1, 0.2)))
    assert not inside["best_scan_lr_at_low_edge"] and "smallest tried" not in findings.cell_sentence(
        1024, "no clipping", inside)

"""The frontier, the cells table and the findings as pure functions over hand-made rows."""
import pyarrow as pa
import pytest

from studies.sweep import findings, frontier

START = 2.30
LOSS = {"t": 1.8, "s": 2.29, "d": None, "f": None}  # trained, stalled, diverged, failed
STATUS = {"t": "completed", "s": "completed", "d": "diverged", "f": "failed"}


def _row(cell, b, lam, lr, v, seed=0, phase="scan", loss=None, acc=None):
    """A results row; `v` is t(rained), s(talled), d(iverged) or f(ailed). Verdicts are judged from the losses
    (no `verdict` column), as for rows written before it existed."""
    return {"cell": cell, "batch_size": b, "model": "nf_resnet_cifar", "clipping": "none" if lam == "none" else "agc",
            "lambda": None if lam == "none" else float(lam), "base_lr": lr, "seed": seed,
            "status": STATUS[v], "phase": phase, "initial_train_loss": START,
            "final_train_loss": LOSS[v] if loss is None else loss, "final_train_loss_se": 0.01, "best_val_acc": acc}


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
    assert text == "batch 64, no clipping trains up to lr 0.8 (loss 1.90, start 2.30); lr 1.6 stalls (loss 2.29)"


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
    assert frontier.full_phase_lrs(rows, top=2) == {u: [], n: []} and frontier.refine_lrs(rows) == {}


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
    assert "NOT SHOWN" not in shown and "1/2/0" not in shown and "3/2/0" in shown  # verdict counts per cell
    rows = []
    for b, nc in ((64, "ttttd"), (1024, "tdd")):
        for lam, pat in (("none", nc), ("0.01", "tttss")):
            rows += _lrs(f"batch_size={b} lambda={lam}", b, lam, pat, lrs=(0.1, 0.2, 0.4, 0.8, 1.6, 3.2))
    rows.append(_row("batch_size=1024 lambda=none", 1024, "none", 0.1, "s", phase="full", acc=0.1))
    weak = findings.frontier_summary(frontier.frontier_table(rows))
    assert "4× the 0.1 without clipping (and without clipping lr 0.1 did not even train over the full budget)" in weak
    nothing = summary("ddd", "tts")
    assert "(no lr trains at the largest batch)" in nothing and "where no lr trains without clipping" in nothing
    hidden = summary("ttttd", "ttttd")  # no fall, and AGC only 1×
    assert hidden.count("NOT SHOWN") == 2
    undecided = summary("sss", "tttss")  # no-clipping undecided at batch 1024: neither effect can be read
    assert undecided.count("NOT SHOWN") == 2 and "undecided" in undecided


def test_top_k_mean_is_the_papers_best_4_of_5():
    assert frontier.top_k_mean([0.1, 0.5, 0.4, 0.3, 0.2], 4) == pytest.approx((0.5 + 0.4 + 0.3 + 0.2) / 4)
    assert frontier.top_k_mean([float("nan"), 0.3], None) == pytest.approx(0.3)

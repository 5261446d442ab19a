"""The study's figures as pure functions of its tables: a third grid axis gets its own row of panels (or heatmap),
augmentation as the map's rows reads as such."""
import math

import pyarrow as pa
import pytest

from studies.sweep import figures, frontier
from tests.test_sweep_frontier import _lrs, _row, _three_axis_rows
from tests.test_sweep_scaling import KNOWN, _study


def _visible(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def test_the_stable_region_draws_a_row_of_panels_per_value_of_a_third_axis():
    rows = _three_axis_rows()
    cells = frontier.frontier_table(rows)
    fig = figures.plot_stable_region(rows, cells, "t")
    axes = _visible(fig)
    assert [ax.get_title() for ax in axes] == ["augment_strength=0\nλ=0.01", "augment_strength=0\nno clipping",
                                               "augment_strength=1\nλ=0.01", "augment_strength=1\nno clipping"]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["64", "1024"]
    # The frontier line of augment_strength=1, no clipping: lr 0.8 at batch 64 (row 0), 0.1 at batch 1024 (row 1).
    line = [ln for ln in axes[3].get_lines() if ln.get_linestyle() == "-"][0]
    assert list(line.get_xdata()) == [0.4, 0.1] and list(line.get_ydata()) == [0, 1]
    figures.close(fig)
    heat = figures.plot_stability_map(cells, "t")
    maps = [ax for ax in heat.axes if ax.images]
    assert [ax.get_title() for ax in maps] == ["augment_strength=0", "augment_strength=1"]
    assert {t.get_text().split("\n")[0] for t in maps[1].texts} == {"lr 0.8", "lr 0.4", "lr 0.1"}
    figures.close(heat)


def test_curves_have_a_panel_per_row_and_a_line_per_facet_and_column():
    rows = _three_axis_rows()
    fig = figures.plot_lr_loss(rows)
    axes = _visible(fig)
    assert [ax.get_title() for ax in axes] == ["batch 64", "batch 1024"]
    labels = [ln.get_label() for ln in axes[0].get_lines() if not ln.get_label().startswith("_")]
    assert labels == ["augment_strength=0 λ=0.01", "augment_strength=0 no clipping", "augment_strength=1 λ=0.01",
                      "augment_strength=1 no clipping"]
    figures.close(fig)


def test_augmentation_rows_are_evenly_spaced_and_named():
    rows = []
    for a in (0.0, 0.5, 1.0):
        for lam in ("none", "0.01"):
            cell = f"augment_strength={a:g} lambda={lam}"
            rows += [r | {"augment_strength": a} for r in _lrs(cell, 512, lam, "ttd")]
            rows.append(_row(cell, 512, lam, 0.1, "t", phase="full", acc=0.5) | {"augment_strength": a})
    cells = frontier.frontier_table(pa.Table.from_pylist(rows))
    fig = figures.plot_stable_region(rows, cells)
    ax = _visible(fig)[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "0.5", "1"]
    assert ax.get_ylabel() == "augmentation (augment_strength)"
    figures.close(fig)
    acc = figures.plot_lr_accuracy(rows)
    assert [a.get_title() for a in _visible(acc)] == ["augmentation 0", "augmentation 0.5", "augmentation 1"]
    figures.close(acc)


# ---- replication (issue 30): every seed's verdict, the frontier's spread, the accuracy's range ----

VERDICT = {"t": "trained", "s": "stalled", "d": "diverged"}


def _run(cell, b, lr, v, seed=0, phase="scan", acc=None):
    """A results row of λ=0.01 with its verdict: t(rained), s(talled) or d(iverged)."""
    return {"cell": cell, "batch_size": b, "model": "nf_resnet_cifar", "clipping": "agc", "lambda": 0.01,
            "base_lr": lr, "seed": seed, "phase": phase, "status": "diverged" if v == "d" else "completed",
            "verdict": VERDICT[v], "initial_train_loss": 2.3, "final_train_loss": {"t": 1.8, "s": 2.29}.get(v),
            "final_train_loss_se": 0.01, "best_val_acc": acc}


def _per_lr(cell, b, per_lr: dict[float, str], phase_0="scan"):
    """Runs of a cell: per lr, the verdicts of seeds 0, 1, … ('tts'); seeds past 0 are replicates."""
    return [_run(cell, b, lr, v, seed=s, phase=phase_0 if s == 0 else "replicate")
            for lr, pattern in per_lr.items() for s, v in enumerate(pattern)]


A, B, C = "batch_size=64 lambda=0.01", "batch_size=1024 lambda=0.01", "batch_size=256 lambda=0.01"


def _replicated_rows():
    """A (batch 64): 0.4 trains in seeds 0, 1 and stalls in seed 2, so the majority frontier is 0.4 (2 of 3) and
    seed 2's own is 0.2; full runs at 0.2 score 0.5, 0.6, 0.7. B (batch 1024): one seed, frontier 0.2. C (batch
    256): seed 2 diverges at every lr, its own frontier none (0)."""
    rows = _per_lr(A, 64, {0.1: "t", 0.2: "ttt", 0.4: "tts", 0.8: "sss"})
    rows += _per_lr(B, 1024, {0.1: "t", 0.2: "t", 0.4: "d"})
    rows += _per_lr(C, 256, {0.1: "ttd", 0.2: "ddd"})
    rows += [_run(A, 64, 0.2, "t", seed=s, phase="full", acc=acc) for s, acc in enumerate((0.5, 0.6, 0.7))]
    rows.append(_run(B, 1024, 0.1, "t", phase="full", acc=0.4))
    return rows


def _tagged(ax, gid):
    return [a for a in [*ax.get_lines(), *ax.collections] if a.get_gid() == gid]


def _verdict_of(line):
    return next(v for v, (m, c) in figures.MARKERS.items() if (m, c) == (line.get_marker(), line.get_color()))


def test_every_seeds_verdict_is_drawn_beneath_its_lr_and_the_frontier_with_its_spread():
    rows = _replicated_rows()
    cells = frontier.frontier_table(rows)
    fig = figures.plot_stable_region(rows, cells, "t")
    (ax,) = _visible(fig)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["64", "256", "1024"]  # A row 0, C row 1, B row 2
    seeds = _tagged(ax, figures.SEED_GID)
    at = {(x, y): [ln for ln in seeds if (ln.get_xdata()[0], ln.get_ydata()[0]) == (x, y)] for x, y in
          {(ln.get_xdata()[0], ln.get_ydata()[0]) for ln in seeds}}
    # A: every replicated lr shows its three seeds, in seed order; the lone run at 0.1 gets none.
    assert {lr for lr, row in at if row == 0} == {0.2, 0.4, 0.8}
    assert [_verdict_of(ln) for ln in at[0.4, 0]] == ["trained", "trained", "stalled"]
    assert [_verdict_of(ln) for ln in at[0.8, 0]] == ["stalled"] * 3
    # …stacked beneath the lr's majority marker (trained: 2 of 3), each further down.
    (major,) = [ln for ln in ax.get_lines() if ln.get_gid() is None and list(ln.get_xdata()) == [0.4]
                and list(ln.get_ydata()) == [0] and ln.get_marker() == "o"]
    ys = [ln.get_transform().transform((0.4, 0))[1] for ln in [major, *at[0.4, 0]]]
    assert ys == sorted(ys, reverse=True) and len(set(ys)) == 4
    assert not any(row == 2 for _, row in at)  # B has one seed: nothing beneath its lrs
    # The frontier line goes by the majority; the band spans the seeds' own frontiers (A: 0.2–0.4; C: none–0.1,
    # drawn from left of its lrs), and B, unreplicated, has none.
    line = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-" and ln.get_gid() is None][0]
    assert list(line.get_xdata()) == [0.4, 0.1, 0.2] and list(line.get_ydata()) == [0, 1, 2]
    bands = {ln.get_ydata()[0]: list(ln.get_xdata()) for ln in _tagged(ax, figures.SPREAD_GID)}
    assert bands == {0: [0.2, 0.4], 1: [pytest.approx(0.1 / 2 ** 0.5), 0.1]}
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "each seed's verdict (beneath its lr)" in labels and "frontier range over seeds" in labels
    assert "trained (majority of seeds)" in labels
    figures.close(fig)


def test_the_map_writes_the_agreement_the_spread_and_the_accuracy_with_its_sd():
    cells = frontier.frontier_table(_replicated_rows())
    heat = figures.plot_stability_map(cells, "t")
    (ax,) = [ax for ax in heat.axes if ax.images]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["lr 0.4 (2/3)\n0.8 stalls 3/3\nseeds 0.2–0.4\nacc 0.600 ± 0.100",  # A: map order, batch 64 first
                     "lr 0.1 (2/3)\n0.2 diverges 3/3\nseeds none–0.1",  # C: seed 2 trains at no lr
                     "lr 0.2\nacc 0.400"]  # B: one seed, as before
    figures.close(heat)


def test_the_curves_draw_each_seed_around_the_mean_and_the_accuracys_range():
    rows = _replicated_rows()
    fig = figures.plot_lr_loss(rows)
    axes = {ax.get_title(): ax for ax in _visible(fig)}
    mean = next(ln for ln in axes["batch 64"].get_lines() if ln.get_label() == "λ=0.01")
    assert dict(zip(mean.get_xdata(), mean.get_ydata()))[0.4] == pytest.approx((1.8 + 1.8 + 2.29) / 3)
    (points,) = _tagged(axes["batch 64"], figures.SEED_GID)  # no seed diverged: one set of points
    got = sorted(y for x, y in zip(points.get_xdata(), points.get_ydata()) if x == 0.4)
    assert got == pytest.approx([1.8, 1.8, 2.29]) and points.get_alpha() < 1
    div = [ln for ln in _tagged(axes["batch 256"], figures.SEED_GID) if ln.get_marker() == "x"]
    assert len(div) == 1 and list(div[0].get_xdata()) == [0.1] + [0.2] * 3  # C's diverged seeds, at the start
    assert not _tagged(axes["batch 1024"], figures.SEED_GID)  # B: one seed
    figures.close(fig)
    acc = figures.plot_lr_accuracy(rows)
    axes = {ax.get_title(): ax for ax in _visible(acc)}
    (bars,) = _tagged(axes["batch 64"], figures.ACC_SPREAD_GID)
    assert [[tuple(p) for p in seg] for seg in bars.get_segments()] == [[(0.2, 0.5), (0.2, 0.7)]]
    (points,) = _tagged(axes["batch 64"], figures.SEED_GID)
    assert sorted(points.get_ydata()) == [0.5, 0.6, 0.7]
    assert not _tagged(axes["batch 1024"], figures.ACC_SPREAD_GID)
    assert [t.get_text() for t in axes["batch 1024"].get_legend().get_texts()] == ["λ=0.01", "chance (1/10)",
                                                                                    "one seed", "range over seeds"]
    figures.close(acc)


def test_an_unreplicated_study_draws_nothing_of_seeds():
    rows = [r for r in _replicated_rows() if r["cell"] == B]
    rows += _per_lr(A, 64, {0.1: "t", 0.2: "t", 0.4: "t", 0.8: "s"})
    cells = frontier.frontier_table(rows)
    for fig in (figures.plot_stable_region(rows, cells), figures.plot_lr_loss(rows), figures.plot_lr_accuracy(rows)):
        for ax in _visible(fig):
            assert not [a for g in (figures.SEED_GID, figures.SPREAD_GID, figures.ACC_SPREAD_GID)
                        for a in _tagged(ax, g)]
        legends = fig.legends or [ax.get_legend() for ax in fig.axes if ax.get_legend()]
        labels = [t.get_text() for lg in legends for t in lg.get_texts()]
        assert not any("seed" in label for label in labels)
        figures.close(fig)
    heat = figures.plot_stability_map(cells)
    assert "seeds" not in heat._suptitle.get_text()
    assert [t.get_text() for t in next(ax for ax in heat.axes if ax.images).texts] == ["lr 0.4", "lr 0.2\nacc 0.400"]
    figures.close(heat)


# ---- figures a reader takes in at 830 px (issue 32) ----

def _why_rows():
    """batch 64 and 1024 × λ=0.01 and no clipping: at batch 1024 no clipping the lr above the frontier collapses
    and the frontier (0.1) did not hold over the full budget; λ=0.01 trains up to the largest lr tried at batch 64
    (best there too); batch 1024 no clipping's best lr is the smallest tried."""
    rows = _lrs("batch_size=64 lambda=0.01", 64, "0.01", "ttttt", losses=[2.0, 1.9, 1.7, 1.6, 1.5])
    rows += _lrs("batch_size=64 lambda=none", 64, "none", "sttds")
    rows += _lrs("batch_size=1024 lambda=0.01", 1024, "0.01", "tttdd", losses=[2.0, 1.7, 1.9, None, None])
    rows += _lrs("batch_size=1024 lambda=none", 1024, "none", "tcddd")
    rows += [_row("batch_size=1024 lambda=none", 1024, "none", 0.1, "s", phase="full", acc=0.15),
             _row("batch_size=64 lambda=none", 64, "none", 0.2, "t", phase="full", acc=0.6),
             _row("batch_size=64 lambda=0.01", 64, "0.01", 0.8, "t", phase="full", acc=0.62)]
    return rows


def _texts(ax, gid):
    return [t.get_text() for t in ax.texts if t.get_gid() == gid]


def test_the_stable_region_marks_why_each_lr_failed_its_edges_and_a_frontier_that_did_not_hold():
    rows = _why_rows()
    cells = frontier.frontier_table(rows)
    fig = figures.plot_stable_region(rows, cells, "t")
    lam, nc = _visible(fig)
    # The smallest batch on top, as in the stability map: the y axis runs downwards.
    assert lam.get_ylim()[0] > lam.get_ylim()[1] and [t.get_text() for t in lam.get_yticklabels()] == ["64", "1024"]
    assert lam.get_xlabel() == "base lr per 256 examples (log)" and "batch size" in lam.get_ylabel()
    verdicts = {(_verdict_of(ln), ln.get_xdata()[0], ln.get_ydata()[0]) for ln in nc.get_lines()
                if ln.get_gid() is None and ln.get_linestyle() == "None" and ln.get_marker() in "osvx"}
    assert ("collapsed", 0.2, 1) in verdicts and ("stalled", 1.6, 0) in verdicts  # batch 1024 is row 1
    (ring,) = _tagged(nc, figures.NOT_HELD_GID)
    assert (ring.get_xdata()[0], ring.get_ydata()[0]) == (0.1, 1)
    assert _texts(lam, figures.EDGE_GID) == ["≥"] and _texts(nc, figures.EDGE_GID) == ["≤"]  # 1024 none: best 0.1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "collapsed (left its start, stayed finite)" in labels and "frontier NOT held over the full budget" in labels
    figures.close(fig)


def test_the_map_frames_a_frontier_that_did_not_hold_and_labels_its_axes_and_scale():
    cells = frontier.frontier_table(_why_rows())
    heat = figures.plot_stability_map(cells, "t")
    (ax,) = [ax for ax in heat.axes if ax.images]
    (frame,) = [p for p in ax.patches if p.get_gid() == figures.NOT_HELD_GID]
    assert frame.get_xy() == (pytest.approx(1 - 0.46), pytest.approx(1 - 0.46))  # column 1 (no clipping), row 1
    assert "NOT held (full run)" in ax.texts[3].get_text()
    assert ax.get_xlabel() == "AGC clipping threshold λ" and "batch size" in ax.get_ylabel()
    (bar,) = [a for a in heat.axes if a.get_label() == "<colorbar>"]
    assert [t.get_text() for t in bar.get_yticklabels()] == ["0.1", "0.4", "1.6"]
    assert "per 256 examples" in bar.get_ylabel()
    figures.close(heat)


def test_the_loss_curves_draw_the_start_the_trained_threshold_and_every_lines_divergences():
    rows = _why_rows()
    fig = figures.plot_lr_loss(rows)
    axes = {ax.get_title(): ax for ax in _visible(fig)}
    ax = axes["batch 1024"]
    (chance,) = _tagged(ax, figures.CHANCE_GID)
    (threshold,) = _tagged(ax, figures.THRESHOLD_GID)
    assert chance.get_ydata()[0] == pytest.approx(2.30) and threshold.get_ydata()[0] == pytest.approx(2.30 * 0.95)
    # Both lines diverge at 0.8 and 1.6: their ✕s sit at the start, each line's a step higher than the last.
    divs = _tagged(ax, figures.DIVERGED_GID)
    assert [list(d.get_xdata()) for d in divs] == [[0.8, 1.6], [0.4, 0.8, 1.6]]
    heights = [d.get_transform().transform((0.8, 2.30))[1] for d in divs]
    assert heights[1] > heights[0] > ax.transData.transform((0.8, 2.30))[1]
    assert fig._suptitle.get_text() == "final training loss vs learning rate (scan runs)"
    assert ax.get_xlabel().startswith("base lr per 256 examples") and "nats" in axes["batch 64"].get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[-3:] == ["start ≈ chance (ln 10)", "trained below (start − 5 %)", "diverged (at the start)"]
    figures.close(fig)


def test_the_accuracy_curves_draw_chance_and_no_line_through_one_or_two_lrs():
    acc = figures.plot_lr_accuracy(_why_rows())
    for ax in _visible(acc):
        (chance,) = _tagged(ax, figures.CHANCE_GID)
        assert chance.get_ydata()[0] == pytest.approx(0.1)
        assert all(ln.get_linestyle() == "None" for ln in ax.get_lines() if not ln.get_label().startswith("_"))
    assert acc._suptitle.get_text().startswith("validation accuracy vs learning rate")
    figures.close(acc)


def test_frontier_scaling_draws_a_fitted_line_per_lambda_the_bounds_and_linear_scaling():
    cells = _study(KNOWN)
    fig = figures.plot_frontier_scaling(cells)
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:3] == ["λ=0.01: α = 0.50 (one seed)", "λ=0.04: α = 1.00 (one seed)",
                          "no clipping: α = 0.00 (one seed)"]
    assert "linear scaling (α = 1)" in labels and "≥: trains at the largest lr tried (left out)" in labels
    fits = _tagged(ax, figures.FIT_GID)
    slopes = [math.log(f.get_ydata()[-1] / f.get_ydata()[0]) / math.log(f.get_xdata()[-1] / f.get_xdata()[0])
              for f in fits]
    assert slopes == [pytest.approx(0.5), pytest.approx(1.0), pytest.approx(0.0, abs=1e-9)]
    assert [list(f.get_xdata()) for f in fits] == [[64, 256, 1024], [256, 1024], [64, 256, 1024]]  # fitted range
    (bound,) = _tagged(ax, figures.EDGE_GID)
    assert (bound.get_xdata()[0], bound.get_ydata()[0], bound.get_marker()) == (64, pytest.approx(0.4), "^")
    (linear,) = _tagged(ax, figures.LINEAR_GID)
    assert linear.get_ydata()[-1] / linear.get_ydata()[0] == pytest.approx(1024 / 64)
    assert ax.get_xscale() == ax.get_yscale() == "log" and "examples per step" in ax.get_xlabel()
    assert "base lr × B/256" in ax.get_ylabel() and ax.get_title()
    figures.close(fig)


def test_frontier_scaling_draws_mccandlishs_curve_where_the_noise_scale_was_measured():
    cells = _study(KNOWN)
    plain = figures.plot_frontier_scaling(cells, [{"gns": None}])
    assert not _tagged(plain.axes[0], figures.MCCANDLISH_GID)  # not measured (the laptop preset): not drawn
    figures.close(plain)
    fig = figures.plot_frontier_scaling(cells, [{"gns": 256.0}, {"gns": 256.0}])
    (ax,) = fig.axes
    curves = _tagged(ax, figures.MCCANDLISH_GID)
    assert len(curves) == 3  # one per column with a measured frontier
    xs, ys = curves[0].get_xdata(), curves[0].get_ydata()
    assert (xs[0], xs[-1]) == (pytest.approx(64), pytest.approx(1024))
    assert ys[-1] / ys[0] == pytest.approx((1 + 256 / 64) / (1 + 256 / 1024))  # linear below B_noise, flat above
    assert "McCandlish: ε_max / (1 + B_noise/B), B_noise ≈ 256" in [t.get_text() for t in ax.get_legend().get_texts()]
    figures.close(fig)


def test_a_cell_below_the_grid_shows_its_smallest_lr_failing_with_its_seeds():
    rows = _per_lr(C, 256, {0.1: "dtd", 0.2: "d", 0.4: "d"})  # 0.1 fails in 2 of 3 seeds: below the grid
    (cell,) = frontier.frontier_table(rows).to_pylist()
    assert cell["frontier"] == "none"
    assert figures.cell_text(cell).split("\n")[:2] == ["no lr trains", "0.1 diverges 2/3"]

"""The study's figures as pure functions of its tables: a third grid axis gets its own row of panels (or heatmap),
augmentation as the map's rows reads as such."""
import pyarrow as pa

from studies.sweep import figures, frontier
from tests.test_sweep_frontier import _lrs, _row, _three_axis_rows


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

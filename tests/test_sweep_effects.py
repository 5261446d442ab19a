"""The findings decided apart from their words (issue 34, item 4): cells.parquet rows read once as CellRows, each
effect a frozen record (shown, or NOT SHOWN with a typed reason; its ratio and bound, the seeds that agree and the
cells it rests on), and the words only render the records. Hand-made rows, as test_sweep_frontier.py's."""
import dataclasses
import math

import pytest

from studies.sweep import effects, findings, frontier, lambdas, layout, scaling
from studies.sweep.support import Bound, CellRow, Support, Why
from tests.test_sweep_frontier import _map
from tests.test_sweep_scaling import KNOWN, _study


def _grid(cells):
    (g,) = layout.grids_of(cells)
    return effects.typed(g)


def test_a_cell_row_has_every_column_of_the_cells_table_and_reads_a_missing_key_as_none():
    names = {f.name for f in dataclasses.fields(CellRow)}
    assert names == (set(frontier.CELL_COLUMNS) - {"lambda"}) | {"lam"}  # the table's columns, unchanged
    row = frontier.frontier_table(_map(["ttttd"] * 3, ["tdddd"] * 3, ["ttttd"] * 3)).to_pylist()[0]
    c = CellRow.of(row)
    assert (c.cell, c.lam, c.max_stable_lr) == (row["cell"], row["lambda"], row["max_stable_lr"])
    assert c.seed_list == (0, 1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.max_stable_lr = 1.0
    bare = CellRow.of({"cell": "batch_size=64 lambda=none", "frontier": "undecided"})
    assert bare.max_stable_lr is None and bare.seed_list == () and bare.scan_counts == (0, 0, 0, 0)
    # the words take either form and say the same
    assert findings.support_text(row) == findings.support_text(c)
    assert findings.spread_text(row) == findings.spread_text(c)


def test_the_effects_are_decided_as_records_with_their_ratio_bound_support_and_cells():
    g = _grid(frontier.frontier_table(_map(["ttttd"] * 3, ["tdddd"] * 3, ["ttttd"] * 3)))
    fall, agc = effects.effects_of(g)  # no accuracy (no full runs): no accuracy records; one λ: no λ claim
    assert isinstance(fall, effects.FrontierFall) and fall.shown and fall.why is None
    assert (fall.first, fall.last, fall.ratio.value, fall.ratio.bound) == (64, 1024, 8.0, Bound.EXACT)
    assert fall.support == Support(3, 3, ()) and (fall.low.max_stable_lr, fall.high.max_stable_lr) == (0.8, 0.1)
    assert isinstance(agc, effects.AgcFrontier) and agc.shown and agc.column == "λ=0.01"
    assert agc.ratio.value == pytest.approx(8.0) and agc.support == Support(3, 3, ())
    assert agc.best is g.at[1024, "λ=0.01"] and agc.control is g.at[1024, "no clipping"]
    # The majority the same, the seeds' ranges overlapping: NOT SHOWN for that reason, with the seeds that broke it.
    g = _grid(frontier.frontier_table(_map(["ttttd"] * 3, ["tdddd", "tdddd", "ttttd"], ["ttttd", "tdddd", "ttttd"])))
    fall, agc = effects.effects_of(g)
    assert fall.why is Why.WITHIN_SPREAD and fall.support == Support(2, 3, (2,))
    assert agc.why is Why.WITHIN_SPREAD and agc.support.broke == (1, 2)


def test_each_reason_a_finding_is_not_shown_is_typed():
    flat = _grid(_study({(64, "none"): 0.2, (1024, "none"): 0.2, (64, "0.01"): 0.4, (1024, "0.01"): 0.2}))
    fall, agc = effects.effects_of(flat)
    assert fall.why is Why.NO_EFFECT and fall.ratio is None  # does not fall
    assert agc.why is Why.NO_EFFECT and agc.ratio.value == pytest.approx(1.0)  # AGC not ≥ 2×
    no_agc = _grid(_study({(64, "none"): 0.4, (1024, "none"): 0.1, (64, "0.01"): 0.4, (1024, "0.01"): None}))
    assert effects.agc_frontier(no_agc).why is Why.NO_AGC_FRONTIER  # every AGC lr diverged at the last row
    top = _grid(_study({(64, "0.01"): "top", (64, "0.04"): 0.8, (1024, "0.01"): 0.4, (1024, "0.04"): 0.1}))
    gain = lambdas.lambda_gain(top)
    assert gain.why is Why.LOWER_BOUND and gain.bounds == ((64, "λ=0.01"),)
    assert gain.ratios[0].bound is Bound.LOWER and gain.ratios[1].value == pytest.approx(4.0)
    inf = _grid(_study({(64, "0.01"): 0.4, (64, "0.04"): 0.4, (1024, "0.01"): 0.1, (1024, "0.04"): None}))
    assert lambdas.lambda_gain(inf).shown and math.isinf(lambdas.lambda_gain(inf).ratios[1].value)


def _acc(accs: tuple[float, ...]) -> CellRow:
    """A cell whose full runs (seeds 0, 1, 2) reached these top-1s."""
    return CellRow(frontier="found", max_stable_lr=0.4, best_val_acc=sum(accs) / len(accs), best_val_acc_sd=0.01,
                   best_val_acc_min=min(accs), best_val_acc_max=max(accs), acc_seed_list=(0, 1, 2),
                   best_val_acc_by_seed=accs)


def _acc_map(agc_at_last: tuple[float, ...]) -> layout.Grid:
    at = {(64, "no clipping"): _acc((0.79, 0.80, 0.81)), (1024, "no clipping"): _acc((0.59, 0.60, 0.61)),
          (1024, "λ=0.01"): _acc(agc_at_last)}
    return layout.Grid("", [64, 1024], ["λ=0.01", "no clipping"], at, layout.Layout())


def test_the_accuracy_effects_are_records_too():
    fall, agc = effects.accuracy_effects(_acc_map((0.74, 0.75, 0.76)))
    assert fall.shown and fall.support == Support(3, 3, ()) and (fall.first, fall.last) == (64, 1024)
    assert agc.shown and agc.column == "λ=0.01" and agc.gain == pytest.approx(0.15)
    _, within = effects.accuracy_effects(_acc_map((0.55, 0.75, 0.95)))  # the mean gains, seed 0 does not
    assert within.why is Why.WITHIN_SPREAD and within.support == Support(2, 3, (0,))
    _, small = effects.accuracy_effects(_acc_map((0.60, 0.61, 0.62)))
    assert small.why is Why.NO_EFFECT and small.gain < effects.ACC_MARGIN


def test_the_scaling_call_is_a_trend_or_a_typed_reason():
    calls = {law.column: scaling.scaling_call(law) for law in scaling.laws(_study(KNOWN))}
    assert calls["no clipping"].trend is scaling.Trend.FLAT and calls["no clipping"].shown
    assert calls["λ=0.01"].trend is scaling.Trend.GROWS and calls["λ=0.01"].resolution == pytest.approx(0.25)
    assert calls["λ=0.04"].trend is scaling.Trend.GROWS and calls["λ=0.04"].resolution == pytest.approx(0.5)
    # peak lr 0.2 at batch 64, 0.4 at 1024: α = 0.25, exactly one lr step of this grid; a lower bound and one
    # measured frontier: no fit
    (step,) = map(scaling.scaling_call, scaling.laws(_study({(64, "0.01"): 0.8, (1024, "0.01"): 0.1})))
    assert step.why is Why.WITHIN_STEP and step.trend is None
    (few,) = map(scaling.scaling_call, scaling.laws(_study({(64, "0.01"): "top", (1024, "0.01"): 0.4})))
    assert few.why is Why.TOO_FEW_FRONTIERS and few.resolution is None


def test_the_words_say_not_shown_exactly_where_the_record_is_not_shown():
    maps = [_map(["ttttd"] * 3, ["tdddd"] * 3, ["ttttd"] * 3),
            _map(["ttttd"] * 3, ["tdddd", "tdddd", "ttttd"], ["ttttd", "tdddd", "ttttd"])]
    for rows in maps:
        g = _grid(frontier.frontier_table(rows))
        for e in effects.effects_of(g):
            assert findings.effect_text(e, g).startswith("NOT SHOWN") is (not e.shown), e
    for accs in ((0.74, 0.75, 0.76), (0.55, 0.75, 0.95), (0.60, 0.61, 0.62)):
        g = _acc_map(accs)
        for e in effects.accuracy_effects(g):
            assert findings.effect_text(e, g).startswith("NOT SHOWN") is (not e.shown), e
    for law in scaling.laws(_study(KNOWN)) + scaling.laws(_study({(64, "0.01"): 0.8, (1024, "0.01"): 0.1})):
        call = scaling.scaling_call(law)
        assert ("NOT SHOWN" in scaling.scaling_text(call)) is (not call.shown)

"""How the frontier scales with the batch (α of peak lr ∝ B^α) and the paper's third claim (the smaller λ gains
on the larger as the batch grows), as pure functions of hand-made rows (issue 32)."""
import math

import pytest

from studies.sweep import findings, frontier, lambdas, layout, scaling
from tests.test_sweep_frontier import _lrs

LRS = (0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


def _front(lr: float | None) -> str:
    """A scan pattern over LRS whose frontier is `lr` (None: every lr diverges; 'top': every lr trains)."""
    if lr == "top":
        return "t" * len(LRS)
    n = 0 if lr is None else LRS.index(lr) + 1
    return "t" * n + "d" * (len(LRS) - n)


def _study(fronts: dict[tuple[int, str], float | str | None], seeds: int = 1, per_seed=None):
    """Rows of a map batch × λ with the given frontiers (base lr); per_seed[(b, lam)] = a frontier per seed."""
    rows = []
    for (b, lam), lr in fronts.items():
        cell = f"batch_size={b} lambda={lam}"
        for s in range(seeds):
            own = (per_seed or {}).get((b, lam), [lr] * seeds)[s]
            rows += _lrs(cell, b, lam, _front(own), lrs=LRS, seed=s, phase="scan" if s == 0 else "replicate")
    return frontier.frontier_table(rows)


KNOWN = {(64, "none"): 0.4, (256, "none"): 0.1, (1024, "none"): 0.025,  # peak 0.1 at every batch: α = 0
         (64, "0.01"): 0.4, (256, "0.01"): 0.2, (1024, "0.01"): 0.1,  # peak 0.1, 0.2, 0.4: α = 0.5
         (64, "0.04"): "top", (256, "0.04"): 0.4, (1024, "0.04"): 0.4}  # ≥0.4 (left out), then 0.4, 1.6: α = 1


def test_alpha_is_the_slope_of_the_frontiers_peak_lr_and_bounds_are_left_out():
    cells = _study(KNOWN)
    laws = {law.column: law for law in scaling.laws(cells)}
    assert set(laws) == {"λ=0.01", "λ=0.04", "no clipping"}
    assert laws["no clipping"].alpha == pytest.approx(0.0, abs=1e-12)
    assert laws["λ=0.01"].alpha == pytest.approx(0.5)
    lam4 = laws["λ=0.04"]
    assert lam4.alpha == pytest.approx(1.0) and [p.batch for p in lam4.used] == [256, 1024]
    assert [p.text for p in lam4.points] == ["≥0.4", "0.4", "1.6"]  # peak lrs: 1.6 × 64/256 is a lower bound
    # The frontier AT the smallest lr tried (batch 1024, no clipping: 0.025) is bracketed and stays in the fit.
    assert [p.mark for p in laws["no clipping"].points] == ["", "", ""]
    assert laws["no clipping"].alpha_range is None and laws["no clipping"].seed_alphas == {0: pytest.approx(0.0)}
    text = findings.frontier_summary(cells)
    assert ("without clipping the frontier's peak lr does not grow with the batch (α = 0.00 (one seed); a factor-2 "
            "lr step at one end moves α by about 0.25; fitted to batch 64, 256, 1024).") in text
    assert "with AGC λ=0.01 the frontier's peak lr grows with the batch (α = 0.50 (one seed);" in text
    assert ("with AGC λ=0.04 the frontier's peak lr grows with the batch (α = 1.00 (one seed); a factor-2 lr step "
            "at one end moves α by about 0.50; fitted to batch 256, 1024; left out of the fit: batch 64 ≥0.4).") \
        in text
    md = findings.frontier_markdown(cells)
    assert "| column | B=64 | B=256 | B=1024 | α | α over seeds |" in md
    assert "| λ=0.04 | ≥0.4 | 0.4 | 1.6 | 1.00 | - |" in md and "| no clipping | 0.1 | 0.1 | 0.1 | 0.00 | - |" in md


def test_alpha_fits_a_power_law_exactly_and_needs_two_batch_sizes():
    pts = [scaling.Point(b, 0.3 * b ** 0.8) for b in (32, 128, 512, 4096)]
    a, lnc = scaling.fit_alpha(pts)
    assert a == pytest.approx(0.8) and math.exp(lnc) == pytest.approx(0.3)
    assert scaling.fit_alpha(pts[:1] + [scaling.Point(128, 1.0, scaling.LOWER)]) is None
    assert scaling.fit_alpha([scaling.Point(64, 0.1), scaling.Point(64, 0.2)]) is None


def test_alpha_has_a_range_over_the_seeds_own_frontiers_and_a_cell_where_nothing_trains_is_an_upper_bound():
    fronts = {(64, "0.01"): 0.4, (256, "0.01"): 0.2, (1024, "0.01"): 0.2, (1024, "none"): None, (64, "none"): 0.4}
    # Peak lrs 0.1, 0.2, 0.8: α = 0.75. Seed 1's batch-1024 frontier is one step higher (α 1.0), seed 2's one
    # lower (α 0.5).
    cells = _study(fronts, seeds=3, per_seed={(1024, "0.01"): [0.2, 0.4, 0.1]})
    laws = {law.column: law for law in scaling.laws(cells)}
    lam = laws["λ=0.01"]
    assert lam.alpha == pytest.approx(0.75)
    assert lam.seed_alphas == {0: pytest.approx(0.75), 1: pytest.approx(1.0), 2: pytest.approx(0.5)}
    assert lam.alpha_range == (pytest.approx(0.5), pytest.approx(1.0))
    nc = laws["no clipping"]
    assert [p.text for p in nc.points] == ["0.1", "<0.1"] and nc.alpha is None  # 0.025 × 1024/256
    text = findings.frontier_summary(cells)
    assert "with AGC λ=0.01 the frontier's peak lr grows with the batch (α = 0.75 (seeds 0.50 to 1.00, 3 seeds)" in text
    assert ("NOT SHOWN: without clipping the frontier's scaling with the batch cannot be fitted (fewer than two "
            "measured frontiers: batch 64 0.1, batch 1024 <0.1).") in text


def test_seeds_that_disagree_on_the_direction_are_not_called():
    fronts = {(64, "0.01"): 0.4, (1024, "0.01"): 0.1}
    cells = _study(fronts, seeds=3, per_seed={(1024, "0.01"): [0.1, 0.4, 0.025]})  # α 0.5, 1.0, 0.0
    (line,) = scaling.scaling_lines(cells)
    assert line.startswith("NOT SHOWN: with AGC λ=0.01 the frontier's peak lr moves with the batch differently")


def _claim(fronts, **kw):
    cells = _study(fronts, **kw)
    (g,) = layout.grids_of(cells)
    return lambdas.lambda_effect(g)


def test_the_smaller_lambda_gaining_on_the_larger_as_the_batch_grows_is_the_papers_third_claim():
    (shown,) = _claim({(64, "0.01"): 0.4, (64, "0.04"): 0.8, (1024, "0.01"): 0.4, (1024, "0.04"): 0.1})
    assert shown == ("λ=0.01's frontier gains on λ=0.04's as the batch grows: 0.4 vs 0.8 at batch 64 (0.5×); 0.4 vs "
                     "0.1 at batch 1024 (4×); one seed, no spread to weigh it against.")
    (flat,) = _claim({(64, "0.01"): 0.4, (64, "0.04"): 0.4, (1024, "0.01"): 0.2, (1024, "0.04"): 0.2})
    assert flat.startswith("NOT SHOWN: λ=0.01's frontier gains on λ=0.04's as the batch grows: their ratio does not "
                           "grow (0.4 vs 0.4 at batch 64 (1×); 0.2 vs 0.2 at batch 1024 (1×)).")
    # The laptop map: λ=0.01 trains up to the largest lr tried at batch 64, so its lead there is a lower
    # bound and a growth of the ratio cannot be read.
    (bound,) = _claim({(64, "0.01"): "top", (64, "0.04"): 0.8, (1024, "0.01"): 0.4, (1024, "0.04"): 0.1})
    assert bound.startswith("NOT SHOWN:") and "λ=0.01 at batch 64 trains up to the largest lr tried" in bound
    assert "≥1.6 vs 0.8 at batch 64 (≥2×)" in bound  # the ratio there is a lower bound too
    (none,) = _claim({(64, "0.01"): 0.4, (64, "0.04"): 0.4, (1024, "0.01"): 0.1, (1024, "0.04"): None})
    assert "(where λ=0.04 trains at no lr)" in none and not none.startswith("NOT SHOWN")
    assert _claim({(64, "0.01"): 0.4, (1024, "0.01"): 0.1}) == []  # one λ: nothing to compare


def test_the_third_claim_is_called_only_outside_the_seeds_spread():
    fronts = {(64, "0.01"): 0.4, (64, "0.04"): 0.8, (1024, "0.01"): 0.4, (1024, "0.04"): 0.1}
    (apart,) = _claim(fronts, seeds=3)
    assert apart.endswith("(4×); holds in 3 of 3 seeds.")
    # Seed 2 has λ=0.01 up to 1.6 at batch 64 (2× λ=0.04) and λ=0.04 up to 0.4 at batch 1024 (1×): the largest
    # ratio the seeds allow at 64 lies above the smallest they allow at 1024.
    (within,) = _claim(fronts, seeds=3, per_seed={(1024, "0.04"): [0.1, 0.1, 0.4], (64, "0.01"): [0.4, 0.4, 1.6]})
    assert within.startswith("NOT SHOWN:") and "within the seeds' spread; holds in 2 of 3 seeds (seed 2 broke it)." \
        in within


def test_mccandlishs_curve_takes_the_measured_noise_scale_and_fits_its_maximum():
    assert scaling.noise_scale([{"gns": 300.0}, {"gns": None}, {"gns": float("nan")}, {"gns": 100.0},
                                {"gns": 200.0}]) == 200.0
    assert scaling.noise_scale([{"gns": None}]) is None and scaling.noise_scale(None) is None
    # Frontiers that follow ε_max / (1 + B_noise/B) exactly give back ε_max; a bound is left out.
    pts = [scaling.Point(b, 0.8 / (1 + 256 / b)) for b in (64, 256, 1024)] + [scaling.Point(4096, 9.0, scaling.LOWER)]
    assert scaling.mccandlish_eps_max(pts, 256) == pytest.approx(0.8)
    assert scaling.mccandlish_eps_max(pts[3:], 256) is None

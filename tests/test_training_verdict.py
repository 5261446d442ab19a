"""The verdict of one run (trained / stalled / diverged) as pure functions, and as the loop's monitor feeds it."""
import math

import pytest
import torch

from studies.sweep import tables
from studies.training import monitors
from studies.training.summary import RunSummary
from studies.training.verdict import (
    COLLAPSED,
    DIVERGED,
    STALLED,
    TRAINED,
    curve_range,
    judge,
    margin,
    tail_stats,
)

CHANCE = math.log(10)


def test_a_run_at_chance_loss_stalls_and_a_clear_drop_trains():
    assert judge("completed", CHANCE, 2.302) == STALLED  # heavy clipping: finite, never learned
    assert judge("completed", CHANCE, 2.18) == TRAINED  # 0.12 below the start: past the 5 % margin (0.115)
    assert judge("completed", CHANCE, 2.20) == STALLED  # 0.10: not yet
    assert judge("diverged", CHANCE, None) == DIVERGED
    assert judge("failed", CHANCE, 1.0) is None and judge("stopped", CHANCE, 1.0) is None  # decide nothing
    assert judge("completed", None, 1.0) is None and judge("completed", CHANCE, float("nan")) is None


def test_noisy_losses_around_the_margin_need_the_noise_to_be_small():
    assert margin(CHANCE, None) == pytest.approx(0.05 * CHANCE)
    # The same mean, 0.15 below the start: trained with a steady tail, stalled when its standard error is 0.08
    # (3 standard errors = 0.24 > 0.15: chance could have produced it).
    assert judge("completed", CHANCE, CHANCE - 0.15, 0.01) == TRAINED
    assert judge("completed", CHANCE, CHANCE - 0.15, 0.08) == STALLED
    mean, se = tail_stats([2.3] * 90 + [2.0, 2.4, 2.0, 2.4, 2.0, 2.4, 2.0, 2.4, 2.0, 2.4])
    assert mean == pytest.approx(2.2) and se == pytest.approx(0.2 / math.sqrt(10) * math.sqrt(10 / 9))
    assert tail_stats([2.0]) == (2.0, None) and tail_stats([]) == (None, None)


def _monitor(losses, factor=5.0):
    m = monitors.DivergenceMonitor(factor, world_size=1)
    for i, lv in enumerate(losses):
        m.add(torch.tensor(lv))
        if (i + 1) % 4 == 0 and m.check(i + 1):
            break
    m.check(len(losses))
    return m


def test_a_loss_that_spikes_and_recovers_is_judged_by_where_it_ends():
    spike = [2.30, 2.31, 6.5, 9.0, 4.0, 2.6] + [1.6] * 40  # up to 3.9x its start, then learns
    m = _monitor(spike)
    final, se = m.final_train_loss()
    s = RunSummary(status="completed", initial_train_loss=m.initial, final_train_loss=final,
                          final_train_loss_se=se)
    assert not m.diverged and s.verdict == TRAINED
    blown = _monitor([2.30, 2.31, 12.0] + [1.6] * 40)  # past 5x its start: diverged, whatever came after
    assert blown.diverged and blown.step == 2
    assert RunSummary(status="diverged", initial_train_loss=2.3).verdict == DIVERGED


def test_the_summary_carries_the_verdict_through_a_round_trip():
    s = RunSummary(status="completed", initial_train_loss=2.3, final_train_loss=2.29, final_train_loss_se=0.0)
    assert s.verdict == STALLED
    back = RunSummary.from_scalars(s.scalars())
    assert back.verdict == STALLED and back.initial_train_loss == 2.3
    assert {"verdict", "initial_train_loss", "final_train_loss_se"} <= set(tables.results_schema().names)


# ---- why a run failed: stalled (never left its start) vs collapsed (left it, stayed finite) ----

def _judged(curve, noise=None):
    """The verdict of a completed run whose step losses are `curve` (its first step's loss is its start)."""
    final, se = tail_stats(curve)
    low, high = curve_range(curve)
    return judge("completed", curve[0], final, se if noise is None else noise, low, high)


def test_a_run_too_slow_for_its_budget_stalls():
    slow = [CHANCE - 0.0002 * i for i in range(100)]  # 2.303 -> 2.283: moving, but nowhere near the margin
    assert _judged(slow) == STALLED
    assert _judged([CHANCE] * 100) == STALLED  # held at chance by heavy clipping


def test_a_spike_that_comes_back_to_its_start_collapsed_and_one_that_goes_on_to_learn_trained():
    spike = [CHANCE] * 20 + [4.0, 6.0, 8.0, 6.0, 4.0, 3.0, 2.6, 2.4] * 2 + [CHANCE] * 64  # finite, < 5x
    assert _judged(spike) == COLLAPSED
    assert _judged(spike[:-64] + [1.6] * 64) == TRAINED  # judged by where it ends


def test_a_run_that_learned_and_climbed_back_to_chance_collapsed():
    climb = [CHANCE - 0.01 * i for i in range(50)] + [CHANCE - 0.5 + 0.01 * i for i in range(50)] + [CHANCE] * 20
    low, high = curve_range(climb)
    assert low == pytest.approx(CHANCE - 0.47) and high == pytest.approx(CHANCE)  # the bottom's 12 steps
    assert _judged(climb) == COLLAPSED


def test_noise_at_the_margin_neither_trains_nor_collapses():
    # The loss wanders ±0.1 step to step around chance: windows of 12 steps move by far less than the margin.
    noisy = [CHANCE] + [CHANCE + (0.1 if i % 2 else -0.1) for i in range(120)]
    assert _judged(noisy) == STALLED
    # A run that got just short of the margin and held there: one tenth of it dipped past the margin (0.12 > 0.115),
    # but it did not climb back from that low by the margin: stalled, not collapsed.
    edge = [CHANCE] + [CHANCE - 0.11] * 50 + [CHANCE - 0.12] * 10 + [CHANCE - 0.11] * 40
    assert curve_range(edge)[0] == pytest.approx(CHANCE - 0.12) and _judged(edge) == STALLED
    # The margin grows with the run's own noise: a 0.2 rise counts at a steady tail, not when 3 se is 0.3.
    bump = [CHANCE] * 40 + [CHANCE + 0.2] * 20 + [CHANCE] * 40
    assert _judged(bump) == COLLAPSED and _judged(bump, noise=0.1) == STALLED


def test_a_row_without_the_curve_judges_a_failure_stalled_and_the_summary_carries_the_range():
    assert judge("completed", CHANCE, 2.30, 0.001) == STALLED  # rows written before the curve's range existed
    s = RunSummary(status="completed", initial_train_loss=2.3, final_train_loss=2.3, final_train_loss_se=0.001,
                   lowest_train_loss=1.9, highest_train_loss=2.3)
    assert s.verdict == COLLAPSED and RunSummary.from_scalars(s.scalars()).verdict == COLLAPSED
    assert {"lowest_train_loss", "highest_train_loss"} <= set(tables.results_schema().names)
    m = _monitor([2.30, 2.31, 6.5, 9.0, 4.0, 2.6] + [2.30] * 40)
    low, high = m.loss_range()
    assert high > 2.30 + 0.115 and low == pytest.approx(2.30)

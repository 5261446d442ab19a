"""The verdict of one run (trained / stalled / diverged) as pure functions, and as the loop's monitor feeds it."""
import math

import pytest
import torch

from studies.sweep import tables
from studies.training import monitors
from studies.training.summary import RunSummary
from studies.training.verdict import DIVERGED, STALLED, TRAINED, judge, margin, tail_stats

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

"""The lr schedule and run length in steps."""
import math

import pytest

from studies.training import schedule
from tests.helpers import tiny_cfg


def test_lr_scaling_and_schedule():
    cfg = tiny_cfg(base_lr=0.1, batch_size=1024)
    assert cfg.lr == pytest.approx(0.4)  # linear scaling rule: 0.1 * 1024 / 256
    total, warm, peak = 100, 10, 1.0
    assert schedule.lr_at(0, total, warm, peak) == pytest.approx(0.1)
    assert schedule.lr_at(9, total, warm, peak) == pytest.approx(1.0)
    assert schedule.lr_at(55, total, warm, peak) == pytest.approx(0.5, abs=1e-6)  # cosine midpoint
    assert schedule.lr_at(99, total, warm, peak) < 0.01


def test_run_length_warmup_and_schedule_in_steps():
    cfg = tiny_cfg(max_steps=40, warmup_steps=5, schedule_steps=400)
    assert schedule.run_length(cfg, steps_per_epoch=8) == (40, 400, 5)  # the first 40 steps of a 400-step schedule
    assert schedule.run_length(tiny_cfg(max_steps=None, epochs=2, warmup_epochs=0.5), 8) == (16, 16, 4)
    assert schedule.lr_at(39, 400, 5, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 34 / 395)))
    # A scan's constant schedule: the warmup, then the peak lr it is labelled with, held to its last step.
    assert [schedule.lr_at(s, 40, 4, 1.0, "constant") for s in (0, 3, 4, 39)] == [0.25, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        tiny_cfg(lr_schedule="linear")

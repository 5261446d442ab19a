"""Two maps of one design compared (pure functions over cells tables): √2 steps per cell, same findings."""
import math

import pyarrow.parquet as pq
import pytest

from studies import compare_maps
from studies.sweep import compare, frontier

START = 2.30


def _rows(frontiers: dict[tuple[int, str], str], seed: int = 0) -> list[dict]:
    """A map's scan rows: per (batch, λ) a verdict pattern over lrs 0.1 … 1.6 ('tttdd': frontier 0.4)."""
    rows = []
    for (b, lam), pattern in frontiers.items():
        for lr, v in zip((0.1, 0.2, 0.4, 0.8, 1.6), pattern):
            rows.append({"cell": f"batch_size={b} lambda={lam}", "batch_size": b, "model": "m",
                         "clipping": "none" if lam == "none" else "agc",
                         "lambda": None if lam == "none" else float(lam), "base_lr": lr, "seed": seed,
                         "phase": "scan", "status": "diverged" if v == "d" else "completed",
                         "initial_train_loss": START, "final_train_loss": {"t": 1.8, "s": 2.29}.get(v),
                         "final_train_loss_se": 0.01})
    return rows


A = {(64, "none"): "tttdd", (1024, "none"): "tdddd", (64, "0.01"): "ttttt", (1024, "0.01"): "tttdd"}


def test_cells_within_one_sqrt2_step_agree_and_further_apart_do_not():
    a = frontier.frontier_table(_rows(A))
    b = frontier.frontier_table(_rows({**A, (64, "none"): "ttttd", (1024, "none"): "sdddd"}, seed=10))
    pairs = {p.cell: p for p in compare.pair_cells(a, b)}
    far = pairs["batch_size=64 lambda=none"]
    assert far.steps == pytest.approx(2.0) and not far.agree
    assert pairs["batch_size=1024 lambda=none"].steps is None  # 0.1 vs undecided: no number to compare
    assert pairs["batch_size=64 lambda=0.01"].agree  # ≥1.6 in both
    text = compare.comparison_text(a, b, ("seed0", "seed10"))
    assert "2 of 4 cells within one √2 step" in text and "← apart" in text
    assert "findings differ" in text  # the control's fall is shown in one, NOT SHOWN (undecided) in the other


def test_a_lower_bound_agrees_with_anything_above_it_and_the_same_map_agrees_everywhere():
    a = frontier.frontier_table(_rows(A))
    low = frontier.frontier_table(_rows({**A, (64, "none"): "ttt"}))  # ≥0.4: only up to 0.4 was tried
    high = frontier.frontier_table(_rows({**A, (64, "none"): "tttttd"[:5]}))  # 1.6 (≥1.6): above the bound
    assert all(p.agree for p in compare.pair_cells(low, high)) and all(p.agree for p in compare.pair_cells(high, low))
    text = compare.comparison_text(a, a)
    assert "4 of 4 cells within one √2 step; findings the same" in text


def test_none_below_the_grid_agrees_with_a_frontier_up_to_one_step_above_its_smallest_lr():
    """'none' says the frontier lies below the smallest lr tried (0.1 here): a seed that trained at 0.1 is one
    step from it at most; one that trained up to 0.4 contradicts it."""
    below = frontier.frontier_table(_rows({(1024, "none"): "ddddd"}))
    at_floor = frontier.frontier_table(_rows({(1024, "none"): "tdddd"}, seed=10))
    higher = frontier.frontier_table(_rows({(1024, "none"): "tttdd"}, seed=10))
    (p,) = compare.pair_cells(below, at_floor)
    assert (p.a, p.b, p.steps, p.agree) == ("none", "0.1", 0.0, True)
    (p,) = compare.pair_cells(higher, below)
    assert p.steps == pytest.approx(4.0) and not p.agree


def test_the_script_reads_two_outputs_and_refuses_a_folder_without_a_map(tmp_path, capsys):
    for name in ("seed0", "seed10"):
        (tmp_path / name / "s").mkdir(parents=True)
        pq.write_table(frontier.frontier_table(_rows(A)), tmp_path / name / "s" / "cells.parquet")
    out = compare_maps.main([str(tmp_path / "seed0" / "s"), str(tmp_path / "seed10" / "s")])
    assert "seed0" in out and "seed10" in out and "4 of 4 cells" in out
    try:
        compare_maps.main([str(tmp_path / "seed0"), str(tmp_path / "seed10" / "s")])
    except SystemExit as e:
        assert e.code == 2
    assert "holds no cells.parquet" in capsys.readouterr().err


def test_a_small_scan_gives_the_same_map_on_two_kernel_paths(tmp_path):
    """Issue 30, item 4, small: the same seed's scan of one cell with channels_last off and on (other conv kernels,
    other rounding) and with bf16 autocast: the frontiers lie within one √2 step."""
    import torch

    import storage
    from studies.sweep import tables
    from studies.training import loop
    from studies.training.config import TrainConfig

    uri = storage.prepare_dataset("synthetic", str(tmp_path), seed=0, n_train=2048, n_val=64, image_size=16).uri
    base = TrainConfig(model="nf_resnet_cifar", model_overrides={"width": 8, "depth": 1}, dataset="synthetic",
                       batch_size=64, clipping="agc", clip_threshold=0.04, warmup_steps=0, lr_schedule="constant",
                       max_steps=128, eval_every_epochs=0, checkpoint_every_epochs=0, log_every_steps=4,
                       gns_every_steps=0)
    maps, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # a study's trial has one thread
    for path in ({}, {"channels_last": True}, {"precision": "bf16", "channels_last": True}):
        rows = []
        for lr in (0.4, 1.6, 6.4):
            cfg = base.replace(base_lr=lr, **path)
            summary = loop.train(cfg, uri, loop.WorkerContext(print=lambda *_: None))
            rows.append(tables.results_row({"study": "t", "trial_key": str(lr), "phase": "scan",
                                            "cell": "batch_size=64 lambda=0.04"}, cfg, summary, "cpu", "x"))
        maps.append(frontier.frontier_table(rows))
    torch.set_num_threads(threads)
    # the scan decides: 0.4 and 1.6 train, 6.4 fails (measured: 2.30 → 2.09, 1.87, 2.34 on the first path)
    assert maps[0].column("max_stable_lr").to_pylist() == [1.6]
    for other in maps[1:]:
        (pair,) = compare.pair_cells(maps[0], other)
        assert pair.agree, pair


def test_one_refined_step_stored_to_four_digits_is_within_one_step():
    # 0.5657 (0.4·√2 as the refined grid stores it) vs 0.4 is one step, not "apart" by its rounding (seen comparing
    # the seed-0 and seed-10 laptop maps)
    assert compare.CellPair("c", "0.5657", "0.4", abs(math.log(0.5657 / 0.4)) / compare.STEP).agree
    assert not compare.CellPair("c", "0.8", "0.4", 2.0).agree

"""Shared timing helpers for the benchmarks (run as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # import nfnet without installing

import torch  # noqa: E402


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per implementation (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    return p


def setup(args) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed(fn: Callable[[], None], device: torch.device, inner: int = 1) -> float:
    """Seconds for `inner` back-to-back calls of fn: CUDA events on a GPU (the host may run ahead inside the
    window, as in training), perf_counter on CPU."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return time.perf_counter() - t0


def time_many(fns: dict[str, Callable[[], None]], reps: int, device: torch.device,
              before: Callable[[], None] = lambda: None, warmup: int = 1, inner: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn, one list per fn, interleaved rep by rep so all see the same machine load.
    `before` runs untimed ahead of every timed window (e.g. to restore inputs)."""
    for _ in range(warmup):
        for fn in fns.values():
            before()
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            before()
            times[k].append(elapsed(fn, device, inner) / inner)
    return times


def time_pair(ours: Callable[[], None], peer: Callable[[], None], reps: int, device: torch.device,
              before: Callable[[], None] = lambda: None, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of `ours` and `peer`, interleaved so both see the same machine load."""
    t = time_many({"ours": ours, "peer": peer}, reps, device, before, warmup)
    return statistics.median(t["ours"]), statistics.median(t["peer"])


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def agc_vs_timm(named, params, clip_threshold: float, rtol: float):
    """Our AGC and timm's on the same gradients: (our AGCStats, restore() putting the unclipped gradients back, the
    number of tensors on which the two disagree). Timing two functions that compute different things means
    nothing, so every AGC benchmark checks this first."""
    from timm.utils import adaptive_clip_grad

    from nfnet import adaptive_grad_clip_

    saved = [p.grad.clone() for p in params]

    def restore():
        for p, g in zip(params, saved):
            p.grad.copy_(g)

    stats = adaptive_grad_clip_(named, clip_threshold)
    ours = [p.grad.clone() for p in params]
    restore()
    adaptive_clip_grad(params, clip_threshold)
    bad = sum(not torch.allclose(a, p.grad, rtol=rtol, atol=1e-8) for a, p in zip(ours, params))
    return stats, restore, bad

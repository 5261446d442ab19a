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


def time_pair(ours: Callable[[], None], peer: Callable[[], None], reps: int, device: torch.device,
              before: Callable[[], None] = lambda: None, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of `ours` and `peer`, interleaved so both see the same machine load.
    `before` runs untimed ahead of every call (e.g. to restore inputs)."""
    for _ in range(warmup):
        for fn in (ours, peer):
            before()
            fn()
    sync(device)
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(reps):
        for i, fn in enumerate((ours, peer)):
            before()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[i].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"

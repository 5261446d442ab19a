"""Training speed of the laptop study per core: images/s of its training runs as the preset runs them now
(bf16 autocast + channels_last, studies/agc_lambda.py) against today's path before issue 30 (fp32, NCHW), on one
thread each (a study's trial has one CPU), interleaved repetition by repetition so both see the same machine.

What is timed is the loop itself (studies/training/loop.train: data, augmentation, forward, backward, AGC, SGD,
the divergence monitor) on the preset's own data, model and λ, for a fixed number of steps per batch size. The
study's speed is the image-weighted harmonic mean over its batch sizes: each batch size weighs what the laptop
study trains at it (scans: the lr grid + one refinement + about 5 replicate runs per cell, each scan_length ×
batch images; full runs: about 2 lrs × replicates per cell, each epochs × n_train images).

  python benchmarks/study_speed.py [--reps 3] [--steps-images 16384]
"""
import statistics
import sys
import tempfile
import time

from _common import parser

import storage
from studies import agc_lambda
from studies.sweep.design import scan_length
from studies.training import loop
from studies.training.config import TrainConfig

TODAY = {"precision": "fp32", "channels_last": False}  # the path before issue 30


def main() -> None:
    p = parser(__doc__)
    p.set_defaults(reps=3)
    p.add_argument("--steps-images", type=int, default=16384, help="images per timed run (steps = this / batch)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    preset = agc_lambda.PRESETS["laptop"]
    fixed = TrainConfig(**preset.fixed)
    now = {"precision": fixed.precision, "channels_last": fixed.channels_last}
    params = dict(fixed.dataset_params)
    n_train, lrs = params["n_train"], len(preset.lrs)
    with tempfile.TemporaryDirectory() as tmp:
        uri = storage.prepare_dataset(fixed.dataset, tmp, seed=0, **params).uri
        weights, speed = {}, {"now": {}, "today": {}}
        for b in preset.grid["batch_size"]:
            scans = (lrs + 1 + 5) * scan_length(preset, b) * b
            weights[b] = scans + 2 * preset.replicates * fixed.epochs * n_train
            steps = max(8, args.steps_images // b)
            times = {"now": [], "today": []}
            for _ in range(args.reps + 1):  # the first repetition warms up (allocator, kernels): not counted
                for name, path in (("today", TODAY), ("now", now)):
                    cfg = fixed.replace(batch_size=b, base_lr=0.1, clipping="agc", clip_threshold=0.01,
                                        max_steps=steps, eval_every_epochs=0, log_every_steps=steps, **path)
                    t = time.perf_counter()
                    out = loop.train(cfg, uri, loop.WorkerContext(print=lambda *_: None))
                    times[name].append(out.steps * b / (time.perf_counter() - t))
            for name in times:
                speed[name][b] = statistics.median(times[name][1:])
            print(f"batch {b:5d}: today {speed['today'][b]:7.0f} img/s, now {speed['now'][b]:7.0f} img/s "
                  f"(×{speed['now'][b] / speed['today'][b]:.2f}); study weight {weights[b] / 1e6:.2f} M images",
                  flush=True)
    total = sum(weights.values())
    per = {k: total / sum(w / speed[k][b] for b, w in weights.items()) for k in speed}
    print(f"laptop study training images/s per core: today (fp32, NCHW) {per['today']:.0f}, now "
          f"({now['precision']}, channels_last={now['channels_last']}) {per['now']:.0f}")
    print(f"RESULT study_speed ratio={per['now'] / per['today']:.2f} target>=2")


if __name__ == "__main__":
    sys.exit(main())

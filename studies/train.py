"""One training run on the local Ray (or RAY_ADDRESS), tracked in MLflow.

  python studies/train.py --model nf_resnet_cifar --batch-size 1024 --clipping agc --lambda 0.02

Prints rank 0's epoch lines and the outcome; NFNET_LAB_RAY_LOGS=1 also shows Ray's own output (its workers',
controller's and INFO logs) for debugging.
"""
from __future__ import annotations

import argparse
import sys
import time

from studies.sweep.report import mlflow_line
from studies.training import flags, runner
from studies.training.config import ConfigError, TrainConfig
from studies.training.mlflow_ui import ui_link
from studies.training.tracking import check_tracking_uri, redact, resolve_tracking_uri


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db)")
    p.add_argument("--experiment", default="train", help="MLflow experiment name")
    p.add_argument("--run-name", default=None, help="MLflow run name (default: from model/batch/clipping)")
    p.add_argument("--storage-path", default=None,
                   help="Ray Train storage for checkpoints (local path, s3://, gs://; default <project>/results)")
    p.add_argument("--in-process", action="store_true",
                   help="run a one-CPU-worker training in this process instead of a Ray worker group")
    flags.add_train_args(p)
    args = p.parse_args(argv)
    try:
        cfg = TrainConfig(**flags.overrides_from_args(args))
    except ConfigError as e:
        p.error(flags.flag_message(e))
    except ValueError as e:
        p.error(str(e))
    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_uri(uri)
    # The time in the name: Ray Train would otherwise hand this run an earlier same-named run's checkpoint.
    name = (args.run_name or f"{cfg.model}-b{cfg.batch_size}-lambda{cfg.lambda_label}") + \
        f"-{time.strftime('%Y%m%d-%H%M%S')}"
    if not args.in_process:
        runner.init_ray()
    print(f"training {cfg.model} batch {cfg.batch_size} (lr {cfg.lr:g}) clipping {cfg.clipping} "
          f"on {cfg.num_workers} worker(s); MLflow: {redact(uri)}", flush=True)
    summary = runner.train_and_track(cfg, runner.RunRecord(uri, args.experiment, name),
                                     runner.Launch(storage_path=args.storage_path, in_process=args.in_process))
    print(f"status: {summary.status}" + (f" at step {summary.diverged_step} ({summary.diverged_reason})"
                                         if summary.status == "diverged" else ""))
    if summary.error:
        print(f"error: {summary.error}", file=sys.stderr)
    if summary.best_val_acc is not None:
        print(f"best val acc {summary.best_val_acc:.4f}, {summary.images_per_sec or 0:.0f} img/s, "
              f"gradient noise scale {summary.gns}")
    import mlflow

    eid = mlflow.MlflowClient(uri).get_run(summary.mlflow_run_id).info.experiment_id
    print(f"MLflow run {summary.mlflow_run_id} ({name})\n" + mlflow_line(args.experiment, uri, ui_link(uri, eid)))
    return 0 if summary.status in ("completed", "diverged") else 1


if __name__ == "__main__":
    sys.exit(main())

"""Per-trial overhead of a study: wall time of the laptop preset ÷ the time its trials spent training (each
training run's own wall time: data load, model build, steps, evaluation, checkpoints).

The plain ratio (wall ÷ Σ training time) flatters a study that runs trials in parallel, so the RESULT line
uses the stricter form: wall ÷ (Σ training time / concurrent trials), i.e. against a perfectly packed schedule
with zero start-up cost. One-CPU-worker trials run the training loop in-process inside the Tune trial; the
peer figure printed for context is the start-up cost of one TorchTrainer worker group on this machine.

  python benchmarks/study_overhead.py [--preset laptop] [extra agc_lambda flags]
"""
import sys
import tempfile
import time

sys.argv[0] = "study_overhead"


def torch_trainer_startup() -> float:
    # What each trial would pay if it started a Ray Train worker group: a 1-step run's wall time minus its training.
    import storage
    from studies.training import runner
    from studies.training.config import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        uri = storage.prepare_dataset("synthetic", tmp, seed=0, n_train=256, n_val=64).uri
        cfg = TrainConfig(model_overrides={"width": 8, "depth": 1}, batch_size=64, max_steps=1,
                          checkpoint_every_epochs=0)
        t = time.perf_counter()
        out = runner.run_torch_trainer(cfg, uri, name="startup", storage_path=tmp)
        return time.perf_counter() - t - out.train_time_s


def main(argv):
    from studies import agc_lambda

    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--output", tmp, "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--name", "overhead"]
        if "--preset" not in argv and "--smoke-test" not in argv:
            flags += ["--preset", "laptop"]
        t0 = time.perf_counter()
        out = agc_lambda.main(flags + argv)
        wall = time.perf_counter() - t0
        rows = out["results"].to_pylist()
        train = sum(r.get("wall_time_s") or 0.0 for r in rows)  # each training run's own wall time
        conc = out["concurrency"]
    startup = torch_trainer_startup()
    ideal = train / conc
    print(f"study wall time (incl. Ray start, data, MLflow, map): {wall:.1f} s for {len(rows)} trials")
    print(f"sum of trials' training time: {train:.1f} s; concurrent trials: {conc}; packed ideal {ideal:.1f} s")
    print(f"plain ratio wall / Σ train = {wall / train:.3f}")
    print(f"peer: one TorchTrainer worker-group start-up costs {startup:.1f} s per trial here "
          f"(≈ {startup * len(rows) / conc:.0f} s over this study if every trial paid it)")
    print(f"RESULT study_overhead ratio={wall / ideal:.3f} target<=1.25")


if __name__ == "__main__":
    main(sys.argv[1:])

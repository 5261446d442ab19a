"""One training run: its config and flags, the Ray-free per-worker loop and its helpers, the runner (in-process
or a Ray Train TorchTrainer) and MLflow tracking. Never imports studies.sweep."""

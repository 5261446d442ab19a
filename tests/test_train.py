import contextlib
import math

import pytest
import torch

from studies import loop, runner
from studies.config import TrainConfig
from studies.tracking import Tracker

TINY = dict(model="nf_resnet_cifar", model_overrides={"width": 8, "depth": 1}, batch_size=64, max_steps=16,
            log_every_steps=4, gns_every_steps=4, warmup_epochs=0.2, base_lr=0.2, checkpoint_every_epochs=0)


def tiny_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


@pytest.mark.parametrize("kw, msg", [
    (dict(clip_threshold=-0.01), "clip_threshold"),
    (dict(batch_size=65, num_workers=2), "not divisible"),
    (dict(model="resnet9000"), "unknown model"),
    (dict(clipping="sometimes"), "clipping must be"),
    (dict(precision="fp8"), "precision"),
    (dict(augment_strength=1.5), "augment_strength"),
])
def test_invalid_config_fails_at_construction(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_cfg(**kw)


def test_lr_scaling_and_schedule():
    cfg = tiny_cfg(base_lr=0.1, batch_size=1024)
    assert cfg.lr == pytest.approx(0.4)  # linear scaling rule: 0.1 * 1024 / 256
    total, warm, peak = 100, 10, 1.0
    assert loop.lr_at(0, total, warm, peak) == pytest.approx(0.1)
    assert loop.lr_at(9, total, warm, peak) == pytest.approx(1.0)
    assert loop.lr_at(55, total, warm, peak) == pytest.approx(0.5, abs=1e-6)  # cosine midpoint
    assert loop.lr_at(99, total, warm, peak) < 0.01


def test_no_weight_decay_on_gains_biases_skip_gains():
    import nfnet

    model = nfnet.create_model("nf_resnet_cifar", num_classes=10, width=8, depth=1)
    decay, no_decay = loop.param_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0
    nd = [names[id(p)] for p in no_decay["params"]]
    assert any(n.endswith("bias") for n in nd) and any("gain" in n for n in nd)
    assert all(not n.endswith("gain") and not n.endswith("bias") for n in (names[id(p)] for p in decay["params"]))
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_gradient_noise_scale_recovers_known_value():
    # Per-example gradients g = G + noise with Σ = σ²I: B_simple = tr(Σ)/|G|² = d σ² / |G|².
    g = torch.Generator().manual_seed(0)
    d, sigma = 50, 2.0
    G = torch.randn(d, generator=g)
    truth = d * sigma**2 / G.square().sum().item()
    est = loop.GradNoiseScale(decay=0.99)
    b_small, b_big = 16, 128
    for _ in range(3000):
        noise = sigma * torch.randn(b_big, d, generator=g)
        small = (G + noise[:b_small].mean(0)).square().sum().item()
        big = (G + noise.mean(0)).square().sum().item()
        est.update(small, b_small, big, b_big)
    assert est.value == pytest.approx(truth, rel=0.15)


def test_same_seed_same_numbers_and_learns(tiny_data):
    a = runner.run_in_process(tiny_cfg(seed=3, max_steps=24), tiny_data, quiet=True)
    b = runner.run_in_process(tiny_cfg(seed=3, max_steps=24), tiny_data, quiet=True)
    c = runner.run_in_process(tiny_cfg(seed=4, max_steps=24), tiny_data, quiet=True)
    assert a.status == "completed" and a.steps == 24
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert a.final_val_acc == b.final_val_acc
    assert [h["train_loss"] for h in a.history] != [h["train_loss"] for h in c.history]
    assert a.gns is not None and math.isfinite(a.gns)


def test_divergence_is_recorded_not_raised(tiny_data):
    # A huge learning rate without clipping blows the NF-ResNet up; AGC at the same lr keeps it finite.
    hot = dict(base_lr=8.0, warmup_epochs=0, max_steps=24, log_every_steps=2, gns_every_steps=0)
    out = runner.run_in_process(tiny_cfg(clipping="none", **hot), tiny_data, quiet=True)
    assert out.status == "diverged"
    assert 0 <= out.diverged_step < 24 and out.diverged_reason
    clipped = runner.run_in_process(tiny_cfg(clipping="agc", clip_threshold=0.01, **hot), tiny_data, quiet=True)
    assert clipped.status == "completed"


def test_failed_run_is_tracked(tmp_path, tiny_data):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_cfg(dataset=str(tmp_path / "no-such-shards"))
    out = runner.train_and_track(cfg, tracking_uri=uri, experiment="t", run_name="broken",
                                 storage_path=str(tmp_path), in_process=True, dataset_uri=str(tmp_path / "nowhere"))
    assert out.status == "failed" and out.error
    run = Tracker(uri, out.mlflow_run_id).client.get_run(out.mlflow_run_id)
    assert run.info.status == "FAILED" and run.data.tags["status"] == "failed"


def _losses(summary):
    return [h["train_loss"] for h in summary.history]


@pytest.mark.ray
def test_ddp_two_workers_match_one_and_land_in_mlflow(ray_cluster, tmp_path, tiny_data):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_cfg(seed=1, max_steps=16, num_workers=2, batch_size=64)
    ddp = runner.train_and_track(cfg, tracking_uri=uri, experiment="ddp", run_name="ddp2",
                                 storage_path=str(tmp_path / "ray"), in_process=False, dataset_uri=tiny_data)
    assert ddp.status == "completed", ddp.error
    one = runner.run_in_process(cfg.replace(num_workers=1), tiny_data, quiet=True)
    # Same global batch, same samples per step: 1×64 and 2×32 follow the same curve (float reduction order only).
    assert _losses(ddp) == pytest.approx(_losses(one), rel=2e-3)
    assert ddp.final_val_acc == pytest.approx(one.final_val_acc, abs=2 / 128)

    run = Tracker(uri, ddp.mlflow_run_id).client.get_run(ddp.mlflow_run_id)
    assert run.data.params["num_workers"] == "2" and run.data.params["batch_size"] == "64"
    assert run.data.params["clipping"] == "agc" and float(run.data.params["lr"]) == pytest.approx(cfg.lr)
    for m in ("train_loss", "val_acc", "grad_norm_before", "grad_norm_after", "agc_clipped_frac", "images_per_sec",
              "gns", "agc_clipped_frac.stem"):
        assert m in run.data.metrics, m
    assert run.data.tags["status"] == "completed" and run.info.status == "FINISHED"
    arts = {a.path for a in Tracker(uri, ddp.mlflow_run_id).client.list_artifacts(ddp.mlflow_run_id)}
    assert {"config.json", "final_metrics.json", "curves.png"} <= arts


@pytest.mark.ray
def test_in_process_equals_torch_trainer_and_resume_after_kill(ray_cluster, tmp_path, tiny_data):
    # 512 images / 64 = 8 steps per epoch; 3 epochs, checkpoint every epoch, the worker dies once at step 13.
    cfg = tiny_cfg(seed=2, max_steps=24, checkpoint_every_epochs=1)
    ref = runner.run_in_process(cfg, tiny_data, quiet=True)
    trainer = runner.run_torch_trainer(cfg, tiny_data, name="one", storage_path=str(tmp_path / "ray"))
    assert _losses(trainer) == _losses(ref)
    assert trainer.final_val_acc == ref.final_val_acc

    resumed = runner.run_torch_trainer(cfg.replace(max_failures=1), tiny_data, name="killed",
                                       storage_path=str(tmp_path / "ray"), test_crash=(13, str(tmp_path / "crashed")))
    assert (tmp_path / "crashed").exists()  # it really died once
    assert resumed.status == "completed" and resumed.steps == 24
    assert _losses(resumed) == _losses(ref)
    assert resumed.final_val_acc == ref.final_val_acc


@pytest.mark.ray
def test_streaming_through_ray_data_to_two_workers(ray_cluster, tmp_path, tiny_data):
    # Ray Data decodes on CPU workers; each Train worker streams its own half of every epoch (storage.EpochStream).
    # Half a CPU per Train worker leaves the 2-CPU test cluster room for the Ray Data decode tasks.
    cfg = tiny_cfg(seed=5, num_workers=2, cpus_per_worker=0.5, loader="streaming", max_steps=16)
    out = runner.run_torch_trainer(cfg, tiny_data, name="stream", storage_path=str(tmp_path / "ray"))
    assert out.status == "completed" and out.steps == 16
    assert all(math.isfinite(h["train_loss"]) for h in out.history)
    assert out.history[-1]["train_loss"] < out.history[0]["train_loss"] + 0.05


def test_train_command_line(tmp_path, tiny_data, capsys):
    import dataclasses

    from studies import train

    with pytest.raises(SystemExit):
        train.main(["--help"])
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):  # --help explains every flag; λ is --lambda on the command line
        assert ("--lambda" if f.name == "clip_threshold" else "--" + f.name.replace("_", "-")) in help_text
    assert "--clip-threshold" not in help_text and "crash" not in help_text  # one spelling; no test hooks

    with pytest.raises(SystemExit):
        train.main(["--clipping", "agc", "--lambda", "-1"])
    assert "clip_threshold" in capsys.readouterr().err

    rc = train.main(["--in-process", "--dataset", tiny_data, "--model-overrides", '{"width": 8, "depth": 1}',
                     "--batch-size", "64", "--max-steps", "8", "--lambda", "0.02",
                     "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--experiment", "cli"])
    out = capsys.readouterr().out
    assert rc == 0 and "status: completed" in out and "epoch 1/1" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/m.db" in out


def test_run_length_warmup_and_schedule_in_steps():
    cfg = tiny_cfg(max_steps=40, warmup_steps=5, schedule_steps=400)
    assert loop.run_length(cfg, steps_per_epoch=8) == (40, 400, 5)  # the first 40 steps of a 400-step schedule
    assert loop.run_length(tiny_cfg(max_steps=None, epochs=2, warmup_epochs=0.5), 8) == (16, 16, 4)
    assert loop.lr_at(39, 400, 5, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 34 / 395)))
    # A scan's constant schedule: the warmup, then the peak lr it is labelled with, held to its last step.
    assert [loop.lr_at(s, 40, 4, 1.0, "constant") for s in (0, 3, 4, 39)] == [0.25, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        tiny_cfg(lr_schedule="linear")


def test_no_clipping_carries_no_threshold():
    cfg = tiny_cfg(clipping="none", clip_threshold=0.05)
    assert cfg.clip_threshold is None and cfg.lambda_label == "none" and "clip_threshold" not in cfg.flat()
    assert tiny_cfg(clipping="agc", clip_threshold=0.04).lambda_label == "0.04"


def test_checkpoint_of_another_config_is_refused(tmp_path, tiny_data):
    saved = {}

    def keep(metrics, ckpt):
        if ckpt:
            saved["dir"] = ckpt

    cfg = tiny_cfg(max_steps=16, checkpoint_every_epochs=1)  # 8 steps per epoch: a checkpoint after epoch 1
    loop.train(cfg, tiny_data, loop.WorkerContext(report=keep, print=lambda s: None))
    resumed = loop.train(cfg, tiny_data, loop.WorkerContext(resume_from=saved["dir"], print=lambda s: None))
    assert resumed.status == "completed" and resumed.steps == 16
    with pytest.raises(ValueError, match="another config"):
        loop.train(cfg.replace(base_lr=0.3), tiny_data, loop.WorkerContext(resume_from=saved["dir"]))


def test_scan_without_evaluation_and_gns_skipped_for_batchnorm(tiny_data):
    scan = runner.run_in_process(tiny_cfg(eval_every_epochs=0, max_steps=8), tiny_data, quiet=True)
    assert scan.best_val_acc is None and all("val_acc" not in h for h in scan.history)
    assert scan.final_train_loss is not None and math.isfinite(scan.final_train_loss)
    # Splitting the batch would change a BatchNorm model's statistics: its noise scale is not measured.
    bn = runner.run_in_process(tiny_cfg(model="bn_resnet_cifar", clipping="none", max_steps=8), tiny_data,
                               quiet=True)
    assert bn.status == "completed" and bn.gns is None


def test_metric_logging_survives_a_tracking_outage(tmp_path):
    from studies.tracking import MetricLogger

    uri = f"sqlite:///{tmp_path}/m.db"
    t = Tracker.create(uri, "outage", "r")
    log = MetricLogger(uri, t.run_id, every_s=0)
    real = log.tracker.client.log_batch
    log.tracker.client.log_batch = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("server down"))
    log({"loss": 1.0}, 1)  # the outage: buffered, no exception
    log({"loss": 0.5}, 2)
    assert len(log.pending) == 2 and log.failures >= 1
    log.tracker.client.log_batch = real  # the server is back
    log({"loss": 0.25}, 3)
    hist = t.client.get_metric_history(t.run_id, "loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 1.0), (2, 0.5), (3, 0.25)] and not log.pending


def test_time_based_checkpoints_mid_epoch_resume_exactly(tiny_data):
    # 8 steps per epoch; a checkpoint at every log window (every 3 steps): most of them fall inside an epoch.
    cfg = tiny_cfg(max_steps=20, log_every_steps=3, checkpoint_every_epochs=0, checkpoint_every_minutes=1e-9,
                   gns_every_steps=2)
    saved = []
    ref = loop.train(cfg, tiny_data, loop.WorkerContext(report=lambda m, c: c and saved.append((m["step"], c)),
                                                        print=lambda s: None))
    assert [s for s, _ in saved] == [3, 6, 9, 12, 15, 18]
    for step, ckpt in saved[1::2]:  # steps 6, 12, 18: in the first, second and third epoch
        resumed = loop.train(cfg, tiny_data, loop.WorkerContext(resume_from=ckpt, print=lambda s: None))
        assert resumed.steps == 20 and _losses(resumed) == _losses(ref), step
        assert resumed.final_val_acc == ref.final_val_acc and resumed.final_train_loss == ref.final_train_loss
        assert resumed.gns == pytest.approx(ref.gns, nan_ok=True)


def test_bad_config_is_recorded_failed_but_infrastructure_faults_are_raised_for_retry(tmp_path, tiny_data,
                                                                                        monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def run(exc):
        def boom(*a, **k):
            raise exc
        monkeypatch.setattr(runner, "run_in_process", boom)
        return runner.train_and_track(tiny_cfg(), tracking_uri=uri, experiment="t", run_name="r",
                                      storage_path=str(tmp_path), in_process=True, dataset_uri=tiny_data)

    out = run(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))  # a bug or a bad config: same again
    assert out.status == "failed" and "shapes" in out.error
    for exc in (ConnectionError("tracking server unreachable"), TimeoutError("storage timed out")):
        with pytest.raises(type(exc)):  # the machines' fault: Tune retries the trial
            run(exc)
    from ray.exceptions import ActorDiedError

    assert runner.is_infrastructure(ActorDiedError()) and not runner.is_infrastructure(ValueError("bad lr"))


@pytest.mark.slow
def test_torch_compile_gives_the_eager_losses(tiny_data):
    eager = runner.run_in_process(tiny_cfg(max_steps=8, gns_every_steps=0), tiny_data, quiet=True)
    compiled = runner.run_in_process(tiny_cfg(max_steps=8, gns_every_steps=0, compile=True), tiny_data, quiet=True)
    assert compiled.status == "completed"
    assert _losses(compiled) == pytest.approx(_losses(eager), rel=1e-4)
    assert compiled.final_val_acc == pytest.approx(eager.final_val_acc, abs=1 / 128)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: on the GPU a training step must not sync")
def test_gpu_training_step_makes_no_host_sync():
    import nfnet

    device = torch.device("cuda")
    cfg = tiny_cfg(use_gpu=True, clipping="agc", clip_threshold=0.01, precision="bf16", channels_last=True)
    model = nfnet.create_model(cfg.model, num_classes=10, **cfg.model_overrides).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(loop.param_groups(model, cfg.weight_decay), lr=0.1, momentum=0.9, nesterov=True,
                          foreach=True)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(64, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (64,), device=device), 10).float()

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    def step():
        return loop.train_step(model, opt, x, y, cfg, amp, params, nfnet.agc_parameters(model), measure_gns=False,
                               world_size=1, want_metrics=False)

    step()  # warm-up: lazy initialisations may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(s.loss)


def test_credentials_in_a_tracking_uri_are_never_printed():
    from studies.tracking import redact

    assert redact("http://ml:s3cret@mlflow.example:5000/") == "http://ml:***@mlflow.example:5000/"
    assert redact("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"


def test_resident_data_is_loaded_once_per_process_and_runs_stay_identical(tiny_data, monkeypatch):
    import storage

    cfg = tiny_cfg(seed=4, max_steps=8)
    loop._RESIDENT.clear()
    first = runner.run_in_process(cfg, tiny_data, quiet=True)
    loads = []
    real = storage.ShardSet.load_split
    monkeypatch.setattr(storage.ShardSet, "load_split", lambda self, *a, **k: loads.append(a) or real(self, *a, **k))
    again = runner.run_in_process(cfg, tiny_data, quiet=True)  # a reused Tune actor's next run
    assert loads == []  # train and val came from this process's device copy
    assert _losses(again) == _losses(first) and again.final_val_acc == first.final_val_acc  # the copy is unharmed


def test_one_gpu_trials_run_in_the_tune_actor_holding_their_gpu_share():
    from studies import search

    gpu = TrainConfig(use_gpu=True, gpus_per_worker=0.25, cpus_per_worker=2)
    assert runner.runs_in_process(gpu)  # no worker group per run: the actor (and its device copy) is reused
    assert search.trial_resources(gpu) == {"CPU": 2, "GPU": 0.25}
    assert search.trial_resources(TrainConfig()) == {"CPU": 1}
    for cfg in (gpu.replace(num_workers=2), gpu.replace(max_failures=1)):  # DDP or Train-level recovery
        assert not runner.runs_in_process(cfg) and search.trial_resources(cfg)["CPU"] == 0


def test_streamed_evaluation_covers_the_split_once_and_matches_resident(tmp_path):
    import nfnet
    import storage

    uri = storage.prepare_dataset("synthetic", str(tmp_path), seed=5, n_train=64, n_val=100, rows_per_shard=16).uri
    data = storage.open_dataset(uri)
    assert len(data.shard_paths("val")) == 7
    cfg = tiny_cfg(loader="streaming")
    ranks = [loop.val_chunks(data, cfg, loop.WorkerContext(rank=r, world_size=2))() for r in range(2)]
    seen = [(bytes(x.numpy()), int(y)) for chunks in ranks for xs, ys in chunks for x, y in zip(xs, ys)]
    images, labels = data.load_split("val")
    assert sorted(seen) == sorted((bytes(x.numpy()), int(y)) for x, y in zip(images, labels))  # once each
    model = nfnet.create_model(cfg.model, num_classes=data.manifest.num_classes, **cfg.model_overrides)
    augment = nfnet.Augment(0.0, data.manifest.num_classes)
    one = loop.WorkerContext()
    args = (augment, one, 32, False, contextlib.nullcontext)
    streamed = loop.evaluate(model, loop.val_chunks(data, cfg, one)(), *args)
    resident = loop.evaluate(model, loop.val_chunks(data, cfg.replace(loader="resident"), one)(), *args)
    assert streamed == pytest.approx(resident, rel=1e-6)

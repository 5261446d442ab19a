"""The Ray-free per-worker loop, on CPU."""
import math

import pytest
import torch

from studies.training import loop, runner
from tests.helpers import tiny_cfg


def _losses(summary):
    return [h["train_loss"] for h in summary.history]


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


def test_scan_without_evaluation_and_gns_skipped_for_batchnorm(tiny_data):
    scan = runner.run_in_process(tiny_cfg(eval_every_epochs=0, max_steps=8), tiny_data, quiet=True)
    assert scan.best_val_acc is None and all("val_acc" not in h for h in scan.history)
    assert scan.final_train_loss is not None and math.isfinite(scan.final_train_loss)
    # Splitting the batch would change a BatchNorm model's statistics: its noise scale is not measured.
    bn = runner.run_in_process(tiny_cfg(model="bn_resnet_cifar", clipping="none", max_steps=8), tiny_data,
                               quiet=True)
    assert bn.status == "completed" and bn.gns is None


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

import pytest
import torch

from nfnet import create_model
from nfnet.signal import signal_propagation

ALPHA = 0.2


def spp(name, **kw):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kw)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, signal_propagation(model, x)


def by_stage(signals):
    stages = {}
    for s in signals:
        stage, idx = s.name.rsplit(".", 1)
        stages.setdefault(stage, []).append(s)
    return stages


def test_nf_resnet_variance_grows_by_alpha_squared_per_block():
    _, signals = spp("nf_resnet_cifar", width=16, depth=4)
    stages = by_stage(signals)
    assert len(signals) == 12
    for stage in ("stages.1", "stages.2"):  # both start with a transition block: the stream restarts at 1
        blocks = stages[stage]
        for k, s in enumerate(blocks, start=1):
            assert s.var == pytest.approx(1 + k * ALPHA**2, rel=0.2), (stage, k, s)
            assert s.mean_sq < 0.05  # Scaled WS removes the mean shift
            assert 0.5 < s.residual_var < 1.5
        steps = [b.var - a.var for a, b in zip(blocks, blocks[1:])]
        assert all(abs(d - ALPHA**2) < 0.02 for d in steps), steps


def test_plain_convs_drift_far_from_the_nf_prediction():
    _, signals = spp("nf_resnet_cifar", width=16, depth=4, conv="plain")
    stages = by_stage(signals)
    for stage in ("stages.1", "stages.2"):
        for k, s in enumerate(stages[stage], start=1):
            ratio = s.var / (1 + k * ALPHA**2)
            assert ratio < 0.5 or ratio > 2.0, (stage, k, s)


def test_nfnet_skipinit_blocks_are_identity_at_init():
    model, signals = spp("nfnet_f0", depths=(1, 2, 1, 1), widths=(64, 64, 128, 128), group_width=16,
                         stem_widths=(8, 8, 16, 16))
    assert [s.name for s in signals] == ["stages.0.0", "stages.1.0", "stages.1.1", "stages.2.0", "stages.3.0"]
    # Skip gain 0: the second block of stage 1 passes the stream through unchanged, its branch is still live.
    assert signals[2].var == pytest.approx(signals[1].var, rel=1e-6)
    assert all(s.residual_var > 1e-5 for s in signals)
    assert model.training  # mode restored


def test_bn_model_blocks_found():
    _, signals = spp("bn_resnet_cifar", width=8, depth=2)
    assert [s.name for s in signals] == [f"stages.{i}.{j}" for i in range(3) for j in range(2)]
    # BatchNorm at eval with fresh running stats (mean 0, var 1) leaves the scale unnormalized; values are finite.
    assert all(s.var > 0 and s.residual_var > 0 for s in signals)


def test_rejects_model_without_residual_blocks():
    with pytest.raises(ValueError, match="residual blocks"):
        signal_propagation(torch.nn.Linear(3, 3), torch.randn(2, 3))


def test_without_weight_standardization_is_the_same_net_less_ws():
    from nfnet.layers import ScaledStdConv2d
    from nfnet.signal import without_weight_standardization

    torch.manual_seed(0)
    model = create_model("nf_resnet_cifar", num_classes=10, width=8, depth=2).eval()
    convs = [m for m in model.modules() if isinstance(m, ScaledStdConv2d)]
    with torch.no_grad():  # raw weights already standardized: removing WS must then change nothing
        for m in convs:
            m.gain.uniform_(0.5, 2.0)
            m.weight.copy_(m.standardized_weight() / (m.gain * m.gamma).reshape(-1, 1, 1, 1))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
        plain = without_weight_standardization(model)
        after = plain(x)
    assert plain is model
    assert not any(isinstance(m, ScaledStdConv2d) for m in model.modules())
    assert sum(type(m) is torch.nn.Conv2d for m in model.modules()) == len(convs)
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-4)


def test_batch_stats_normalize_bn_branches_and_keep_running_stats():
    torch.manual_seed(0)
    model = create_model("bn_resnet_cifar", num_classes=10, width=8, depth=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = 3 + 2 * torch.randn(16, 3, 16, 16)
    signals = signal_propagation(model, x, batch_stats=True)
    assert all(s.residual_var == pytest.approx(1.0, abs=1e-3) for s in signals)  # the branch ends in BN
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # running stats untouched
    assert model.training
    eval_signals = signal_propagation(model, x)  # fresh running stats (0, 1) at eval: no normalization
    assert not all(s.residual_var == pytest.approx(1.0, abs=0.1) for s in eval_signals)

import math

import pytest
import torch
from torch import nn

from nfnet import MODELS, create_model, list_models
from nfnet.layers import DropPath, NFBlock, ScaledAct, ScaledStdConv2d, SqueezeExcite

# NFNet paper, Table 1 (millions of parameters, 1000 classes).
PARAMS_M = {"nfnet_f0": 71.5, "nfnet_f1": 132.6, "nfnet_f2": 193.8, "nfnet_f3": 254.9, "nfnet_f4": 316.1,
            "nfnet_f5": 377.2, "nfnet_f6": 438.4}
ALL = ["nfnet_f0", "nfnet_f1", "nfnet_f2", "nfnet_f3", "nfnet_f4", "nfnet_f5", "nfnet_f6", "nfnet_f7",
       "nf_resnet26", "nf_resnet50", "nf_resnet101", "bn_resnet50", "nf_resnet_cifar", "bn_resnet_cifar"]
TINY = dict(num_classes=10, width=8, depth=1)


def meta_model(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def test_registry_lists_every_model():
    assert sorted(ALL) == list_models() == sorted(MODELS)


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_param_counts_match_paper(name):
    count = sum(p.numel() for p in meta_model(name).parameters())
    assert abs(count / 1e6 - PARAMS_M[name]) <= 0.1


def test_resnet50_sizes_close_to_torchvision():
    nf = sum(p.numel() for p in meta_model("nf_resnet50").parameters())
    assert abs(nf / 1e6 - 25.6) < 0.2


@pytest.mark.parametrize("name,size", [("nfnet_f0", 64), ("nf_resnet50", 64), ("bn_resnet50", 64),
                                       ("nf_resnet26", 64)])
def test_real_forward_shapes(name, size):
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["nfnet_f1", "nfnet_f3", "nfnet_f7", "nf_resnet101"])
def test_meta_forward_shapes(name):
    model = meta_model(name, num_classes=5)
    out = model(torch.empty(2, 3, 96, 96, device="meta"))
    assert out.shape == (2, 5)


@pytest.mark.parametrize("name", ["nf_resnet_cifar", "bn_resnet_cifar"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_cifar_models_train_step(name, block):
    model = create_model(name, block=block, **TINY)
    x = torch.randn(8, 3, 32, 32)
    out = model(x)
    assert out.shape == (8, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cifar_width_depth_change_structure():
    small = create_model("nf_resnet_cifar", **TINY)
    big = create_model("nf_resnet_cifar", num_classes=10, width=16, depth=2)
    assert len(small.stages) == 3 and all(len(s) == 1 for s in small.stages)
    assert all(len(s) == 2 for s in big.stages)
    assert small.fc.in_features == 4 * 8 and big.fc.in_features == 4 * 16
    assert isinstance(small.stem, ScaledStdConv2d) and small.stem.kernel_size == (3, 3)


@pytest.mark.parametrize("name", ALL)
def test_every_model_has_linear_fc(name):
    model = meta_model(name, num_classes=3)
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 3


def test_nf_classifier_init():
    model = create_model("nf_resnet26")
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.count_nonzero(model.fc.bias) == 0


def test_unknown_model_and_field_errors():
    with pytest.raises(ValueError, match="nfnet_f0"):
        create_model("nfnet_f99")
    with pytest.raises(ValueError, match="valid fields.*width"):
        create_model("nf_resnet_cifar", widht=8)
    with pytest.raises(ValueError, match="activation"):
        create_model("nf_resnet_cifar", activation="tanh")
    with pytest.raises(ValueError, match="conv"):
        create_model("nf_resnet_cifar", conv="dense")
    with pytest.raises(ValueError, match="num_classes"):
        create_model("nf_resnet_cifar", num_classes=0)


def test_overrides_apply():
    model = meta_model("nfnet_f0", dropout=0.0, activation="silu")
    assert model.dropout.p == 0.0 and model.final_act.name == "silu"
    plain = create_model("nf_resnet_cifar", conv="plain", **TINY)
    assert not any(isinstance(m, ScaledStdConv2d) for m in plain.modules())


def test_nfnet_block_structure():
    model = meta_model("nfnet_f0")
    blocks = [b for b in model.modules() if isinstance(b, NFBlock)]
    assert len(blocks) == 12
    # Stochastic depth 0.25 scaled linearly by block index; SkipInit gain starts at 0.
    rates = [b.drop_path.rate for b in blocks]
    assert rates == pytest.approx([0.25 * i / 12 for i in range(12)])
    assert all(b.skip_gain is not None and b.skip_gain.shape == () for b in blocks)
    # Grouped 3x3 convs with group width 128 and bottleneck 0.5: stage 2 mid = 768 → 6 groups.
    stage2_conv = model.stages[2][1].branch[2]
    assert stage2_conv.groups == 6 and stage2_conv.in_channels == 768
    assert model.final_conv.out_channels == 3072
    assert isinstance(model.stages[1][0].shortcut[0], nn.AvgPool2d)


def test_expected_std_resets_after_transition():
    model = meta_model("nf_resnet50")
    for stage in model.stages:
        betas = [b.beta for b in stage]
        # First block sees the previous stage's stream (variance 1 + kα²); within the stage it restarts at 1.
        for j, beta in enumerate(betas[1:], start=1):
            assert beta == pytest.approx(math.sqrt(1 + j * 0.2**2))
    assert model.stages[1][0].beta == pytest.approx(math.sqrt(1 + 3 * 0.04))


def test_scaled_std_conv_standardizes():
    conv = ScaledStdConv2d(16, 32, 3)
    with torch.no_grad():
        conv.weight.mul_(5.0).add_(3.0)
        w = conv.standardized_weight()
    assert w.mean(dim=(1, 2, 3)).abs().max() < 1e-5
    # Var(Ŵ)·fan_in = gain² = 1: output variance equals input variance for zero-mean weights.
    torch.testing.assert_close(w.var(dim=(1, 2, 3), correction=0) * 16 * 9, torch.ones(32), rtol=1e-4, atol=0)
    x = torch.randn(64, 16, 8, 8)
    assert conv(x)[:, :, 1:-1, 1:-1].var().item() == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize("name", ["gelu", "relu", "silu"])
def test_scaled_activation_is_variance_preserving(name):
    z = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    assert ScaledAct(name)(z).var().item() == pytest.approx(1.0, abs=0.01)


def test_squeeze_excite_gate_is_two_sigmoid():
    se = SqueezeExcite(8)
    assert se.fc0.out_features == 4
    with torch.no_grad():
        se.fc1.weight.zero_()
        se.fc1.bias.zero_()
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(se(x), x)  # 2·sigmoid(0) = 1


def test_drop_path_drops_whole_samples():
    dp = DropPath(0.5)
    x = torch.ones(4000, 3, 2, 2)
    y = dp(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert (per_sample.min(1).values == per_sample.max(1).values).all()
    assert y.mean().item() == pytest.approx(1.0, abs=0.1)
    assert torch.equal(dp.eval()(x), x)


def test_gamma_fold_is_exact():
    # conv(γ·a) == γ-folded conv(a): the builder folds activation gains and 1/β into Scaled-WS weights.
    torch.manual_seed(0)
    plain, folded = ScaledStdConv2d(8, 4, 3), ScaledStdConv2d(8, 4, 3, gamma=1.7)
    folded.load_state_dict(plain.state_dict())
    a = torch.relu(torch.randn(2, 8, 6, 6))
    torch.testing.assert_close(folded(a), plain(1.7 * a), rtol=1e-5, atol=1e-5)


"""Signal Propagation Plots (Brock et al. ICLR 2021, Sec. 3): per residual block, statistics of the residual
stream at the block's output and of its residual branch, from one forward pass at eval mode (BatchNorm may use
the batch's statistics instead, as in training and in the paper's plots)."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from nfnet.layers import NFBlock, ScaledStdConv2d


@dataclass
class BlockSignal:
    name: str
    mean_sq: float  # average over channels of the squared channel mean
    var: float  # average over channels of the channel variance
    residual_var: float  # same as `var`, for the residual branch output f(x) before it is added

    def as_dict(self) -> dict:
        return asdict(self)


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, block, module whose output is the residual-branch output) for every residual block."""
    # torchvision's blocks, if torchvision is loaded at all: a model cannot hold them otherwise, and importing it
    # costs every process ~2 s.
    tv = sys.modules.get("torchvision.models.resnet")
    found = []
    for name, m in model.named_modules():
        if isinstance(m, NFBlock):
            found.append((name, m, m.branch_out))
        elif tv is not None and isinstance(m, tv.Bottleneck):
            found.append((name, m, m.bn3))
        elif tv is not None and isinstance(m, tv.BasicBlock):
            found.append((name, m, m.bn2))
    return found


def _channel_stats(t: torch.Tensor) -> tuple[float, float]:
    t = t.detach().float().transpose(0, 1).flatten(1)  # [C, N·H·W]
    var, mean = torch.var_mean(t, dim=1, correction=0)
    return float(mean.square().mean()), float(var.mean())


def signal_propagation(model: nn.Module, x: torch.Tensor, batch_stats: bool = False) -> list[BlockSignal]:
    """One forward pass of `x` at eval mode. `batch_stats=True` lets BatchNorm normalize with the batch's own
    statistics, as it does in training (the paper's SPPs of BN-ResNets); its running statistics are kept."""
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no recognised residual blocks (NFBlock or torchvision "
                         "BasicBlock/Bottleneck); signal propagation needs them")
    stream: dict[str, tuple[float, float]] = {}
    branch: dict[str, float] = {}
    handles = []
    for name, block, branch_out in blocks:
        handles.append(block.register_forward_hook(
            lambda _m, _i, out, name=name: stream.__setitem__(name, _channel_stats(out))))
        handles.append(branch_out.register_forward_hook(
            lambda _m, _i, out, name=name: branch.__setitem__(name, _channel_stats(out)[1])))
    was_training = model.training
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if batch_stats else []
    saved = [[b.clone() for b in m.buffers()] for m in bns]
    try:
        model.eval()
        for m in bns:
            m.train()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for m, bufs in zip(bns, saved):
            for b, old in zip(m.buffers(), bufs):
                b.copy_(old)
        for h in handles:
            h.remove()
    return [BlockSignal(name, stream[name][0], stream[name][1], branch[name]) for name, _, _ in blocks]


def without_weight_standardization(model: nn.Module) -> nn.Module:
    """`model` with every ScaledStdConv2d replaced by a plain conv holding its raw weight times gain·γ: the same
    network, same He-initialised weights N(0, 1/fan_in), less Scaled WS. At init this is the NF-ResNet without
    WS of the paper's Fig. 2, whose channel means drift (Sec. 4.1). Modified in place and returned."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, ScaledStdConv2d):
            continue
        conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                         dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                         device=m.weight.device, dtype=m.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(m.weight * (m.gain * m.gamma).reshape(-1, 1, 1, 1))
            if m.bias is not None:
                conv.bias.copy_(m.bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, conv)
    return model

"""Signal Propagation Plots (Brock et al. ICLR 2021, Sec. 3): per residual block, statistics of the residual
stream at the block's output and of its residual branch, from one forward pass at eval mode."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from nfnet.layers import NFBlock


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
    found = []
    for name, m in model.named_modules():
        if isinstance(m, NFBlock):
            found.append((name, m, m.branch_out))
        elif isinstance(m, Bottleneck):
            found.append((name, m, m.bn3))
        elif isinstance(m, BasicBlock):
            found.append((name, m, m.bn2))
    return found


def _channel_stats(t: torch.Tensor) -> tuple[float, float]:
    t = t.detach().float().transpose(0, 1).flatten(1)  # [C, N·H·W]
    var, mean = torch.var_mean(t, dim=1, correction=0)
    return float(mean.square().mean()), float(var.mean())


def signal_propagation(model: nn.Module, x: torch.Tensor) -> list[BlockSignal]:
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
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [BlockSignal(name, stream[name][0], stream[name][1], branch[name]) for name, _, _ in blocks]

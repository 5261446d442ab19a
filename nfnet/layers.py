"""Building blocks of normalizer-free networks (Brock et al. 2021a, 2021b)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# γ such that γ·act(z) has unit variance for z ~ N(0, 1) (NF-ResNet paper, Sec. 4).
ACT_GAMMAS = {
    "gelu": 1.7015043497085571,
    "relu": 1.7139588594436646,
    "silu": 1.7881293296813965,
}
_ACT_FNS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class ScaledAct(nn.Module):
    """γ-scaled activation: γ·act(z) has unit variance for z ~ N(0, 1).
    With `scaled=False` it returns act(x) and the network folds γ into the next Scaled-WS conv instead
    (exact, conv(γ·a) = (γŴ)·a, and it saves one elementwise pass over the activations)."""

    def __init__(self, name: str, scaled: bool = True):
        super().__init__()
        if name not in ACT_GAMMAS:
            raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACT_GAMMAS)}")
        self.name = name
        self.fn = _ACT_FNS[name]
        self.gamma = ACT_GAMMAS[name] if scaled else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x)
        return out * self.gamma if self.gamma != 1.0 else out

    def extra_repr(self) -> str:
        return f"{self.name}, gamma={self.gamma:.4f}" + ("" if self.gamma != 1.0 else " (folded into next conv)")


class ScaledStdConv2d(nn.Conv2d):
    """Conv with Scaled Weight Standardization (NF-ResNet paper, Eq. 5):
    Ŵ = gain · γ · (W − mean W) / sqrt(var W · fan_in + eps), statistics per output filter.

    `gamma` is a constant input scale folded into Ŵ (the preceding activation's γ, and 1/β at a block input).
    The paper writes max(var·fan_in, eps); we add eps so one fused batch_norm kernel standardizes the
    weight (forward and backward): the two agree unless a filter's variance collapses below 1e-4/fan_in.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = True, eps: float = 1e-4, gamma: float = 1.0):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2,
                         groups=groups, bias=bias)
        self.gain = nn.Parameter(torch.ones(out_ch))
        self.eps = eps
        self.gamma = gamma
        self.fan_in = (in_ch // groups) * kernel_size * kernel_size
        nn.init.kaiming_normal_(self.weight, nonlinearity="linear")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        # batch_norm over a [1, out, fan_in] view: (W − μ)/sqrt(var + eps/fan_in) · gain·γ/sqrt(fan_in)
        # equals gain·γ·(W − μ)/sqrt(var·fan_in + eps).
        w = self.weight.reshape(1, self.out_channels, -1)
        scale = self.gain * (self.gamma * self.fan_in**-0.5)
        w = F.batch_norm(w, None, None, weight=scale, training=True, momentum=0.0, eps=self.eps / self.fan_in)
        return w.reshape_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", gamma={self.gamma:.4f}" if self.gamma != 1.0 else "")


def make_conv(kind: str, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1,
              gamma: float = 1.0) -> nn.Conv2d:
    """`scaled_ws` is the NF conv; `plain` is an ordinary nn.Conv2d (PyTorch default init), the control
    used to show what Scaled WS buys for signal propagation. `gamma` (input scale) only folds into scaled_ws."""
    if kind == "scaled_ws":
        return ScaledStdConv2d(in_ch, out_ch, kernel_size, stride=stride, groups=groups, gamma=gamma)
    if kind == "plain":
        if gamma != 1.0:
            raise ValueError("plain convs cannot fold an input scale; apply it to the activation instead")
        return nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups)
    raise ValueError(f"unknown conv kind {kind!r}; choose 'scaled_ws' or 'plain'")


class SqueezeExcite(nn.Module):
    """SE whose gate is 2·sigmoid, so the block output keeps its scale at init (NFNet paper, Sec. 4.1)."""

    def __init__(self, channels: int, ratio: float = 0.5):
        super().__init__()
        hidden = max(1, int(channels * ratio))
        self.fc0 = nn.Linear(channels, hidden)
        self.fc1 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc0(x.mean(dim=(2, 3))))
        gate = torch.sigmoid(self.fc1(h)) * 2.0
        return x * gate[:, :, None, None]


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample, rescaling survivors by 1/(1-p)."""

    def __init__(self, rate: float):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop-path rate must be in [0, 1), got {rate}")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype)
        return x * mask.bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3f}"


class NFBlock(nn.Module):
    """Pre-activation residual block x + α·f(x/β) (NF-ResNet paper, Eq. 3).

    β is the expected std of x, tracked analytically by the network builder. A transition block (shortcut
    is not None) applies its shortcut to act(x)/β so that the stream variance restarts at 1.
    `branch` must start with a conv: its leading activation `act` is applied here, shared with the shortcut.
    `pre_scale` multiplies act(x); the builder sets it to 1 when γ/β is folded into the following convs.
    `branch_out` is an identity marker where signal-propagation hooks read the residual-branch output.
    """

    def __init__(self, branch: nn.Module, act: ScaledAct, beta: float, alpha: float,
                 shortcut: nn.Module | None = None, drop_path: float = 0.0, skipinit: bool = False,
                 pre_scale: float | None = None):
        super().__init__()
        self.act = act
        self.branch = branch
        self.branch_out = nn.Identity()
        self.shortcut = shortcut
        self.drop_path = DropPath(drop_path)
        self.beta = beta
        self.pre_scale = 1.0 / beta if pre_scale is None else pre_scale
        self.alpha = alpha
        # SkipInit gain (NFNet): zero at init makes every block the identity.
        self.skip_gain = nn.Parameter(torch.zeros(())) if skipinit else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(x)
        if self.pre_scale != 1.0:
            out = out * self.pre_scale
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.drop_path(self.branch_out(self.branch(out)))
        if self.skip_gain is None:
            return torch.add(shortcut, out, alpha=self.alpha)
        return torch.addcmul(shortcut, out, self.skip_gain, value=self.alpha)  # one pass: x + α·g·f

    def extra_repr(self) -> str:
        return f"beta={self.beta:.4f}, alpha={self.alpha}"

"""NFNet-F*, NF-ResNet and BN-ResNet baselines: one config registry (`MODELS`), one builder (`create_model`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from nfnet.layers import ACT_GAMMAS, NFBlock, ScaledAct, SqueezeExcite, make_conv

_CONVS = ("scaled_ws", "plain")
_BLOCKS = ("basic", "bottleneck")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _common_checks(cfg) -> None:
    _check(cfg.activation in ACT_GAMMAS, f"activation must be one of {sorted(ACT_GAMMAS)}, got {cfg.activation!r}")
    _check(cfg.conv in _CONVS, f"conv must be one of {_CONVS}, got {cfg.conv!r}")
    _check(cfg.alpha > 0, f"alpha must be > 0, got {cfg.alpha}")
    _check(0 <= cfg.stochdepth < 1, f"stochdepth must be in [0, 1), got {cfg.stochdepth}")
    _check(0 <= cfg.dropout < 1, f"dropout must be in [0, 1), got {cfg.dropout}")


@dataclass(frozen=True)
class NFNetConfig:
    depths: tuple[int, ...]
    dropout: float
    widths: tuple[int, ...] = (256, 512, 1536, 1536)
    strides: tuple[int, ...] = (1, 2, 2, 2)
    stem_widths: tuple[int, ...] = (16, 32, 64, 128)
    group_width: int = 128
    bottleneck: float = 0.5
    se_ratio: float = 0.5
    final_conv_mult: int = 2
    activation: str = "gelu"
    alpha: float = 0.2
    stochdepth: float = 0.25
    conv: str = "scaled_ws"
    # Recipe metadata (NFNet paper, Table 1): train/test resolution and RandAugment magnitude.
    train_size: int = 192
    test_size: int = 256
    randaug_magnitude: int = 5

    def __post_init__(self):
        for name in ("depths", "widths", "strides", "stem_widths"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check(len(self.depths) == len(self.widths) == len(self.strides),
               f"depths, widths, strides need equal lengths, got {self.depths}, {self.widths}, {self.strides}")
        _check(all(d >= 1 for d in self.depths), f"depths must be >= 1, got {self.depths}")
        for w in self.widths:
            mid = int(w * self.bottleneck)
            _check(mid % self.group_width == 0,
                   f"width {w} x bottleneck {self.bottleneck} = {mid} is not a multiple of group_width "
                   f"{self.group_width}; change widths or group_width")
        _common_checks(self)


@dataclass(frozen=True)
class NFResNetConfig:
    depths: tuple[int, ...]
    widths: tuple[int, ...] = (256, 512, 1024, 2048)
    strides: tuple[int, ...] = (1, 2, 2, 2)
    block: str = "bottleneck"
    bottleneck: float = 0.25
    stem: str = "imagenet"  # 7x7/2 conv + 3x3/2 max-pool; "cifar": one 3x3/1 conv
    stem_width: int = 64
    activation: str = "relu"
    alpha: float = 0.2
    stochdepth: float = 0.0
    dropout: float = 0.0
    skipinit: bool = False
    conv: str = "scaled_ws"

    def __post_init__(self):
        for name in ("depths", "widths", "strides"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check(len(self.depths) == len(self.widths) == len(self.strides),
               f"depths, widths, strides need equal lengths, got {self.depths}, {self.widths}, {self.strides}")
        _check(all(d >= 1 for d in self.depths), f"depths must be >= 1, got {self.depths}")
        _check(self.block in _BLOCKS, f"block must be one of {_BLOCKS}, got {self.block!r}")
        _check(self.stem in ("imagenet", "cifar"), f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        _common_checks(self)


@dataclass(frozen=True)
class BNResNetConfig:
    depths: tuple[int, ...] = (3, 4, 6, 3)
    zero_init_residual: bool = False

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(self.depths))
        _check(len(self.depths) == 4 and all(d >= 1 for d in self.depths),
               f"depths must be 4 positive ints (torchvision ResNet), got {self.depths}")


@dataclass(frozen=True)
class CifarResNetConfig:
    """3-stage ResNet for 32x32 inputs (He et al.'s CIFAR layout: basic blocks, widths w, 2w, 4w).
    `width`: channels of the first stage (block="bottleneck" outputs 4x that, like ResNet-50);
    `depth`: blocks per stage. norm="nf" gives the NF-ResNet version, norm="bn" the BatchNorm one."""

    norm: str = "nf"
    width: int = 16
    depth: int = 2
    stages: int = 3
    block: str = "basic"
    activation: str = "relu"
    alpha: float = 0.2
    stochdepth: float = 0.0
    dropout: float = 0.0
    conv: str = "scaled_ws"

    def __post_init__(self):
        _check(self.norm in ("nf", "bn"), f"norm must be 'nf' or 'bn', got {self.norm!r}")
        _check(self.width >= 1, f"width must be >= 1, got {self.width}")
        _check(self.depth >= 1, f"depth must be >= 1, got {self.depth}")
        _check(self.stages >= 1, f"stages must be >= 1, got {self.stages}")
        _check(self.block in _BLOCKS, f"block must be one of {_BLOCKS}, got {self.block!r}")
        _common_checks(self)

    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1


def _nfnet(depths, dropout, train, test, mag) -> NFNetConfig:
    return NFNetConfig(depths=depths, dropout=dropout, train_size=train, test_size=test, randaug_magnitude=mag)


# NFNet paper Table 1 / reference configs: depths [1,2,6,3]·k, dropout, train/test px, RandAugment magnitude.
MODELS: dict[str, NFNetConfig | NFResNetConfig | BNResNetConfig | CifarResNetConfig] = {
    "nfnet_f0": _nfnet((1, 2, 6, 3), 0.2, 192, 256, 5),
    "nfnet_f1": _nfnet((2, 4, 12, 6), 0.3, 224, 320, 10),
    "nfnet_f2": _nfnet((3, 6, 18, 9), 0.4, 256, 352, 10),
    "nfnet_f3": _nfnet((4, 8, 24, 12), 0.4, 320, 416, 15),
    "nfnet_f4": _nfnet((5, 10, 30, 15), 0.5, 384, 512, 15),
    "nfnet_f5": _nfnet((6, 12, 36, 18), 0.5, 416, 544, 15),
    "nfnet_f6": _nfnet((7, 14, 42, 21), 0.5, 448, 576, 15),
    "nfnet_f7": _nfnet((8, 16, 48, 24), 0.5, 480, 608, 15),
    "nf_resnet26": NFResNetConfig(depths=(2, 2, 2, 2)),
    "nf_resnet50": NFResNetConfig(depths=(3, 4, 6, 3)),
    "nf_resnet101": NFResNetConfig(depths=(3, 4, 23, 3)),
    "bn_resnet50": BNResNetConfig(depths=(3, 4, 6, 3)),
    "nf_resnet_cifar": CifarResNetConfig(norm="nf"),
    "bn_resnet_cifar": CifarResNetConfig(norm="bn"),
}


def list_models() -> list[str]:
    return sorted(MODELS)


class NFNet(nn.Module):
    """Shared body for NFNet-F* and NF-ResNets: stem -> stages of NFBlocks -> [final conv] -> act -> pool -> fc."""

    def __init__(self, stem: nn.Module, stages: nn.ModuleList, final_conv: nn.Module | None, act: ScaledAct,
                 feat_ch: int, num_classes: int, dropout: float):
        super().__init__()
        self.stem = stem
        self.stages = stages
        self.final_conv = final_conv if final_conv is not None else nn.Identity()
        self.final_act = act
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(feat_ch, num_classes)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        x = self.final_act(self.final_conv(x))
        return self.fc(self.dropout(x.mean(dim=(2, 3))))


def _stage_plan(depths, alpha: float, stochdepth: float, transitions: list[bool]):
    """Yields (stage, index_in_stage, beta, drop_rate) per block. β = expected std of the block's input:
    variance grows by α² per block and resets to 1 after a transition block (NF-ResNet paper, Sec. 4)."""
    expected_var, idx, total = 1.0, 0, sum(depths)
    for s, depth in enumerate(depths):
        for j in range(depth):
            yield s, j, math.sqrt(expected_var), stochdepth * idx / total
            if transitions[idx]:
                expected_var = 1.0
            expected_var += alpha**2
            idx += 1


class _Parts:
    """Activation/conv factory shared by the NF builders. With Scaled-WS convs the activation's γ (and a
    block's 1/β) is folded into the following conv's standardized weight, which is exact and saves one
    elementwise pass per activation; with plain convs γ and 1/β are applied to the activations."""

    def __init__(self, cfg):
        self.kind = cfg.conv
        self.fold = cfg.conv == "scaled_ws"
        self.gamma = ACT_GAMMAS[cfg.activation]
        self.act = ScaledAct(cfg.activation, scaled=not self.fold)  # stateless, shared
        self.final_act = ScaledAct(cfg.activation)  # feeds pooling + fc: keeps its γ

    def conv(self, in_ch, out_ch, k, stride=1, groups=1, input_scale=1.0):
        """Conv whose input was multiplied by `input_scale` before the activation scaling was folded."""
        gamma = input_scale if self.fold else 1.0
        return make_conv(self.kind, in_ch, out_ch, k, stride=stride, groups=groups, gamma=gamma)

    def act_conv(self, in_ch, out_ch, k, stride=1, groups=1) -> list[nn.Module]:
        return [self.act, self.conv(in_ch, out_ch, k, stride, groups, input_scale=self.gamma)]

    def block(self, branch_first, branch_rest, shortcut_args, beta, alpha, drop, skipinit):
        """NFBlock whose first branch conv and shortcut conv take act(x)·γ/β."""
        s = self.gamma / beta
        first = self.conv(*branch_first[:3], **branch_first[3], input_scale=s)
        shortcut = None
        if shortcut_args is not None:
            pool, conv_args = shortcut_args
            conv = self.conv(*conv_args[:3], **conv_args[3], input_scale=s)
            shortcut = nn.Sequential(pool, conv) if pool is not None else conv
        pre_scale = 1.0 if self.fold else 1.0 / beta
        return NFBlock(nn.Sequential(first, *branch_rest), self.act, beta, alpha, shortcut, drop, skipinit,
                       pre_scale=pre_scale)


def _build_nfnet(cfg: NFNetConfig, num_classes: int) -> NFNet:
    parts = _Parts(cfg)
    sw = cfg.stem_widths
    stem_layers: list[nn.Module] = [parts.conv(3, sw[0], 3, stride=2)]
    for i in range(1, len(sw)):
        stem_layers += parts.act_conv(sw[i - 1], sw[i], 3, stride=2 if i == len(sw) - 1 else 1)
    firsts = [j == 0 for d in cfg.depths for j in range(d)]
    stages, blocks, in_ch = nn.ModuleList(), [], sw[-1]
    for s, j, beta, drop in _stage_plan(cfg.depths, cfg.alpha, cfg.stochdepth, firsts):
        out_ch, stride = cfg.widths[s], (cfg.strides[s] if j == 0 else 1)
        mid = int(out_ch * cfg.bottleneck)
        groups = mid // cfg.group_width
        rest = [*parts.act_conv(mid, mid, 3, stride=stride, groups=groups),
                *parts.act_conv(mid, mid, 3, groups=groups),
                *parts.act_conv(mid, out_ch, 1),
                SqueezeExcite(out_ch, cfg.se_ratio)]
        shortcut = None
        if j == 0:  # transition: 2x2 average pool (when strided) then 1x1 conv on act(x)/β
            pool = nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False) if stride > 1 else None
            shortcut = (pool, (in_ch, out_ch, 1, {}))
        blocks.append(parts.block((in_ch, mid, 1, {}), rest, shortcut, beta, cfg.alpha, drop, skipinit=True))
        in_ch = out_ch
        if j == cfg.depths[s] - 1:
            stages.append(nn.Sequential(*blocks))
            blocks = []
    feat = cfg.final_conv_mult * cfg.widths[-1]
    final_conv = parts.conv(in_ch, feat, 1)
    return NFNet(nn.Sequential(*stem_layers), stages, final_conv, parts.final_act, feat, num_classes, cfg.dropout)


def _build_nf_resnet(cfg: NFResNetConfig, num_classes: int) -> NFNet:
    parts = _Parts(cfg)
    if cfg.stem == "imagenet":
        stem = nn.Sequential(parts.conv(3, cfg.stem_width, 7, stride=2), nn.MaxPool2d(3, stride=2, padding=1))
    else:
        stem = parts.conv(3, cfg.stem_width, 3)
    # A block is a transition when it changes resolution or width; only then does it get a shortcut conv.
    transitions, in_ch = [], cfg.stem_width
    for s, depth in enumerate(cfg.depths):
        for j in range(depth):
            transitions.append(j == 0 and (cfg.strides[s] > 1 or in_ch != cfg.widths[s]))
            in_ch = cfg.widths[s]
    stages, blocks, in_ch, idx = nn.ModuleList(), [], cfg.stem_width, 0
    for s, j, beta, drop in _stage_plan(cfg.depths, cfg.alpha, cfg.stochdepth, transitions):
        out_ch, stride = cfg.widths[s], (cfg.strides[s] if j == 0 else 1)
        if cfg.block == "bottleneck":
            mid = max(1, int(out_ch * cfg.bottleneck))
            first = (in_ch, mid, 1, {})
            rest = [*parts.act_conv(mid, mid, 3, stride=stride), *parts.act_conv(mid, out_ch, 1)]
        else:
            first = (in_ch, out_ch, 3, {"stride": stride})
            rest = parts.act_conv(out_ch, out_ch, 3)
        shortcut = (None, (in_ch, out_ch, 1, {"stride": stride})) if transitions[idx] else None
        blocks.append(parts.block(first, rest, shortcut, beta, cfg.alpha, drop, skipinit=cfg.skipinit))
        in_ch, idx = out_ch, idx + 1
        if j == cfg.depths[s] - 1:
            stages.append(nn.Sequential(*blocks))
            blocks = []
    return NFNet(stem, stages, None, parts.final_act, in_ch, num_classes, cfg.dropout)


class CifarBNResNet(nn.Module):
    """BatchNorm twin of the CIFAR NF-ResNet, built from torchvision's residual blocks."""

    def __init__(self, cfg: CifarResNetConfig, num_classes: int):
        super().__init__()
        from torchvision.models.resnet import BasicBlock, Bottleneck  # ~2 s to import: only the baselines pay

        block = Bottleneck if cfg.block == "bottleneck" else BasicBlock
        w = cfg.width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.stages = nn.ModuleList()
        in_ch = w
        for s in range(cfg.stages):
            planes, stride = w * 2**s, (1 if s == 0 else 2)
            out_ch = planes * block.expansion
            blocks = []
            for j in range(cfg.depth):
                down = None
                if j == 0 and (stride > 1 or in_ch != out_ch):
                    down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                         nn.BatchNorm2d(out_ch))
                blocks.append(block(in_ch, planes, stride if j == 0 else 1, down))
                in_ch = out_ch
            self.stages.append(nn.Sequential(*blocks))
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.fc(self.dropout(x.mean(dim=(2, 3))))


def build(cfg, num_classes: int) -> nn.Module:
    if isinstance(cfg, NFNetConfig):
        return _build_nfnet(cfg, num_classes)
    if isinstance(cfg, NFResNetConfig):
        return _build_nf_resnet(cfg, num_classes)
    if isinstance(cfg, BNResNetConfig):
        from torchvision.models.resnet import Bottleneck, ResNet

        return ResNet(Bottleneck, list(cfg.depths), num_classes=num_classes,
                      zero_init_residual=cfg.zero_init_residual)
    if isinstance(cfg, CifarResNetConfig):
        if cfg.norm == "bn":
            return CifarBNResNet(cfg, num_classes)
        widths = tuple(cfg.width * 2**s * cfg.expansion() for s in range(cfg.stages))
        nf = NFResNetConfig(
            depths=(cfg.depth,) * cfg.stages, widths=widths, strides=(1,) + (2,) * (cfg.stages - 1),
            block=cfg.block, stem="cifar", stem_width=cfg.width, activation=cfg.activation, alpha=cfg.alpha,
            stochdepth=cfg.stochdepth, dropout=cfg.dropout, conv=cfg.conv)
        return _build_nf_resnet(nf, num_classes)
    raise TypeError(f"no builder for config type {type(cfg).__name__}")


def model_config(name: str, **overrides):
    """The variant's config with `overrides` applied (validated)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    base = MODELS[name]
    valid = [f.name for f in dataclasses.fields(base)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} for {name!r} "
                         f"({type(base).__name__}); valid fields: {', '.join(valid)}")
    return dataclasses.replace(base, **overrides)


def create_model(name: str, num_classes: int = 1000, **overrides) -> nn.Module:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return build(model_config(name, **overrides), num_classes)


__all__ = ["MODELS", "NFNetConfig", "NFResNetConfig", "BNResNetConfig", "CifarResNetConfig",
           "create_model", "list_models", "model_config", "build"]

"""Adaptive Gradient Clipping (Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
Normalization", Sec. 4.1): per unit i, if ‖G_i‖ / max(‖W_i‖, ε) > λ then G_i ← λ·max(‖W_i‖, ε)/‖G_i‖ · G_i.

Where to call it in a training step:
    loss.backward()                  # with DDP the gradients are all-reduced by now
    scaler.unscale_(optimizer)       # only with a GradScaler: clip true gradients, not scaled ones
    stats = adaptive_grad_clip_(agc_parameters(model), clip_threshold=0.01)
    optimizer.step()                 # weight decay is added by the optimizer, after clipping (as in the paper)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

_CONTAINERS = ("stages", "blocks", "layers", "features")


def stage_of(name: str) -> str:
    """Top-level group of a parameter name: 'stages.2.0.branch.0.weight' -> 'stages.2', 'stem.0.weight' ->
    'stem', torchvision's 'layer3.1.conv1.weight' -> 'layer3'."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] in _CONTAINERS and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}"
    return parts[0] if len(parts) > 1 else name


def agc_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """All trainable parameters except the final classifier `model.fc` (weight and bias): the paper found it
    is always better not to clip the final linear layer."""
    fc = getattr(model, "fc", None)
    excluded = {id(p) for p in fc.parameters()} if isinstance(fc, nn.Module) else set()
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in excluded]


@dataclass
class AGCStats:
    """Result of one clipping call. Tensors stay on the device; only the methods below synchronize."""

    clipped: torch.Tensor  # bool, one entry per unit, in parameter order
    names: list[str]  # parameter names ("all" for bare tensors), same order
    units: list[int]  # number of units per parameter, same order
    grad_norm_before: torch.Tensor  # 0-dim: global L2 norm of the clipped set before clipping
    grad_norm_after: torch.Tensor  # 0-dim: same after clipping

    @property
    def num_units(self) -> int:
        return self.clipped.numel()

    @property
    def segments(self) -> list[tuple[str, int]]:
        """(stage, number of units) per parameter; stage names are worked out here, not in every clipping call."""
        return [(stage_of(n) if n != "all" else n, u) for n, u in zip(self.names, self.units)]

    def fraction_clipped(self) -> float:
        if self.clipped.numel() == 0:
            return 0.0
        return float(self.clipped.float().mean())

    def per_stage(self) -> dict[str, float]:
        """Fraction of units clipped in each stage (one device sync)."""
        segments = self.segments
        if not segments:
            return {}
        names = list(dict.fromkeys(s for s, _ in segments))
        index = {s: i for i, s in enumerate(names)}
        ids = torch.repeat_interleave(
            torch.tensor([index[s] for s, _ in segments]), torch.tensor([n for _, n in segments]))
        ids = ids.to(self.clipped.device)
        hits = torch.zeros(len(names), device=ids.device).index_add_(0, ids, self.clipped.float())
        totals = torch.bincount(ids, minlength=len(names)).float()
        return dict(zip(names, (hits / totals).tolist()))


def _whole_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    # Gains, biases, scalars: one fused multi-tensor kernel for all of them, fp32 whatever their dtype.
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))


def _unit_norms(t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    # Reduce every dim but 0 in place (no flatten copy, works for channels_last too).
    return torch.linalg.vector_norm(t, 2, dim=tuple(range(1, t.ndim)), dtype=torch.float32, out=out)


def _factor(g_norm: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    # Eq. 3: units above the threshold are scaled to norm λ·max(‖W_i‖, ε); the others get factor 1.
    return torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), torch.ones_like(g_norm))


def _clip_fused(grads, nv, max_norm, sizes):
    """Accelerator path: all norms, all factors at once, one multi-tensor multiply; no host sync anywhere, and
    few launches (the call is launch-bound on a GPU: W and G together are well under a millisecond of traffic)."""
    g_norm = torch.cat(([_whole_norms(grads[:nv])] if nv else []) + [_unit_norms(g) for g in grads[nv:]])
    factor = _factor(g_norm, max_norm)
    by_dtype = {dt: factor.to(dt).split(sizes) for dt in {g.dtype for g in grads}}
    torch._foreach_mul_(grads, [by_dtype[g.dtype][i].view((-1,) + (1,) * (g.ndim - 1) if g.ndim > 1 else ())
                                for i, g in enumerate(grads)])
    return g_norm, factor


# Elements per row block (16 MiB fp32): still in the last-level cache when the multiply follows the norm, and
# big enough that all of NFNet-F0's tensors but its largest are one block (measured best of 1, 2, 4, 8, 16 MiB).
_BLOCK = 1 << 22


def _clip_blocked(grads, nv, max_norm, sizes):
    """CPU path: CPU clipping is memory-bound, so each block of rows is normed and, only if one of its units
    clips, rescaled while still in cache: G is read once and only clipping blocks are written. Blocks are
    large (most tensors are one block) because every op costs microseconds of dispatch. Host syncs are free
    on CPU. Norms and factors go straight into preallocated vectors (no per-block lists to concatenate)."""
    g_norm = torch.empty_like(max_norm)
    factor = torch.ones_like(max_norm)
    # With every threshold at or above the 1e-6 guard, Eq. 3's factor is m / max(‖G‖, m): 2 ops instead of 5.
    fac = _factor if float(max_norm.min()) < 1e-6 else (lambda gn, m: m / torch.maximum(gn, m))
    if nv:
        g_norm[:nv] = _whole_norms(grads[:nv])
        gv, mv = g_norm[:nv], max_norm[:nv]
        if bool((gv > mv).any()):
            f = factor[:nv]
            f.copy_(fac(gv, mv))
            torch._foreach_mul_(grads[:nv], list(f.unbind()))  # 0-dim fp32 factors keep each grad's dtype
    u = nv
    for g, n in zip(grads[nv:], sizes[nv:]):
        if g.is_contiguous():
            rows = g.view(n, -1)
            step = max(1, _BLOCK // max(1, rows.shape[1]))
        else:  # e.g. channels_last: one pass over the whole tensor, reduced over its own strides
            rows, step = g, n
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            gn = g_norm[u + r0:u + r1]
            _unit_norms(rows[r0:r1], out=gn)
            m = max_norm[u + r0:u + r1]
            if bool((gn > m).any()):
                f = factor[u + r0:u + r1]
                f.copy_(fac(gn, m))
                rows[r0:r1].mul_(f.to(g.dtype).view((-1,) + (1,) * (rows.ndim - 1)))
        u += n
    return g_norm, factor


def adaptive_grad_clip_(parameters: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                        clip_threshold: float, eps: float = 1e-3) -> AGCStats:
    """Clips `.grad` of `parameters` in place, unit-wise (rows of a Linear weight, output filters of a conv,
    whole tensor for gains/biases/scalars). `parameters`: tensors, or (name, tensor) pairs such as
    `agc_parameters(model)` returns (then `per_stage()` groups by name). Parameters without grad are skipped.
    `clip_threshold` is λ (TrainConfig.clip_threshold; TrainConfig.clipping is the mode none/norm/agc)."""
    if not clip_threshold > 0:
        raise ValueError(f"clip_threshold (λ) must be > 0, got {clip_threshold}; AGC with λ <= 0 would zero all "
                         "gradients")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    # Per device: whole-tensor parameters first (one fused norm for all of them), then per-unit ones.
    groups: dict[torch.device, tuple[list, list]] = {}
    for item in parameters:
        name, p = item if isinstance(item, tuple) else ("all", item)
        g = p.grad
        if g is None:
            continue
        vecs, mats = groups.get(g.device) or groups.setdefault(g.device, ([], []))
        (vecs if p.ndim <= 1 else mats).append((name, p))

    clipped, names, units, sq_before, sq_after = [], [], [], [], []
    with torch.no_grad():  # cheaper than detaching every tensor
        for vecs, mats in groups.values():
            nv = len(vecs)
            params = [p for _, p in vecs] + [p for _, p in mats]
            grads = [p.grad for p in params]
            sizes = [1] * nv + [p.shape[0] for _, p in mats]
            w_norm = torch.cat(([_whole_norms(params[:nv])] if nv else []) + [_unit_norms(p) for p in params[nv:]])
            max_norm = w_norm.clamp_min_(eps).mul_(clip_threshold)
            clip = _clip_blocked if grads[0].device.type == "cpu" else _clip_fused
            g_norm, factor = clip(grads, nv, max_norm, sizes)
            clipped.append(factor < 1.0)
            names += [n for n, _ in vecs] + [n for n, _ in mats]
            units += sizes
            after = g_norm * factor
            sq_before.append(torch.dot(g_norm, g_norm))
            sq_after.append(torch.dot(after, after))

    if not clipped:
        zero = torch.zeros(())
        return AGCStats(torch.zeros(0, dtype=torch.bool), [], [], zero, zero.clone())
    if len(clipped) == 1:
        return AGCStats(clipped[0], names, units, sq_before[0].sqrt(), sq_after[0].sqrt())
    home = clipped[0].device
    return AGCStats(
        clipped=torch.cat([c.to(home) for c in clipped]),
        names=names,
        units=units,
        grad_norm_before=torch.stack([s.to(home) for s in sq_before]).sum().sqrt(),
        grad_norm_after=torch.stack([s.to(home) for s in sq_after]).sum().sqrt(),
    )

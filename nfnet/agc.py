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
    segments: list[tuple[str, int]]  # (stage, number of units) per parameter, same order
    grad_norm_before: torch.Tensor  # 0-dim: global L2 norm of the clipped set before clipping
    grad_norm_after: torch.Tensor  # 0-dim: same after clipping

    @property
    def num_units(self) -> int:
        return self.clipped.numel()

    def fraction_clipped(self) -> float:
        if self.clipped.numel() == 0:
            return 0.0
        return float(self.clipped.float().mean())

    def per_stage(self) -> dict[str, float]:
        """Fraction of units clipped in each stage (one device sync)."""
        if not self.segments:
            return {}
        names = list(dict.fromkeys(s for s, _ in self.segments))
        index = {s: i for i, s in enumerate(names)}
        ids = torch.repeat_interleave(
            torch.tensor([index[s] for s, _ in self.segments]), torch.tensor([n for _, n in self.segments]))
        ids = ids.to(self.clipped.device)
        hits = torch.zeros(len(names), device=ids.device).index_add_(0, ids, self.clipped.float())
        totals = torch.bincount(ids, minlength=len(names)).float()
        return dict(zip(names, (hits / totals).tolist()))


def _norms(tensors: list[torch.Tensor], whole: bool) -> list[torch.Tensor]:
    """L2 norms in fp32: whole-tensor norms (one fused multi-tensor kernel) or per output unit."""
    if not tensors:
        return []
    if whole:
        return [n.reshape(1) for n in torch._foreach_norm(tensors, 2, dtype=torch.float32)]
    # Reduce every dim but 0 in place (no flatten copy, works for channels_last too).
    return [torch.linalg.vector_norm(t, 2, dim=tuple(range(1, t.ndim)), dtype=torch.float32) for t in tensors]


def _factor(g_norm: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    # Eq. 3: units above the threshold are scaled to norm λ·max(‖W_i‖, ε); the others get factor 1.
    return torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), torch.ones_like(g_norm))


def _clip_fused(grads, nv, max_norm, sizes):
    """Accelerator path: all norms, then all factors in one pass, then one multiply per tensor; no host sync."""
    g_norm = torch.cat(_norms(grads[:nv], True) + _norms(grads[nv:], False))
    factor = _factor(g_norm, max_norm)
    for dtype in {g.dtype for g in grads}:
        idx = [i for i, g in enumerate(grads) if g.dtype == dtype]
        fs = factor.to(dtype).split(sizes)
        vec_idx = [i for i in idx if i < nv]
        if vec_idx:
            torch._foreach_mul_([grads[i] for i in vec_idx], [fs[i].view(()) for i in vec_idx])
        for i in idx:
            if i >= nv:
                grads[i].mul_(fs[i].view((-1,) + (1,) * (grads[i].ndim - 1)))
    return g_norm, factor


_BLOCK = 1 << 18  # elements per row block (1 MiB fp32): stays in L2 between the norm and the multiply


def _clip_blocked(grads, nv, max_norm, sizes):
    """CPU path: CPU clipping is memory-bound, so each block of rows is normed and rescaled while it is still
    in cache (one read + at most one write of G instead of two reads + a write); blocks where no unit clips
    are not written at all. Host syncs are free on CPU."""
    # When every threshold is >= the 1e-6 floor, min(1, m/‖G‖) = m / max(‖G‖, m): 2 ops instead of 5.
    factor = _factor if float(max_norm.min()) < 1e-6 else (lambda gn, m: m / torch.maximum(gn, m))
    mx = max_norm.split(sizes)
    norms, factors = [], []
    if nv:
        g_vec = torch.cat(_norms(grads[:nv], True))
        f_vec = factor(g_vec, max_norm[:nv])
        if float(f_vec.min()) < 1.0:
            torch._foreach_mul_(list(grads[:nv]), list(f_vec.unbind()))  # 0-dim fp32: keeps grad dtype
        norms.append(g_vec)
        factors.append(f_vec)
    for g, m in zip(grads[nv:], mx[nv:]):
        if not g.is_contiguous():  # e.g. channels_last: one unblocked pass
            gn = torch.linalg.vector_norm(g, 2, dim=tuple(range(1, g.ndim)), dtype=torch.float32)
            f = factor(gn, m)
            g.mul_(f.to(g.dtype).view((-1,) + (1,) * (g.ndim - 1)))
            norms.append(gn)
            factors.append(f)
            continue
        rows = g.view(g.shape[0], -1)
        step = max(1, _BLOCK // rows.shape[1])
        for r0 in range(0, rows.shape[0], step):
            block = rows[r0:r0 + step]
            gn = torch.linalg.vector_norm(block, 2, dim=1, dtype=torch.float32)
            f = factor(gn, m[r0:r0 + step])
            if float(f.min()) < 1.0:
                block.mul_(f.to(g.dtype)[:, None])
            norms.append(gn)
            factors.append(f)
    return torch.cat(norms), torch.cat(factors)


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
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for item in parameters:
        name, p = item if isinstance(item, tuple) else ("all", item)
        if p.grad is None:
            continue
        by_device.setdefault(p.grad.device, []).append((stage_of(name) if name != "all" else name, p))

    clipped, segments, sq_before, sq_after = [], [], [], []
    for group in by_device.values():
        vecs = [(s, p) for s, p in group if p.ndim <= 1]
        mats = [(s, p) for s, p in group if p.ndim > 1]
        ordered = vecs + mats
        params = [p.detach() for _, p in ordered]
        grads = [p.grad.detach() for _, p in ordered]
        nv = len(vecs)
        w_norm = torch.cat(_norms(params[:nv], True) + _norms(params[nv:], False))
        max_norm = w_norm.clamp_min(eps).mul_(clip_threshold)
        sizes = [1] * nv + [p.shape[0] for p in params[nv:]]
        clip = _clip_blocked if group[0][1].grad.device.type == "cpu" else _clip_fused
        g_norm, factor = clip(grads, nv, max_norm, sizes)
        trigger = factor < 1.0
        clipped.append(trigger)
        segments += [(s, n) for (s, _), n in zip(ordered, sizes)]
        sq_before.append(g_norm.square().sum())
        sq_after.append((g_norm * factor).square().sum())

    if not clipped:
        zero = torch.zeros(())
        return AGCStats(torch.zeros(0, dtype=torch.bool), [], zero, zero.clone())
    home = clipped[0].device
    return AGCStats(
        clipped=torch.cat([c.to(home) for c in clipped]),
        segments=segments,
        grad_norm_before=torch.stack([s.to(home) for s in sq_before]).sum().sqrt(),
        grad_norm_after=torch.stack([s.to(home) for s in sq_after]).sum().sqrt(),
    )

"""Adaptive Gradient Clipping (Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
Normalization", Sec. 4.1): per unit i, if ‖G_i‖ / max(‖W_i‖, ε) > λ then G_i ← λ·max(‖W_i‖, ε)/‖G_i‖ · G_i.

Where to call it in a training step:
    loss.backward()                  # with DDP the gradients are all-reduced by now
    scaler.unscale_(optimizer)       # only with a GradScaler: clip true gradients, not scaled ones
    stats = adaptive_grad_clip_(agc_parameters(model), clip_threshold=0.01)
    optimizer.step()                 # weight decay is added by the optimizer, after clipping (as in the paper)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
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


def _sums(g_norm, factor):
    # (clipped mask, Σ‖G_i‖² before, Σ‖G_i‖² after), kept on the device.
    after = g_norm * factor
    return factor < 1.0, torch.dot(g_norm, g_norm), torch.dot(after, after)


def _clip_fused(params, grads, nv, sizes, lam, eps):
    """Accelerator path: all norms, all factors at once, one multi-tensor multiply; no host sync anywhere, and
    few launches (the call is launch-bound on a GPU: W and G together are well under a millisecond of traffic)."""
    w_norm = torch.cat(([_whole_norms(params[:nv])] if nv else []) + [_unit_norms(p) for p in params[nv:]])
    max_norm = w_norm.clamp_min_(eps).mul_(lam)
    g_norm = torch.cat(([_whole_norms(grads[:nv])] if nv else []) + [_unit_norms(g) for g in grads[nv:]])
    factor = _factor(g_norm, max_norm)
    by_dtype = {dt: factor.to(dt).split(sizes) for dt in {g.dtype for g in grads}}
    torch._foreach_mul_(grads, [by_dtype[g.dtype][i].view((-1,) + (1,) * (g.ndim - 1) if g.ndim > 1 else ())
                                for i, g in enumerate(grads)])
    return _sums(g_norm, factor)


# Elements per block of G's rows (8 MiB fp32): a block per worker stays in the last-level cache from its norm to
# its multiply, and most tensors are one block (each op costs microseconds of dispatch).
_BLOCK = 1 << 21


_pool: tuple[tuple[int, int], ThreadPoolExecutor] | None = None


def _serial_workers(n: int) -> ThreadPoolExecutor:
    """n threads whose torch ops run single-threaded (recreated after a fork). An intra-op parallel op waits
    for its slowest thread, spinning; on a busy machine a call made of a hundred such ops spins for tens of
    times its own length, so instead whole tensors go to threads that never wait on each other."""
    global _pool
    key = (os.getpid(), n)
    if _pool is None or _pool[0] != key:
        ready = threading.Barrier(n)  # holds each thread until all n exist, so each runs one init

        def init():
            torch.set_num_threads(1)  # this thread's OpenMP/MKL setting ...
            ready.wait()

        pool = ThreadPoolExecutor(n, thread_name_prefix="agc")
        for f in [pool.submit(init) for _ in range(n)]:
            f.result()
        torch.set_num_threads(n)  # ... and the default later threads start from, which is put back
        _pool = key, pool
    return _pool[1]


def _np_factor(gn, m):
    # Eq. 3 on host arrays.
    return np.where(gn > m, m / np.maximum(gn, 1e-6), np.float32(1.0)).astype(np.float32, copy=False)


def _row_blocks(g):
    """(first row, rows) per block of g's rows; a non-contiguous g (e.g. channels_last) is one block, reduced
    over its own strides."""
    if not g.is_contiguous() or g.numel() <= _BLOCK:
        return [(0, g)]
    rows = g.view(g.shape[0], -1)
    step = -(-rows.shape[0] // -(-g.numel() // _BLOCK))  # equal blocks, none over _BLOCK elements (rows allowing)
    return [(r0, rows[r0:r0 + step]) for r0 in range(0, rows.shape[0], step)]


def _clip_units(w, g, gn, f, lam, eps):
    # One multi-unit tensor: its W norms, then per block of G the norms and, if a unit clips, the scaling while
    # the block is still in cache. gn, f: this tensor's slices of the host vectors.
    m = np.maximum(_unit_norms(w).numpy(), eps) * lam
    for r0, rows in _row_blocks(g):
        r1 = r0 + rows.shape[0]
        gb, mb = gn[r0:r1], m[r0:r1]
        gb[:] = _unit_norms(rows).numpy()
        if (gb > mb).any():
            fb = f[r0:r1]
            fb[:] = _np_factor(gb, mb)
            rows.mul_(torch.from_numpy(fb).to(rows.dtype).view((-1,) + (1,) * (rows.ndim - 1)))


def _clip_vectors(params, grads, gn, f, lam, eps):
    # Whole-tensor units (gains, biases, scalars): tiny, so two fused norms, and a multiply only where one clips.
    m = np.maximum(_whole_norms(params).numpy(), eps) * lam
    gn[:] = _whole_norms(grads).numpy()
    if (gn > m).any():
        f[:] = _np_factor(gn, m)
        hit = np.flatnonzero(f < 1).tolist()
        torch._foreach_mul_([grads[i] for i in hit], torch.from_numpy(f[hit]).unbind())  # fp32 0-dim: any dtype


def _clip_blocked(params, grads, nv, sizes, lam, eps):
    """CPU path, memory-bound: W and G are read once, and only clipping blocks of G are written, while they are
    still in cache from their norms. Multi-unit tensors are shared out to single-threaded workers. Norms go to
    numpy vectors and all the arithmetic on them runs there: no per-tensor concatenation or slicing in torch,
    and no small torch op fanned out to all cores."""
    offsets = np.cumsum([0] + sizes).tolist()
    gn, f = np.empty(offsets[-1], np.float32), np.ones(offsets[-1], np.float32)
    work = iter(sorted(range(nv, len(grads)), key=lambda i: -grads[i].numel()))  # biggest first, so the last
    # ones handed out are short; next() on it is atomic under the GIL, so workers can share it

    def run():
        with torch.no_grad():  # grad mode is per thread
            for i in work:
                u0, u1 = offsets[i], offsets[i + 1]
                _clip_units(params[i], grads[i], gn[u0:u1], f[u0:u1], lam, eps)

    threads = torch.get_num_threads()
    jobs = [_serial_workers(threads).submit(run) for _ in range(threads)] if threads > 1 else []
    if nv:  # tiny, so this thread's ops on them run serially
        _clip_vectors(params[:nv], grads[:nv], gn[:nv], f[:nv], lam, eps)
    if not jobs:
        run()
    for j in jobs:
        j.result()
    before = gn.astype(np.float64)  # no BLAS dot: numpy's would start its own threads
    after = before * f
    return torch.from_numpy(f < 1), _scalar((before * before).sum()), _scalar((after * after).sum())


def _scalar(x) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float32)


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
            clip = _clip_blocked if grads[0].device.type == "cpu" else _clip_fused
            hit, before, after = clip(params, grads, nv, sizes, clip_threshold, eps)
            clipped.append(hit)
            names += [n for n, _ in vecs] + [n for n, _ in mats]
            units += sizes
            sq_before.append(before)
            sq_after.append(after)

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

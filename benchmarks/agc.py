"""AGC speed: nfnet.adaptive_grad_clip_ vs timm.utils.adaptive_clip_grad on all of nfnet_f0's gradients
(classifier excluded for both), same random gradients, and vs the memory floor, all interleaved in one run.

Two gradient regimes, both printed; the RESULT lines report `layered`:
- layered: each tensor gets random gradients whose unit-norm ratio ‖G_i‖/‖W_i‖ sits around its own
  layer-wide level, drawn log-uniformly in [λ/30, 3λ], so about a quarter of the layers clip (clipping in
  training concentrates in some layers);
- all: every unit clips.
Floor: what any AGC must move through memory, done as cheaply as this machine can: one contiguous read of as
many bytes as W and G (the faster of a sum and a row-norm over one flat buffer), then one in-place pass over
as many elements as the clipping units hold. `agc_floor` = ours ÷ floor. On the CPU `ours` is the cache-blocked
torch-op path (nfnet/agc.py `_clip_blocked`), on a GPU the fused multi-tensor one.
"""

import os
import statistics

import torch
from _common import agc_vs_timm, describe, parser, setup, time_many
from timm.utils import adaptive_clip_grad

from nfnet import adaptive_grad_clip_, agc_parameters, create_model


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--clip-threshold", type=float, default=0.01, help="λ")
    p.set_defaults(reps=15)  # a ~20 ms call on a shared 2-core box: more interleaved repetitions steady the median
    args = p.parse_args()
    device = setup(args)
    torch.manual_seed(0)
    model = create_model("nfnet_f0").to(device)
    named = agc_parameters(model)
    params = [p for _, p in named]
    n = sum(p.numel() for p in params)
    flat = torch.randn(2 * n, device=device)  # the floor's buffer: as many floats as W and G together
    gen = torch.Generator().manual_seed(0)
    results = {regime: measure(named, params, regime, args, device, gen, flat) for regime in ("all", "layered")}
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"device: {describe(device)}{load}; {len(params)} tensors, {n / 1e6:.1f}M params, λ {args.clip_threshold}; "
          f"median (min) of {args.reps} interleaved repetitions")
    for regime, (t, units, elems) in results.items():
        line = ", ".join(f"{k} {statistics.median(v) * 1e3:.2f} ({min(v) * 1e3:.2f}) ms" for k, v in t.items())
        print(f"[{regime:7s}] units clipped {units:.3f}, elements in them {elems:.3f}: {line}")
    t = results["layered"][0]
    best = {k: min(v) for k, v in t.items()}
    print(f"ratios of medians: timm ÷ ours {statistics.median(t['timm']) / statistics.median(t['ours']):.2f}, "
          f"ours ÷ floor {statistics.median(t['ours']) / statistics.median(t['floor']):.2f}; "
          f"ours ÷ floor by best run: {best['ours'] / best['floor']:.2f}")
    # RESULT: the median over repetitions of each repetition's own ratio. The calls of one repetition run back to
    # back, so a neighbour's burst of load (this box is shared) hits both sides of a ratio instead of one median.
    print(f"RESULT agc ratio={paired(t['timm'], t['ours']):.2f} target>=3")
    print(f"RESULT agc_floor ratio={paired(t['ours'], t['floor']):.2f} target<=1.25")


def paired(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def make_grads(params, regime: str, lam: float, gen: torch.Generator) -> None:
    for p in params:
        w = p.detach().float().cpu()
        unit_w = w.norm() if w.ndim <= 1 else w.flatten(1).norm(dim=1)
        level = 30.0 if regime == "all" else 10 ** (torch.rand((), generator=gen).item() * 2 - 1.5)
        target = lam * level * unit_w.clamp_min(1e-3) * (1 + 0.05 * torch.randn(unit_w.shape, generator=gen))
        g = torch.randn(w.shape, generator=gen)
        unit_g = g.norm() if g.ndim <= 1 else g.flatten(1).norm(dim=1)
        g *= (target / unit_g).view((-1,) + (1,) * (g.ndim - 1)) if g.ndim > 1 else target / unit_g
        p.grad = g.to(p.device, p.dtype)


def clipped_elements(params, lam: float) -> int:
    """Elements in units that clip, straight from the definition (independent of either implementation)."""
    total = 0
    for p in params:
        w, g = p.detach().float(), p.grad.float()
        if p.ndim <= 1:
            total += int(g.norm() > lam * w.norm().clamp_min(1e-3)) * g.numel()
        else:
            hit = g.flatten(1).norm(dim=1) > lam * w.flatten(1).norm(dim=1).clamp_min(1e-3)
            total += int(hit.sum()) * g[0].numel()
    return total


def measure(named, params, regime, args, device, gen, flat):
    lam = args.clip_threshold
    make_grads(params, regime, lam, gen)
    stats, restore, bad = agc_vs_timm(named, params, lam, rtol=1e-4)
    if bad:
        raise SystemExit(f"[{regime}] results differ from timm's; the timing comparison is meaningless")
    restore()
    n = sum(p.numel() for p in params)
    k = clipped_elements(params, lam)
    rows = flat[: flat.numel() // 4096 * 4096].view(-1, 4096)
    tail = flat[n:n + k]

    def floor_sum():
        flat.sum()
        tail.mul_(0.999)

    def floor_norm():
        torch.linalg.vector_norm(rows, 2, dim=1)
        tail.mul_(0.999)

    fns = {"ours": lambda: adaptive_grad_clip_(named, lam), "timm": lambda: adaptive_clip_grad(params, lam),
           "floor_sum": floor_sum, "floor_norm": floor_norm}
    t = time_many(fns, args.reps, device, restore)
    fast = min(("floor_sum", "floor_norm"), key=lambda f: statistics.median(t[f]))
    t = {k: v for k, v in t.items() if not k.startswith("floor_")} | {"floor": t[fast]}
    return t, stats.fraction_clipped(), k / n


if __name__ == "__main__":
    main()

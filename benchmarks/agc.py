"""AGC speed: nfnet.adaptive_grad_clip_ vs timm.utils.adaptive_clip_grad on all of nfnet_f0's gradients
(classifier excluded for both), same random gradients, median of --reps interleaved repetitions.

Two gradient regimes, both printed; RESULT reports `layered`:
- layered: each tensor gets random gradients whose unit-norm ratio ‖G_i‖/‖W_i‖ sits around its own
  layer-wide level, drawn log-uniformly in [λ/30, 3λ], so about a quarter of the layers clip (clipping in
  training concentrates in some layers);
- all: every unit clips. On CPU clipping is memory-bound: we move W once and G once (+1 write of the clipped
  blocks), timm moves ~9 tensor-sizes, so this regime is bounded near 9/3 = 3x.
"""

import torch
from _common import describe, parser, setup, time_pair
from timm.utils import adaptive_clip_grad

from nfnet import adaptive_grad_clip_, agc_parameters, create_model


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--clip-threshold", type=float, default=0.01, help="λ")
    args = p.parse_args()
    device = setup(args)
    torch.manual_seed(0)
    model = create_model("nfnet_f0").to(device)
    named = agc_parameters(model)
    params = [p for _, p in named]
    gen = torch.Generator().manual_seed(0)
    results = {}
    for regime in ("all", "layered"):
        results[regime] = measure(named, params, regime, args, device, gen)
    print(f"device: {describe(device)}; {len(params)} tensors, "
          f"{sum(p.numel() for p in params) / 1e6:.1f}M params, λ {args.clip_threshold}")
    for regime, (t_ours, t_timm, frac) in results.items():
        print(f"[{regime:7s}] units clipped {frac:.3f}: ours (nfnet.adaptive_grad_clip_) {t_ours * 1e3:8.2f} ms, "
              f"timm (adaptive_clip_grad) {t_timm * 1e3:8.2f} ms, ratio {t_timm / t_ours:.2f}")
    t_ours, t_timm, _ = results["layered"]
    print(f"RESULT agc ratio={t_timm / t_ours:.2f} target>=3")


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


def measure(named, params, regime, args, device, gen):
    make_grads(params, regime, args.clip_threshold, gen)
    saved = [p.grad.clone() for p in params]

    def restore():
        for p, g in zip(params, saved):
            p.grad.copy_(g)

    stats = adaptive_grad_clip_(named, args.clip_threshold)
    ours_result = [p.grad.clone() for p in params]
    restore()
    adaptive_clip_grad(params, args.clip_threshold)
    agree = all(torch.allclose(a, p.grad, rtol=1e-4, atol=1e-8) for a, p in zip(ours_result, params))
    del ours_result
    if not agree:
        raise SystemExit(f"[{regime}] results differ from timm's; the timing comparison is meaningless")
    t_ours, t_timm = time_pair(lambda: adaptive_grad_clip_(named, args.clip_threshold),
                               lambda: adaptive_clip_grad(params, args.clip_threshold), args.reps, device, restore)
    return t_ours, t_timm, stats.fraction_clipped()


if __name__ == "__main__":
    main()

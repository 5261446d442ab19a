"""Procedural 32x32 RGB shape/texture classes: learnable, seed-determined, generated in seconds.

The class is the shape or texture only; position, scale, rotation, both colours and pixel noise are nuisance
jitter, so a model has to learn shape, not colour. Everything is computed a whole class at a time (no per-image
Python).
"""

import math

import torch

CLASS_NAMES = (
    "disk", "square", "ring", "cross", "triangle",
    "h_stripes", "v_stripes", "checker", "diag_stripes", "two_blobs",
)


def _mask(k: int, u: torch.Tensor, v: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """Signed 'inside' score for class k on object coords (u, v) (object spans about [-1, 1])."""
    r = torch.sqrt(u * u + v * v)
    box = 1.0 - torch.maximum(u.abs(), v.abs())  # > 0 inside the unit square
    if k == 0:
        return 1.0 - r
    if k == 1:
        return box * 1.2
    if k == 2:
        return 0.25 - (r - 0.7).abs()
    if k == 3:
        arm = torch.minimum(u.abs(), v.abs())
        return torch.minimum(0.3 - arm, box)
    if k == 4:  # upward triangle: three half-planes
        e1 = v + 0.8
        e2 = 0.8 - v - 1.8 * u.abs()
        return torch.minimum(e1, e2) * 0.8
    # textures fill the object square; period set by freq
    if k == 5:
        t = torch.sin(freq * v)
    elif k == 6:
        t = torch.sin(freq * u)
    elif k == 7:
        t = torch.sin(freq * u) * torch.sin(freq * v) * 2.0
    elif k == 8:
        t = torch.sin(freq * (u + v) * 0.75)
    else:  # two disks side by side
        r1 = torch.sqrt((u - 0.5) ** 2 + v * v)
        r2 = torch.sqrt((u + 0.5) ** 2 + v * v)
        return 0.4 - torch.minimum(r1, r2)
    return torch.minimum(t * 0.5, box)


def check_args(n: int, num_classes: int, image_size: int) -> None:
    """The generator's limits, checked apart so a dataset preparation can refuse before doing any work."""
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"synthetic num_classes must be in 2..{len(CLASS_NAMES)}, got {num_classes}; pass a "
                         "value in that range")
    if n < 0 or image_size < 8:
        raise ValueError(f"synthetic needs n >= 0 and image_size >= 8, got n={n}, image_size={image_size}; "
                         "pass values in those ranges")


def generate(n: int, seed: int, *, num_classes: int = 10, image_size: int = 32, noise: float = 0.12,
             jitter: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (uint8 images [n, H, W, 3] (HWC, the stored layout), int64 labels [n]); fully determined by seed."""
    check_args(n, num_classes, image_size)
    g = torch.Generator().manual_seed(int(seed))
    s = image_size
    labels = torch.randint(0, num_classes, (n,), generator=g)

    def rand(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    # nuisance parameters, one draw per image
    cx, cy = rand(n, lo=-0.35, hi=0.35) * jitter, rand(n, lo=-0.35, hi=0.35) * jitter
    scale = rand(n, lo=0.45, hi=0.85)
    angle = rand(n, lo=-0.35, hi=0.35) * jitter  # radians; small so h/v/diag stripes stay distinct
    freq = rand(n, lo=4.0, hi=7.0)
    bg = rand(n, 3)
    contrast = rand(n, 1, lo=0.25, hi=0.7)
    fg = (bg + contrast * torch.where(bg < 0.5, 1.0, -1.0) * rand(n, 3, lo=0.6, hi=1.0)).clamp(0, 1)
    sharp = rand(n, lo=6.0, hi=14.0)

    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = torch.empty(n, s, s, 3, dtype=torch.uint8)
    for k in range(num_classes):
        idx = (labels == k).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        c, sn = torch.cos(angle[idx]).view(-1, 1, 1), torch.sin(angle[idx]).view(-1, 1, 1)
        dx, dy = xx - cx[idx].view(-1, 1, 1), yy - cy[idx].view(-1, 1, 1)
        sc = scale[idx].view(-1, 1, 1)
        u, v = (c * dx + sn * dy) / sc, (-sn * dx + c * dy) / sc
        m = torch.sigmoid(_mask(k, u, v, freq[idx].view(-1, 1, 1) * math.pi / 2) * sharp[idx].view(-1, 1, 1) * 4)
        m = m.unsqueeze(-1)
        img = bg[idx].view(-1, 1, 1, 3) * (1 - m) + fg[idx].view(-1, 1, 1, 3) * m
        img += noise * torch.randn(len(idx), s, s, 3, generator=g)
        out[idx] = (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    return out, labels

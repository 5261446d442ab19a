"""The divergence monitor and the gradient noise scale."""

import pytest
import torch

from studies.training import monitors


def test_gradient_noise_scale_recovers_known_value():
    # Per-example gradients g = G + noise with Σ = σ²I: B_simple = tr(Σ)/|G|² = d σ² / |G|².
    g = torch.Generator().manual_seed(0)
    d, sigma = 50, 2.0
    G = torch.randn(d, generator=g)
    truth = d * sigma**2 / G.square().sum().item()
    est = monitors.GradNoiseScale(decay=0.99)
    b_small, b_big = 16, 128
    for _ in range(3000):
        noise = sigma * torch.randn(b_big, d, generator=g)
        small = (G + noise[:b_small].mean(0)).square().sum().item()
        big = (G + noise.mean(0)).square().sum().item()
        est.update(small, b_small, big, b_big)
    assert est.value == pytest.approx(truth, rel=0.15)

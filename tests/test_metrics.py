"""Image metrics against closed forms and a direct per-window implementation of SSIM."""
import math

import pytest
import torch

import metrics


def test_psnr_closed_form_and_mask():
    target = torch.zeros(2, 3, 8, 8)
    prediction = target.clone()
    prediction[0] += 0.1                 # MSE 0.01 everywhere
    prediction[1, :, :4] += 0.2          # MSE 0.04 on the top half, 0 on the bottom
    expected = 10 * math.log10(4 / 0.01)
    assert metrics.psnr(prediction, target)[0].item() == pytest.approx(expected)
    top = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    top[:, :, :4] = True
    masked = metrics.psnr(prediction, target, mask=top)
    assert masked[1].item() == pytest.approx(10 * math.log10(4 / 0.04))
    everywhere = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    assert torch.allclose(metrics.psnr(prediction, target, mask=everywhere),
                          metrics.psnr(prediction, target))


def ssim_by_windows(x, y, data_range=2.0):
    """SSIM of (C, H, W) images computed window by window with explicit weighted sums."""
    size, sigma = metrics.SSIM_WINDOW, metrics.SSIM_SIGMA
    offsets = torch.arange(size, dtype=torch.double) - (size - 1) / 2
    g = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    w = torch.outer(g, g) / g.sum() ** 2
    c1 = (metrics.SSIM_K[0] * data_range) ** 2
    c2 = (metrics.SSIM_K[1] * data_range) ** 2
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                a = x[c, i:i + size, j:j + size].double()
                b = y[c, i:i + size, j:j + size].double()
                mu_a, mu_b = (w * a).sum(), (w * b).sum()
                var_a = (w * (a - mu_a) ** 2).sum()
                var_b = (w * (b - mu_b) ** 2).sum()
                cov = (w * (a - mu_a) * (b - mu_b)).sum()
                values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                              / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return torch.stack(values).mean()


def test_ssim_matches_a_per_window_computation():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 14, 13, generator=generator) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)
    got = metrics.ssim(x, y)
    for b in range(2):
        assert got[b].item() == pytest.approx(ssim_by_windows(x[b], y[b]).item(), rel=1e-9)


def test_ssim_of_identical_and_of_constant_images():
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert metrics.ssim(x, x).item() == pytest.approx(1.0)
    a, b = torch.full((1, 1, 12, 12), 0.2), torch.full((1, 1, 12, 12), -0.4)
    c1 = (0.01 * 2) ** 2  # no variance: only the luminance term is left
    expected = (2 * 0.2 * -0.4 + c1) / (0.2 ** 2 + 0.4 ** 2 + c1)
    assert metrics.ssim(a, b).item() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="at least 11"):
        metrics.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))

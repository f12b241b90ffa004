"""metrics.py against closed forms: PSNR, SSIM (and a direct per-window implementation of it),
slot IoU with its one assignment for the set, region confusion, verification, pose error."""
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
    with pytest.raises(AssertionError, match="at least 11"):
        metrics.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_slot_iou_assigns_slots_once_for_the_set():
    # confusion (K slots, R regions): slot 0 covers region 1, slot 1 region 0, and so on
    confusion = torch.tensor([[0, 10, 0, 0], [8, 0, 2, 0], [0, 0, 0, 5], [0, 1, 6, 0]],
                             dtype=torch.double)
    expected = torch.tensor([8 / 10, 10 / 11, 6 / 9, 5 / 5], dtype=torch.double)
    torch.testing.assert_close(metrics.slot_iou(confusion), expected, rtol=0, atol=1e-15)
    # a fifth slot joins the region it overlaps most; a region nobody has scores 1
    extra = torch.cat([confusion, torch.tensor([[0.0, 0, 3, 0]], dtype=torch.double)])
    expected[2] = 9 / 12  # slots 3 and 4 make region 2: 9 hits, union 10 + 11 - 9
    torch.testing.assert_close(metrics.slot_iou(extra), expected, rtol=0, atol=1e-15)
    empty = torch.zeros(4, 4, dtype=torch.double)
    empty[0, 0] = 1
    assert metrics.slot_iou(empty).tolist() == [1.0, 1.0, 1.0, 1.0]


def test_region_confusion_counts_argmax_pixels():
    masks = torch.zeros(1, 2, 2, 2)
    masks[0, 1, 0] = 1  # slot 1 wins the top row, slot 0 the bottom one
    regions = torch.tensor([[[0, 3], [3, 3]]])
    expected = torch.zeros(2, 4, dtype=torch.double)
    expected[1, 0], expected[1, 3], expected[0, 3] = 1, 1, 2
    assert torch.equal(metrics.region_confusion(masks, regions), expected)


def test_verification_accuracy_at_the_best_threshold():
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    labels = torch.tensor([0, 0, 1, 1])
    # pairs by similarity: 1 (same), .8, .8 (different), .6 (same), 0, 0 (different): the best
    # threshold calls only the first pair "same", 5 of 6 right
    result = metrics.verification(embeddings, labels)
    assert result["accuracy"] == pytest.approx(5 / 6)
    assert result["csim_same"] == pytest.approx(0.8)
    assert result["csim_different"] == pytest.approx(0.4)


def test_head_pose_error_wraps_around():
    yaw = torch.tensor([[0.0, math.radians(179), 0.0]])
    other = torch.tensor([[0.0, math.radians(-179), 0.0]])
    torch.testing.assert_close(metrics.head_pose_error(yaw, other),
                               torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.double), atol=1e-4,
                               rtol=0)

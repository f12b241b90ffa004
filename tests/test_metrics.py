"""metrics.py against closed forms: PSNR (whole, masked, per region), SSIM (and a direct
per-window implementation of it), slot IoU with its one assignment for the set and with the fixed
binding, region confusion, verification, pose error, the expression distance in millimetres of
FLAME's mesh, face-only images."""
import math

import pytest
import torch
import torch.nn.functional as F

from training import metrics
from flame import FLAME
from layers import FACE, HAIR, REGION_NAMES


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


def test_region_psnr_is_the_masked_psnr_of_each_region_and_nan_without_it():
    target = torch.zeros(2, 3, 4, 4)
    prediction = target.clone()
    prediction[:, :, :2] += 0.1          # MSE 0.01 on the top half
    prediction[:, :, 2:] += 0.2          # MSE 0.04 on the bottom half
    regions = torch.full((2, 4, 4), FACE)
    regions[:, 2:] = HAIR
    regions[1, 3, 3] = len(REGION_NAMES) - 1  # image 1 has one background pixel
    scores = metrics.region_psnr(prediction, target, regions)
    assert list(scores) == [f"psnr_{name}" for name in REGION_NAMES]
    assert scores["psnr_face"].tolist() == pytest.approx([10 * math.log10(4 / 0.01)] * 2)
    assert scores["psnr_hair"][0].item() == pytest.approx(10 * math.log10(4 / 0.04))
    assert scores["psnr_background"][1].item() == pytest.approx(10 * math.log10(4 / 0.04))
    assert scores["psnr_clothes"].isnan().all() and scores["psnr_background"][0].isnan()
    assert metrics.psnr(target, target, mask=regions[:, None] == FACE).isinf().all()


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


def test_fixed_binding_iou_is_the_matched_one_only_for_slots_in_region_order():
    in_order = torch.tensor([[9, 1, 0, 0], [1, 7, 2, 0], [0, 0, 6, 1], [0, 2, 0, 8]],
                            dtype=torch.double)  # slot k overlaps region k most
    fixed = metrics.slot_iou(in_order, fixed=True)
    torch.testing.assert_close(fixed, metrics.slot_iou(in_order), rtol=0, atol=0)
    torch.testing.assert_close(fixed, torch.tensor([9 / 11, 7 / 13, 6 / 9, 8 / 11],
                                                   dtype=torch.double), rtol=0, atol=1e-15)
    permuted = in_order[[1, 0, 3, 2]]  # the same masks, slots bound to the wrong regions
    torch.testing.assert_close(metrics.slot_iou(permuted), metrics.slot_iou(in_order))
    assert (metrics.slot_iou(permuted, fixed=True) < 0.2).all()
    with pytest.raises(AssertionError, match="fixed binding"):
        metrics.slot_iou(torch.ones(8, 4, dtype=torch.double), fixed=True)


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


def test_expression_distance_in_millimetres_of_mesh():
    """0 for equal expressions whatever the shape-free pose; one coefficient e_k moves every
    vertex by e_k times its blendshape E_k (zero pose: no pose correctives), so the distance is
    |e_k| · mean_v ‖E_k[v]‖ in metres, ×1000."""
    flame = FLAME()
    generator = torch.Generator().manual_seed(0)
    a = {"expression": torch.randn(2, flame.n_exp, generator=generator),
         "pose": torch.randn(2, 6, generator=generator) * 0.1}
    b = {"expression": a["expression"].clone(), "pose": a["pose"].clone()}
    b["pose"][:, :3] += 0.3  # the global pose is left out
    assert metrics.expression_distance(flame, a, b).abs().max() < 1e-9
    zero = {"expression": torch.zeros(1, flame.n_exp), "pose": torch.zeros(1, 6)}
    k, value = 3, 0.7
    one = {"expression": zero["expression"].clone(), "pose": zero["pose"]}
    one["expression"][0, k] = value
    direction = flame.blenddirs[:, :, flame.n_shape + k].double()  # (V, 3)
    expected = value * direction.norm(dim=1).mean().item() * 1000
    assert metrics.expression_distance(flame, one, zero).item() == pytest.approx(expected,
                                                                                 rel=1e-5)
    jaw = {"expression": zero["expression"], "pose": zero["pose"].clone()}
    jaw["pose"][0, 3] = 0.2  # an open jaw moves the chin by centimetres: millimetres on average
    assert metrics.expression_distance(flame, jaw, zero).item() > 1


def test_face_only_keeps_face_pixels_and_sets_the_rest_to_grey():
    images = torch.rand(2, 3, 4, 4) * 2 - 1
    regions = torch.randint(len(REGION_NAMES), (2, 4, 4))
    masked = metrics.face_only(images, regions)
    face = (regions == FACE)[:, None].expand_as(images)
    assert torch.equal(masked[face], images[face]) and (masked[~face] == 0).all()


def test_face_detail_on_hand_made_cases():
    """The target gives 1 and 1; a blurred copy less detail; added noise more detail and a low
    correlation; a copy shifted by one pixel keeps its detail and loses its correlation."""
    torch.manual_seed(0)
    target = torch.rand(4, 3, 32, 32) * 2 - 1
    regions = torch.full((4, 32, 32), FACE + 1)
    regions[:, 4:28, 4:28] = FACE
    def detail(x):
        return metrics.face_detail(x, target, regions)

    same = detail(target)
    assert torch.allclose(same["face_detail_ratio"], torch.ones(4, dtype=torch.float64))
    assert torch.allclose(same["face_detail_correlation"], torch.ones(4, dtype=torch.float64))
    blurred = F.avg_pool2d(target, 3, stride=1, padding=1, count_include_pad=False)
    assert (detail(blurred)["face_detail_ratio"] < 0.5).all()
    noisy = detail(target + torch.randn_like(target))
    assert (noisy["face_detail_ratio"] > 2).all() and (noisy["face_detail_correlation"] < 0.7).all()
    shifted = detail(torch.roll(target, 1, dims=3))
    assert torch.allclose(shifted["face_detail_ratio"], torch.ones(4, dtype=torch.float64),
                          atol=0.15)
    # for white noise, L∗x at a one-pixel lag correlates (−4·1 + 1·(−4)) / (16 + 4) = −0.4
    assert torch.allclose(shifted["face_detail_correlation"],
                          torch.full((4,), -0.4, dtype=torch.float64), atol=0.1)


def test_face_detail_ratio_matches_the_laplacian_written_out():
    """The ratio against a target of known Laplacian: a lone bright pixel in the eroded face."""
    target = torch.zeros(1, 1, 9, 9)
    target[0, 0, 4, 4] = 1.0  # its Laplacian: −4 at the centre, 1 at the four neighbours
    regions = torch.full((1, 9, 9), FACE)
    assert torch.equal(metrics.laplacian(target)[0, 0, 3:6, 3:6],
                       torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]))
    twice = metrics.face_detail(2 * target, target, regions)
    assert torch.allclose(twice["face_detail_ratio"], torch.tensor([4.0], dtype=torch.float64))

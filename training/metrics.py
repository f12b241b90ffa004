"""Measurements shared by training, evaluation and benchmarks: one implementation of each
(DiffFAE §5.1 scores edits by APD, AED, ALD and CSIM; with an exact target we add PSNR and
SSIM, and a slot-mask IoU puts a number on the semantic predictions the paper shows in App. A).

- PSNR = 10·log10(R² / MSE) with R the data range (2 for images in [-1, 1]).
- SSIM (Wang et al. 2004, Eq. 13) with their constants: an 11×11 Gaussian window of σ = 1.5,
  C1 = (0.01·R)², C2 = (0.03·R)², per channel, averaged over the valid (unpadded) windows:
  SSIM = (2μxμy + C1)(2σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)).
- Region PSNR: the PSNR over one region's pixels (layers.REGION_NAMES), undefined (NaN) for an
  image without that region.
- Slot-mask IoU: slots are assigned to regions ONCE for a whole set (not per image), because the
  method relies on a fixed slot → region binding (the face token taken from the source, hair /
  clothes / background tokens swapped by index; DiffFAE §4.2, App. G). "Matched": with as many
  slots as regions the assignment is one-to-one (Hungarian, Kuhn 1955, on the pixel-overlap
  matrix); otherwise each slot goes to the region it overlaps most. "Fixed": slot k is region
  k, the binding the method uses; it is below the matched IoU when the slots drift to other
  regions. IoU_r = |pred_r ∩ gt_r| / |pred_r ∪ gt_r|.
- Head-pose error: FLAME's global axis-angle → intrinsic yaw (y), pitch (x), roll (z) in degrees.
- Expression distance: the mean per-vertex distance in millimetres between two FLAME meshes that
  differ only by expression ψ and jaw (zero shape, zero global pose). Coefficients weigh by how
  far they move the surface, so the many small ones that do not show at 64 px count little, and
  an open jaw counts as much as it moves the chin.
- Face detail (the fine structure PSNR overlooks, since it rewards blur): L = the 3×3 Laplacian
  [0 1 0; 1 −4 1; 0 1 0] of each channel of an image in [−1, 1]; over the target's face region
  eroded by one pixel (3×3), the detail ratio is mean_pixels Σ_c (L∗x)² / the same of the
  target (1: the target's detail, below: blur, above: noise), and the detail correlation is the
  Pearson correlation of L∗x and L∗target (the right detail, not invented detail). Reported as
  medians over images.
- Face-only images: pixels outside the face region set to 0 (mid grey), so that an identity
  embedding compares faces, not hair, clothes and backdrop.
- Face verification: accuracy of "same person" ⇔ cosine similarity > τ over all pairs, at the best
  τ for the set (an upper bound; we report it as such), and the mean similarity of same and
  different pairs.

Letters: B batch, K slots, R regions, H/W image size, D embedding size.
"""
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.spatial.transform import Rotation

from flame import head_pose_degrees, pose6_to_flame15
from layers import FACE, REGION_NAMES, laplacian

MILLIMETRES = 1000  # FLAME's unit is the metre


def psnr(prediction, target, data_range=2.0, mask=None):
    """Per-image PSNR in dB of (B, C, H, W) tensors (infinite for identical images); with a
    mask (B, 1, H, W) the mean squared error is taken over the masked pixels only (NaN for an
    empty mask)."""
    assert prediction.shape == target.shape, (prediction.shape, target.shape)
    error = (prediction.double() - target.double()).pow(2)  # (B, C, H, W)
    if mask is None:
        mse = error.flatten(1).mean(1)  # (B,)
    else:
        weight = mask.double().expand_as(error)
        mse = (error * weight).flatten(1).sum(1) / weight.flatten(1).sum(1)  # 0/0 = NaN
    return 10 * torch.log10(data_range ** 2 / mse)


def region_psnr(prediction, target, regions):
    """{"psnr_face", "psnr_hair", ...}: per-image PSNR (B,) over each region of `regions`
    (B, H, W), NaN where an image lacks the region."""
    return {f"psnr_{name}": psnr(prediction, target, mask=(regions == r)[:, None])
            for r, name in enumerate(REGION_NAMES)}


def face_detail(prediction, target, regions):
    """{"face_detail_ratio", "face_detail_correlation"}: per image (B,), over the face region of
    `regions` (B, H, W) eroded by one pixel (module docstring); NaN without a face."""
    face = (regions == FACE)[:, None].double()  # (B, 1, H, W)
    inside = -F.max_pool2d(-face, 3, stride=1, padding=1)  # 3×3 erosion
    lp, lt = laplacian(prediction.double()), laplacian(target.double())  # (B, C, H, W)
    weight = inside.expand_as(lp)

    def mean(values):  # over the eroded face's pixels and the channels: (B,)
        return (values * weight).flatten(1).sum(1) / weight.flatten(1).sum(1)

    cp, ct = (l - mean(l)[:, None, None, None] for l in (lp, lt))
    return {"face_detail_ratio": mean(lp ** 2) / mean(lt ** 2),
            "face_detail_correlation": mean(cp * ct) / (mean(cp ** 2) * mean(ct ** 2)).sqrt()}


def face_only(images, regions):
    """images (B, 3, H, W) in [-1, 1] with every pixel outside the face of `regions` (B, H, W)
    set to 0, mid grey (see the module docstring)."""
    return images * (regions == FACE)[:, None].to(images.dtype)


SSIM_WINDOW = 11  # Wang et al. 2004 §III-C
SSIM_SIGMA = 1.5
SSIM_K = (0.01, 0.03)


def ssim(prediction, target, data_range=2.0):
    """Per-image SSIM (B,) of (B, C, H, W) tensors with H, W ≥ 11 (see the module docstring)."""
    assert prediction.shape == target.shape, (prediction.shape, target.shape)
    assert min(prediction.shape[-2:]) >= SSIM_WINDOW, f"ssim: at least {SSIM_WINDOW} px a side"
    x, y = prediction.double(), target.double()
    channels = x.shape[1]
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.double) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-offsets ** 2 / (2 * SSIM_SIGMA ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(channels, 1, -1, -1).to(x.device)  # (C, 1, 11, 11)

    def blur(image):  # Gaussian-weighted local mean, one channel at a time (groups = C)
        return F.conv2d(image, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K[0] * data_range) ** 2, (SSIM_K[1] * data_range) ** 2
    index = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x ** 2 + mu_y ** 2 + c1)
                                                       * (var_x + var_y + c2))
    return index.flatten(1).mean(1)


def region_confusion(slot_masks, regions, n_regions=len(REGION_NAMES)):
    """Pixel counts (K, R): how often slot k wins a pixel (argmax over slots) whose ground-truth
    region is r. slot_masks (B, K, H, W) at the image resolution, regions (B, H, W) long."""
    assert slot_masks[:, 0].shape == regions.shape, (slot_masks.shape, regions.shape)
    n_slots = slot_masks.shape[1]
    winner = slot_masks.argmax(1)  # (B, H, W)
    pair = (winner * n_regions + regions).flatten()
    counts = torch.bincount(pair, minlength=n_slots * n_regions)
    return counts.reshape(n_slots, n_regions).double()


def slot_iou(confusion, fixed=False):
    """Per-region IoU (R,) of slot masks from their confusion counts (K, R) over a set: slots
    assigned to regions once for the set, or with `fixed`, slot k taken as region k (K = R; see
    the module docstring)."""
    overlap = confusion.cpu().numpy()
    assignment = overlap.argmax(1)  # (K,) region of each slot
    if fixed:
        assert overlap.shape[0] == overlap.shape[1], f"fixed binding of {overlap.shape[0]} slots"
        assignment[:] = range(len(assignment))
    elif overlap.shape[0] == overlap.shape[1]:
        slots, regions = linear_sum_assignment(-overlap)
        assignment[slots] = regions
    n_regions = confusion.shape[1]
    merged = torch.zeros(n_regions, n_regions, dtype=confusion.dtype)
    merged.index_add_(0, torch.as_tensor(assignment), confusion)  # (R predicted, R true)
    hits = merged.diag()
    union = merged.sum(0) + merged.sum(1) - hits
    return torch.where(union > 0, hits / union.clamp(min=1), torch.ones_like(hits))


def head_pose_error(pose, true_pose):
    """Per-image yaw, pitch and roll errors (B, 3) in degrees, wrapped to [0, 180]."""
    error = head_pose_degrees(pose) - head_pose_degrees(true_pose)
    return ((error + 180) % 360 - 180).abs()


def rotation_error(pose, true_pose):
    """Per-image geodesic angle (B,) in degrees between two global head rotations (axis-angle
    pose[..., :3]): the angle of the rotation R_trueᵀ·R that takes one to the other."""
    rotations = [Rotation.from_rotvec(p[..., :3].detach().double().cpu().numpy().reshape(-1, 3))
                 for p in (pose, true_pose)]
    return torch.as_tensor((rotations[1].inv() * rotations[0]).magnitude()).rad2deg()


def expression_vertices(flame, coefficients):
    """FLAME vertices (B, V, 3) of a coefficient dict's (the estimator's keys) expression ψ and
    jaw (pose[:, 3:]) alone: zero shape and zero global pose."""
    jaw_only = torch.cat([torch.zeros_like(coefficients["pose"][:, :3]),
                          coefficients["pose"][:, 3:]], 1)
    shape = jaw_only.new_zeros(len(jaw_only), flame.n_shape)
    return flame(shape, coefficients["expression"], pose6_to_flame15(jaw_only))


def expression_distance(flame, coefficients, true_coefficients):
    """Per-image mean vertex distance (B,) in mm between the expression meshes
    (expression_vertices) of two coefficient dicts (see the module docstring)."""
    difference = (expression_vertices(flame, coefficients)
                  - expression_vertices(flame, true_coefficients))  # (B, V, 3)
    return difference.double().norm(dim=2).mean(1) * MILLIMETRES


def verification(embeddings, labels):
    """Accuracy at the best threshold and the mean cosine similarity of same / different pairs.
    embeddings (N, D) unit vectors, labels (N,) ints. Returns a dict of floats."""
    similarity = embeddings @ embeddings.T  # (N, N)
    upper = torch.triu(torch.ones_like(similarity, dtype=torch.bool), diagonal=1)
    same = (labels[:, None] == labels[None, :])[upper]
    scores = similarity[upper]
    order = scores.argsort(descending=True)
    same_sorted = same[order].double()
    # predicting "same" for the top t pairs: correct = same among them + different among the rest
    correct = torch.cat([torch.zeros(1, dtype=torch.double), same_sorted.cumsum(0)])
    different_rest = (1 - same_sorted).sum() - torch.cat([torch.zeros(1, dtype=torch.double),
                                                          (1 - same_sorted).cumsum(0)])
    accuracy = ((correct + different_rest) / len(scores)).max()
    return {"accuracy": float(accuracy), "csim_same": float(scores[same].mean()),
            "csim_different": float(scores[~same].mean())}

"""Measurements shared by training, evaluation and benchmarks: one implementation of each.

- PSNR = 10·log10(R² / MSE) with R the data range (2 for images in [-1, 1]).
- Slot-mask IoU: slots are assigned to regions ONCE for a whole set (not per image), because the
  method relies on a fixed slot → region binding (the face token taken from the source, hair /
  clothes / background tokens swapped by index; DiffFAE §4.2, App. G). With as many slots as
  regions the assignment is one-to-one (Hungarian, Kuhn 1955, on the pixel-overlap matrix);
  otherwise each slot goes to the region it overlaps most.
  IoU_r = |pred_r ∩ gt_r| / |pred_r ∪ gt_r|.
- Head-pose error: FLAME's global axis-angle → intrinsic yaw (y), pitch (x), roll (z) in degrees.
- Face verification: accuracy of "same person" ⇔ cosine similarity > τ over all pairs, at the best
  τ for the set (an upper bound; we report it as such), and the mean similarity of same and
  different pairs.

Letters: B batch, K slots, R regions, H/W image size, D embedding size.
"""
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.transform import Rotation


def psnr(prediction, target, data_range=2.0):
    """Per-image PSNR in dB of (B, C, H, W) tensors (infinite for identical images)."""
    if prediction.shape != target.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(prediction.shape)} vs {tuple(target.shape)}")
    mse = (prediction.double() - target.double()).pow(2).flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(data_range ** 2 / mse)


def region_confusion(slot_masks, regions, n_regions=4):
    """Pixel counts (K, R): how often slot k wins a pixel (argmax over slots) whose ground-truth
    region is r. slot_masks (B, K, H, W) at the image resolution, regions (B, H, W) long."""
    if slot_masks.shape[0] != regions.shape[0] or slot_masks.shape[2:] != regions.shape[1:]:
        raise ValueError(f"region_confusion: masks {tuple(slot_masks.shape)} do not match "
                         f"regions {tuple(regions.shape)}")
    n_slots = slot_masks.shape[1]
    winner = slot_masks.argmax(1)  # (B, H, W)
    pair = (winner * n_regions + regions).flatten()
    counts = torch.bincount(pair, minlength=n_slots * n_regions)
    return counts.reshape(n_slots, n_regions).double()


def assign_slots(confusion):
    """Slot → region map (K,) for a whole set (see the module docstring)."""
    overlap = confusion.cpu().numpy()
    if overlap.shape[0] == overlap.shape[1]:
        slots, regions = linear_sum_assignment(-overlap)
        assignment = np.empty(len(slots), dtype=np.int64)
        assignment[slots] = regions
        return torch.as_tensor(assignment)
    return torch.as_tensor(overlap.argmax(1))


def slot_iou(confusion, assignment=None):
    """Per-region IoU (R,) of slot masks merged by `assignment` (default `assign_slots`)."""
    assignment = assign_slots(confusion) if assignment is None else assignment
    n_regions = confusion.shape[1]
    merged = torch.zeros(n_regions, n_regions, dtype=confusion.dtype)
    merged.index_add_(0, assignment.to(torch.long), confusion)  # (R predicted, R true)
    hits = merged.diag()
    union = merged.sum(0) + merged.sum(1) - hits
    return torch.where(union > 0, hits / union.clamp(min=1), torch.ones_like(hits))


def head_pose_degrees(pose):
    """(B, 3) yaw, pitch, roll in degrees from FLAME's global axis-angle pose[..., :3]."""
    rotvec = pose[..., :3].detach().double().cpu().numpy().reshape(-1, 3)
    angles = Rotation.from_rotvec(rotvec).as_euler("YXZ", degrees=True)
    return torch.as_tensor(angles)


def angle_error_degrees(a, b):
    """Absolute differences of angles in degrees, wrapped to [0, 180]."""
    return ((a - b + 180) % 360 - 180).abs()


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

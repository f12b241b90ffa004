"""Slot masks and attention maps as pictures, for the --explain figure (tools/explain.py) and the
training stages' grids: tensors in, tensors out, images in [-1, 1].

A map m (B, K, h, w) that sums to 1 over its K slots is painted as the mixture Σ_k m_k·colour_k
of the slots' colours (slot_colour, in the order of layers.REGION_NAMES).

Letters: B batch, K slots, H/W image size, h/w map size.
"""
import torch
import torch.nn.functional as F

from layers import REGION_COLOURS

TINT = 0.65           # opacity of a slot's colour where its mask is 1
DIM = 0.35            # brightness of the image outside a slot's mask


def slot_colour(k):
    """(3,) the colour of slot k: region k's, repeating past the four regions."""
    return REGION_COLOURS[k % len(REGION_COLOURS)]

def enlarge(images, size):
    """Nearest-neighbour resize of (B, C, h, w) to size (int or (H, W)): every value kept as it
    is, so maps that sum to 1 over C still do."""
    return F.interpolate(images, size=size, mode="nearest")


def paint(masks):
    """Maps (B, K, h, w) as the colour Σ_k m_k·colour_k, in [-1, 1]: (B, 3, h, w). For maps that
    sum to 1 over K, a mixture of the slots' colours."""
    colours = torch.stack([slot_colour(k) for k in range(masks.shape[1])]).to(masks)  # (K, 3)
    return torch.einsum("bkhw,kc->bchw", masks, colours) * 2 - 1


def paint_one(masks, k):
    """Map k of (B, K, h, w) alone in slot k's colour, black where it is 0: (B, 3, h, w)."""
    alone = torch.zeros_like(masks)
    alone[:, k] = masks[:, k]
    return paint(alone)


def overlay(images, masks):
    """The painted masks over the faded images: images (B, 3, H, W) in [-1, 1], masks (B, K,
    h, w) → (B, 3, H, W)."""
    return images + TINT * (paint(enlarge(masks, images.shape[-2:])) - images)


def argmax_map(images, masks):
    """Each pixel in the colour of the slot whose mask wins it, over the faded images: images
    (B, 3, H, W) in [-1, 1], masks (B, K, h, w) → (B, 3, H, W)."""
    winner = F.one_hot(masks.argmax(1), masks.shape[1]).permute(0, 3, 1, 2)  # (B, K, h, w)
    return overlay(images, winner.to(images))


def mask_rows(images, masks):
    """The slot masks as rows of pictures: for each slot k, m_k tinted over the images in
    colour k (the rest dimmed), then the argmax map. images (B, 3, H, W) in [-1, 1], masks
    (B, K, h, w) summing to 1 over K → K + 1 tensors (B, 3, H, W)."""
    large = enlarge(masks, images.shape[-2:])  # (B, K, H, W)
    dimmed = (images + 1) * DIM - 1
    rows = []
    for k in range(masks.shape[1]):
        colour = slot_colour(k).to(images)[None, :, None, None] * 2 - 1  # (1, 3, 1, 1)
        mask = large[:, k:k + 1]  # (B, 1, H, W)
        rows.append(dimmed + mask * (images + TINT * (colour - images) - dimmed))
    return rows + [argmax_map(images, masks)]


def grid(rows):
    """Rows of (N, 3, H, W) tensors as one picture (3, rows·H, N·W): one row per entry."""
    return torch.cat([torch.cat(list(row), 2) for row in rows], 1)

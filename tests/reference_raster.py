"""A brute-force rasterizer, the independent reference of render.rasterize's tests: written
for obviousness, not speed. Shape letters: B batch, V vertices, F faces, H/W image size,
K (face, pixel) pairs in a chunk."""
import math

import torch

REFERENCE_FACES = 2 ** 15  # faces per chunk (bounds the memory of the (face, pixel) pairs)


def reference_rasterize(verts, faces, image_size):
    """The independent reference for render.rasterize. Brute force:
    every face against every pixel centre of its bounding box (enumerated with
    repeat_interleave), inclusive edge tests, then a two-pass z-buffer (minimum depth, then the
    lowest face index at that depth). verts (B, V, 3) screen space -> pix_to_face (B, H, W)."""
    B, nF, H, W = verts.shape[0], faces.shape[0], image_size, image_size
    tri = verts[:, faces].reshape(B * nF, 3, 3)  # (B·F, 3, 3)
    x, y, z = tri.unbind(-1)  # (B·F, 3) each
    left = torch.ceil(x.amin(-1) - 0.5).clamp(0, W).long()
    top = torch.ceil(y.amin(-1) - 0.5).clamp(0, H).long()
    box_w = (torch.floor(x.amax(-1) - 0.5).clamp(-1, W - 1).long() - left + 1).clamp(min=0)
    box_h = (torch.floor(y.amax(-1) - 0.5).clamp(-1, H - 1).long() - top + 1).clamp(min=0)
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])
    count = torch.where(area != 0, box_w * box_h, 0)  # (B·F,) pixels to test per face
    depth_buf = torch.full((B * H * W,), math.inf, device=verts.device, dtype=verts.dtype)
    found = []
    for ids in torch.arange(B * nF, device=verts.device).split(REFERENCE_FACES):
        face = ids.repeat_interleave(count[ids])  # (K,) one entry per (face, pixel) pair
        start = torch.cumsum(count[ids], 0) - count[ids]
        k = torch.arange(len(face), device=verts.device) - start.repeat_interleave(count[ids])
        row = top[face] + k // box_w[face]
        col = left[face] + k % box_w[face]
        px, py = col + 0.5, row + 0.5
        w = [(x[face, (i + 2) % 3] - x[face, (i + 1) % 3]) * (py - y[face, (i + 1) % 3])
             - (y[face, (i + 2) % 3] - y[face, (i + 1) % 3]) * (px - x[face, (i + 1) % 3])
             for i in range(3)]  # 3 × (K,) edge functions
        hit = ((w[0] >= 0) & (w[1] >= 0) & (w[2] >= 0)) | ((w[0] <= 0) & (w[1] <= 0) & (w[2] <= 0))
        depth = (w[0] * z[face, 0] + w[1] * z[face, 1] + w[2] * z[face, 2]) / area[face]
        pixel = (face // nF * H + row) * W + col
        depth_buf.scatter_reduce_(0, pixel[hit], depth[hit], "amin")
        found.append((pixel[hit], depth[hit], face[hit] % nF))
    face_buf = torch.full((B * H * W,), nF, device=verts.device)
    for pixel, depth, face in found:  # second pass: the lowest face index at the minimum depth
        nearest = depth == depth_buf[pixel]
        face_buf.scatter_reduce_(0, pixel[nearest], face[nearest], "amin")
    return torch.where(face_buf < nF, face_buf, -1).view(B, H, W)

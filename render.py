"""Differentiable mesh rendering in plain PyTorch: DECA's orthographic camera, a z-buffer rasterizer,
attribute interpolation, vertex normals, UV texturing and spherical-harmonics shading.

DiffFAE (Wang et al. 2024, §3.1) conditions its UNet on I_R, a Lambertian render of FLAME under the
query's pose, expression, light and camera with the source's shape and albedo, built the way DECA
(Feng et al. 2021) renders. This file is that renderer.

Camera (DECA, orthographic):   ndc_xy = s · (xy + t),   cam = [s, tx, ty]
    pixels: x = (ndc_x + 1)·W/2,  y = (1 − ndc_y)·H/2  (image rows go down),  depth z_s = −z
    (world: right-handed, y up, +z toward the viewer, so a smaller depth is nearer).
    DECA also scales z by s; that does not change which surface is nearer for s > 0.
Rasterizer: a pixel (row i, col j) is covered by a triangle when its centre p = (j+½, i+½) lies
    inside: all three edge functions E_k(p) = (b_k − a_k) × (p − a_k) share the sign of the
    triangle's doubled area A (edge k runs from vertex k+1 to k+2). Barycentrics λ_k = E_k(p)/A,
    depth z(p) = Σ λ_k z_k; the nearest covering triangle wins (z-buffer).
    Ties: a centre exactly on an edge belongs to the side the edge's inward normal n = (n_x, n_y)
    points to when n_x > 0, or n_x = 0 and n_y > 0 (the "top-left" rule), and the edge function of
    a shared edge is evaluated with its endpoints in a canonical order, so the two triangles get
    exactly opposite values: no gaps and no double cover.
    Visibility is found without gradient; the winners' λ and depth are then recomputed from the
    vertex positions so gradients reach the vertices (as DECA-style fitting needs).
Shading (Ramamoorthi & Hanrahan 2001, "An efficient representation for irradiance environment
    maps", with DECA's constants): shading_rgb = Σ_k light[k, rgb] · c_k · Y_k(n),
    Y = [1, x, y, z, xy, xz, yz, x² − y², 3z² − 1];  image = albedo · shading.
Soft silhouette (beyond DECA): on the outline of the mask, coverage = clamp(½ + d, 0, 1) with d the
    signed distance (pixels) from the centre to the nearest silhouette edge — the exact box-filter
    coverage for an axis-aligned edge — so gradients reach the outline.

Checked against REFERENCE.md (DECA camera and SH constants). Perspective-correct interpolation is
not needed (orthographic camera); there is no near/far clipping.

Shape letters: B batch, V vertices, F faces, H/W image height/width, T/T' texture height/width,
C channels, N candidate faces (B·F flattened), K candidate pixels per face, P covered pixels,
Q (pixel, candidate face) pairs.
"""
import math
from typing import NamedTuple, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

# Candidate (face, pixel) pairs tested per chunk; about 60 bytes each, so ~130 MB at most.
CANDIDATE_BUDGET = 2 ** 21
# A triangle is degenerate (skipped) when |doubled area| <= this × (longest edge)²: a sliver whose
# height is under 1e-6 of its length; float32 cannot resolve it (machine epsilon ~1.2e-7).
DEGENERATE_REL = 1e-6
# Half a pixel: box-filter coverage of a straight edge at signed distance d is ½ + d.
PIXEL_HALF = 0.5
_EMPTY_KEY = torch.iinfo(torch.int64).max
_LOW32 = 2 ** 32
_SIGN_BITS = 0x7FFFFFFF

# DECA's SH constants (REFERENCE.md; Ramamoorthi & Hanrahan 2001, Eq. 12 with the Lambertian
# kernel Â_0 = π, Â_1 = 2π/3, Â_2 = π/4 folded in).
_PI = math.pi
SH_CONSTANTS = (
    1 / math.sqrt(4 * _PI),
    (2 * _PI / 3) * math.sqrt(3 / (4 * _PI)),
    (2 * _PI / 3) * math.sqrt(3 / (4 * _PI)),
    (2 * _PI / 3) * math.sqrt(3 / (4 * _PI)),
    (_PI / 4) * 3 * math.sqrt(5 / (12 * _PI)),
    (_PI / 4) * 3 * math.sqrt(5 / (12 * _PI)),
    (_PI / 4) * 3 * math.sqrt(5 / (12 * _PI)),
    (_PI / 4) * (3 / 2) * math.sqrt(5 / (12 * _PI)),
    (_PI / 4) * (1 / 2) * math.sqrt(5 / (4 * _PI)),
)
N_SH = len(SH_CONSTANTS)


class Fragments(NamedTuple):
    """Rasterizer output. pix_to_face (B, H, W) long: face index into `faces` (0..F−1), −1 where
    empty; bary (B, H, W, 3): barycentrics, 0 where empty; depth (B, H, W): screen depth, +inf
    where empty. bary and depth are differentiable w.r.t. the screen vertices."""
    pix_to_face: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor


def _image_hw(image_size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or not all(isinstance(n, int) and n > 0 for n in hw):
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return hw


def _check_mesh(verts: torch.Tensor, faces: torch.Tensor) -> None:
    if verts.dim() != 3 or verts.shape[-1] != 3:
        raise ValueError(f"vertices must be (B, V, 3), got {tuple(verts.shape)}")
    if faces.dim() != 2 or faces.shape[-1] != 3 or faces.dtype != torch.long:
        raise ValueError(f"faces must be (F, 3) long, got {tuple(faces.shape)} {faces.dtype}")


def _cross2(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def project(vertices: torch.Tensor, cam: torch.Tensor, image_size) -> torch.Tensor:
    """DECA's orthographic camera to screen space (x right, y down in pixels; depth −z).

    Parameters: vertices (B, V, 3) world; cam (B, 3) = [s, tx, ty]; image_size int or (H, W).
    The NDC square [−1, 1]² spans the whole image, so non-square images stretch.
    Returns (B, V, 3) screen vertices.
    """
    H, W = _image_hw(image_size)
    _check_mesh(vertices, torch.zeros(0, 3, dtype=torch.long))
    if cam.shape != (vertices.shape[0], 3):
        raise ValueError(f"cam must be (B, 3) = [s, tx, ty], got {tuple(cam.shape)}")
    ndc = cam[:, None, :1] * (vertices[..., :2] + cam[:, None, 1:])  # (B, V, 2)
    x = (ndc[..., 0] + 1) * (W / 2)
    y = (1 - ndc[..., 1]) * (H / 2)
    return torch.stack([x, y, -vertices[..., 2]], dim=-1)  # (B, V, 3)


def _depth_key(depth: torch.Tensor) -> torch.Tensor:
    """int64 whose order is the float32 order of depth: flipping the magnitude bits of negative
    IEEE-754 numbers makes their bit patterns sort like the numbers."""
    bits = depth.float().view(torch.int32)
    return torch.where(bits < 0, bits ^ _SIGN_BITS, bits).long()


def _size_class(n: torch.Tensor) -> torch.Tensor:
    """Round box sides n >= 1 up to the next of 1, 2, 3, 4, 6, 8, 12, 16, ... (at most 1.5×)."""
    mantissa, exponent = torch.frexp(n.double())  # n = mantissa · 2^exponent, mantissa in [½, 1)
    power = torch.ldexp(torch.ones_like(mantissa), exponent - 1)  # largest power of 2 <= n
    size = torch.where(mantissa == 0.5, power, torch.where(mantissa <= 0.75, 1.5 * power, 2 * power))
    return size.long()


def _zbuffer(verts: torch.Tensor, faces: torch.Tensor, H: int, W: int,
             cull_backfaces: bool) -> torch.Tensor:
    """Nearest face per pixel, without gradient. Returns keys (B·H·W,): depth_key·2³² + face,
    _EMPTY_KEY where empty.

    Faces are bucketed by bounding-box height and width, each rounded up to a size class (<= 1.5×
    per side). A bucket tests an (h, w) tile of pixel centres per face, where the edge function
    E = (c_x·p_x + c_0) + c_y·p_y costs one full-size add of a column and a row term. The inside
    (face, row, col) triples are then depth-tested in batches of CANDIDATE_BUDGET."""
    B, V, nF = verts.shape[0], verts.shape[1], faces.shape[0]
    device, dtype = verts.device, verts.dtype
    corner = (torch.arange(B, device=device)[:, None, None] * V + faces).reshape(-1)
    tri = verts.reshape(B * V, 3).index_select(0, corner).view(B * nF, 3, 3)  # (N, 3, 3)
    x, y = tri[..., 0], tri[..., 1]  # (N, 3) each
    j0 = torch.ceil(x.amin(-1) - PIXEL_HALF).clamp(0, W).long()  # first centre >= min
    j1 = torch.floor(x.amax(-1) - PIXEL_HALF).clamp(-1, W - 1).long()
    i0 = torch.ceil(y.amin(-1) - PIXEL_HALF).clamp(0, H).long()
    i1 = torch.floor(y.amax(-1) - PIXEL_HALF).clamp(-1, H - 1).long()
    area2 = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])
    edge_len2 = ((x - x.roll(1, -1)) ** 2 + (y - y.roll(1, -1)) ** 2).amax(-1)  # (N,)
    valid = (area2.abs() > DEGENERATE_REL * edge_len2) & tri.isfinite().all(-1).all(-1)
    if cull_backfaces:
        valid &= area2 < 0  # CCW in world (y up) appears with A < 0 in y-down screen space
    keep = (valid & (j1 >= j0) & (i1 >= i0)).nonzero().squeeze(1)  # (N',) faces that may cover
    x, y, z = tri.index_select(0, keep).unbind(-1)  # (N', 3) each
    area2, j0, j1, i0, i1 = (t.index_select(0, keep) for t in (area2, j0, j1, i0, i1))

    ax, bx = x.roll(-1, 1), x.roll(-2, 1)  # (N', 3) edge k runs a_k -> b_k, opposite vertex k
    ay, by = y.roll(-1, 1), y.roll(-2, 1)
    orient = area2.sign()[:, None]  # (N', 1) makes E > 0 inside
    coef_x = (ay - by) * orient  # E(p) = c_x·p_x + c_y·p_y + c_0; exactly negated for the
    coef_y = (bx - ax) * orient  # neighbour across the edge, since a − b = −(b − a) in floats
    swap = (ax > bx) | ((ax == bx) & (ay > by))  # anchor c_0 at the lexicographically lower end
    coef_0 = -(coef_x * torch.where(swap, bx, ax) + coef_y * torch.where(swap, by, ay))
    tie = (coef_x > 0) | ((coef_x == 0) & (coef_y > 0))  # (N', 3) owns centres on this edge
    # E >= 0 on tie edges, E > 0 elsewhere; no nonzero E of pixel-scale inputs is below `tiny`.
    threshold = torch.where(tie, 0.0, torch.finfo(dtype).tiny).to(dtype)
    left = j0.to(dtype) + PIXEL_HALF  # (N',) centre of the tile's first column
    top = i0.to(dtype) + PIXEL_HALF
    tile = torch.cat([left[None], top[None], coef_x.T, coef_y.T, coef_0.T, threshold.T])  # (14, N')
    inv_area = 1 / area2.abs()  # z(p) = Σ_k z_k E_k(p) / |A| is a plane
    plane = torch.stack([left, top] + [(z * c).sum(-1) * inv_area for c in
                                       (coef_x, coef_y, coef_0)], -1)  # (N', 5)
    item = torch.div(keep, nF, rounding_mode="floor")
    origin = torch.stack([item * (H * W) + i0 * W + j0, keep - item * nF], -1)  # (N', 2) pix, face

    keys = torch.full((B * H * W,), _EMPTY_KEY, dtype=torch.long, device=device)
    pending = []

    def depth_test():
        f, r, c = (torch.cat(t) for t in zip(*pending))  # (Q,) each
        p = plane.index_select(0, f)  # (Q, 5)
        depth = p[:, 2] * (p[:, 0] + c) + p[:, 3] * (p[:, 1] + r) + p[:, 4]
        o = origin.index_select(0, f)  # (Q, 2)
        keys.scatter_reduce_(0, o[:, 0] + r * W + c, _depth_key(depth) * _LOW32 + o[:, 1], "amin")
        pending.clear()

    tile_w = _size_class(j1 - j0 + 1)  # (N',)
    tile_h = _size_class(i1 - i0 + 1)
    bucket = tile_h * (2 * W + 1) + tile_w
    bucket, order = bucket.sort()
    names, counts = torch.unique_consecutive(bucket, return_counts=True)
    for name, members in zip(names.tolist(), order.split(counts.tolist())):
        h, w = divmod(name, 2 * W + 1)
        steps_w = torch.arange(w, device=device, dtype=dtype)[:, None]  # (w, 1)
        steps_h = torch.arange(h, device=device, dtype=dtype)[:, None]
        for idx in members.split(max(1, CANDIDATE_BUDGET // (h * w))):
            # faces last: every op runs along the long axis M, whatever the tile size
            prm = tile.index_select(1, idx)  # (14, M)
            px = prm[0] + steps_w  # (w, M) pixel-centre x of the tile's columns
            py = prm[1] + steps_h  # (h, M)
            px = torch.where(px < W, px, math.nan)  # NaN fails every edge test: off the image
            py = torch.where(py < H, py, math.nan)
            inside = None
            for e in range(3):
                col_term = prm[2 + e] * px + prm[8 + e]  # (w, M)
                row_term = prm[5 + e] * py  # (h, M)
                ok = (col_term[None] + row_term[:, None]) >= prm[11 + e]  # (h, w, M)
                inside = ok if inside is None else inside & ok
            r, c, m = inside.nonzero(as_tuple=True)  # (Q,) each
            pending.append((idx[m], r, c))
            if sum(len(t[0]) for t in pending) >= CANDIDATE_BUDGET:
                depth_test()
    if pending:
        depth_test()
    return keys


def rasterize(verts: torch.Tensor, faces: torch.Tensor, image_size,
              cull_backfaces: bool = False) -> Fragments:
    """Z-buffer rasterization of screen-space triangles (see the module docstring for the rules).

    Parameters: verts (B, V, 3) screen space (x right, y down, pixels; smaller z nearer);
    faces (F, 3) long, shared by the batch; image_size int or (H, W); cull_backfaces drops faces
    that are clockwise in world (y up) coordinates, i.e. with doubled area A >= 0 in y-down screen
    coordinates. Degenerate and non-finite triangles cover nothing.
    Returns Fragments; bary and depth carry gradients to verts (pix_to_face is piecewise constant).
    """
    H, W = _image_hw(image_size)
    _check_mesh(verts, faces)
    B = verts.shape[0]
    with torch.no_grad():
        keys = _zbuffer(verts.detach(), faces, H, W, cull_backfaces)  # (B·H·W,)
    pix = (keys != _EMPTY_KEY).nonzero().squeeze(1)  # (P,)
    face = keys[pix] & (_LOW32 - 1)
    pix_to_face = torch.full_like(keys, -1).index_copy(0, pix, face).view(B, H, W)
    item = torch.div(pix, H * W, rounding_mode="floor")
    rest = pix - item * (H * W)
    row = torch.div(rest, W, rounding_mode="floor")
    px = (rest - row * W).to(verts.dtype) + PIXEL_HALF  # (P,) pixel centre
    py = row.to(verts.dtype) + PIXEL_HALF
    corner = item[:, None] * verts.shape[1] + faces.index_select(0, face)  # (P, 3) rows of verts
    tri = verts.reshape(-1, 3).index_select(0, corner.reshape(-1)).view(-1, 3, 3)  # (P, 3, 3)
    (x0, x1, x2), (y0, y1, y2), z = tri[..., 0].unbind(1), tri[..., 1].unbind(1), tri[..., 2]
    w = torch.stack([(x2 - x1) * (py - y1) - (y2 - y1) * (px - x1),
                     (x0 - x2) * (py - y2) - (y0 - y2) * (px - x2),
                     (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)], -1)  # (P, 3) E_k(p)
    bary_p = w / w.sum(-1, keepdim=True)  # Σ_k E_k(p) = A for every p
    depth_p = (bary_p * z).sum(-1)  # (P,)
    bary = verts.new_zeros(B * H * W, 3).index_copy(0, pix, bary_p).view(B, H, W, 3)
    depth = verts.new_full((B * H * W,), math.inf).index_copy(0, pix, depth_p).view(B, H, W)
    return Fragments(pix_to_face, bary, depth)


def interpolate(attrs: torch.Tensor, faces: torch.Tensor, fragments: Fragments) -> torch.Tensor:
    """Barycentric interpolation of attributes; zeros where empty.

    attrs: per-vertex (B, V, C), or per-face-corner (B, F, 3, C), (1, F, 3, C) or (F, 3, C)
    broadcast over B. A 3-D tensor whose first size is B is read as per-vertex (use (1, F, 3, C)
    to force per-corner). Returns (B, H, W, C).
    """
    B, H, W = fragments.pix_to_face.shape
    nF = faces.shape[0]
    flat = fragments.pix_to_face.reshape(-1)  # (B·H·W,)
    pix = (flat >= 0).nonzero().squeeze(1)  # (P,)
    face = flat[pix]
    item = torch.div(pix, H * W, rounding_mode="floor")
    if attrs.dim() == 3 and attrs.shape[0] == B:
        corner = attrs[item[:, None], faces[face]]  # (P, 3, C)
    elif attrs.dim() == 3 and attrs.shape[:2] == (nF, 3):
        corner = attrs[face]  # (P, 3, C)
    elif attrs.dim() == 4 and attrs.shape[0] in (1, B) and attrs.shape[1:3] == (nF, 3):
        corner = attrs[item if attrs.shape[0] == B else torch.zeros_like(item), face]  # (P, 3, C)
    else:
        raise ValueError(f"attrs must be (B={B}, V, C), (B or 1, F={nF}, 3, C) or (F, 3, C), "
                         f"got {tuple(attrs.shape)}")
    bary = fragments.bary.reshape(-1, 3)[pix]  # (P, 3)
    values = (bary[..., None] * corner).sum(1)  # (P, C)
    out = values.new_zeros(B * H * W, values.shape[-1]).index_copy(0, pix, values)
    return out.view(B, H, W, -1)


def face_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unnormalised face normals (v1 − v0) × (v2 − v0), length = 2·area; outward for faces that
    are counter-clockwise seen from outside. verts (B, V, 3) -> (B, F, 3)."""
    _check_mesh(verts, faces)
    tri = verts[:, faces]  # (B, F, 3, 3)
    return torch.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0], dim=-1)


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals (sum of adjacent unnormalised face normals).
    verts (B, V, 3) -> (B, V, 3); unused vertices get 0."""
    B, nF = verts.shape[0], faces.shape[0]
    corner_normals = face_normals(verts, faces)[:, :, None].expand(B, nF, 3, 3)  # (B, F, 3, 3)
    summed = verts.new_zeros(verts.shape).index_add(
        1, faces.reshape(-1), corner_normals.reshape(B, nF * 3, 3))  # (B, V, 3)
    return F.normalize(summed, dim=-1)


def sample_texture(texture: torch.Tensor, uv_image: torch.Tensor) -> torch.Tensor:
    """Bilinear texture lookup. texture (B, C, T, T'); uv_image (B, H, W, 2) with u right and v UP
    in [0, 1] (OBJ: v = 0 is the texture's bottom row). align_corners=False: uv (0, 0) is the
    image corner and texel (r, c) has its centre at u = (c + ½)/T', v = 1 − (r + ½)/T, the
    OpenGL convention; outside [0, 1] the border texel repeats. Returns (B, C, H, W)."""
    if texture.dim() != 4 or uv_image.dim() != 4 or uv_image.shape[-1] != 2 \
            or uv_image.shape[0] != texture.shape[0]:
        raise ValueError(f"texture must be (B, C, T, T') and uv_image (B, H, W, 2), got "
                         f"{tuple(texture.shape)} and {tuple(uv_image.shape)}")
    grid = torch.stack([2 * uv_image[..., 0] - 1, 1 - 2 * uv_image[..., 1]], -1)  # (B, H, W, 2)
    return F.grid_sample(texture, grid.to(texture.dtype), mode="bilinear",
                         padding_mode="border", align_corners=False)


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """DECA's 9 SH basis functions at unit normals, constants c_k included. (..., 3) -> (..., 9)."""
    if normals.shape[-1] != 3:
        raise ValueError(f"normals must be (..., 3), got {tuple(normals.shape)}")
    x, y, z = normals.unbind(-1)
    basis = torch.stack([torch.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y,
                         3 * z * z - 1], dim=-1)  # (..., 9)
    return basis * normals.new_tensor(SH_CONSTANTS)


def sh_shading(normal_image: torch.Tensor, light: torch.Tensor) -> torch.Tensor:
    """Irradiance shading. normal_image (B, 3, H, W) channels-first (like the images);
    light (B, 9, 3) coefficients × RGB. Returns (B, 3, H, W)."""
    if normal_image.dim() != 4 or normal_image.shape[1] != 3:
        raise ValueError(f"normal_image must be (B, 3, H, W), got {tuple(normal_image.shape)}")
    if light.shape != (normal_image.shape[0], N_SH, 3):
        raise ValueError(f"light must be (B, {N_SH}, 3), got {tuple(light.shape)}")
    basis = sh_basis(normal_image.permute(0, 2, 3, 1))  # (B, H, W, 9)
    return torch.einsum("bhwk,bkc->bchw", basis, light)  # (B, 3, H, W)


def edge_neighbours(faces: torch.Tensor) -> torch.Tensor:
    """For edge k of each face (opposite vertex k) the other face sharing it, −1 on a boundary.
    faces (F, 3) -> (F, 3) long. Edges of 3+ faces pair up arbitrarily."""
    nF = faces.shape[0]
    ends = torch.stack([faces[:, (1, 2, 0)], faces[:, (2, 0, 1)]], -1)  # (F, 3, 2)
    n_vert = int(faces.max()) + 1 if nF else 1
    key = (ends.amin(-1) * n_vert + ends.amax(-1)).reshape(-1)  # (3F,) undirected edge id
    order = torch.argsort(key, stable=True)
    same = key[order][1:] == key[order][:-1]  # (3F − 1,) sorted neighbours share the edge
    partner = torch.full_like(key, -1)
    partner[:-1] = torch.where(same, order[1:], -1)
    partner[1:] = torch.where(same, order[:-1], partner[1:])
    slot_partner = torch.empty_like(key).index_copy_(0, order, partner)  # (3F,)
    return torch.where(slot_partner >= 0, torch.div(slot_partner, 3, rounding_mode="floor"),
                       -1).view(nF, 3)


def soft_silhouette(verts: torch.Tensor, faces: torch.Tensor, neighbours: torch.Tensor,
                    pix_to_face: torch.Tensor) -> torch.Tensor:
    """Anti-aliased mask with gradients at the outline. verts (B, V, 3) screen; neighbours from
    edge_neighbours; pix_to_face (B, H, W). Equals the hard mask except on the outline (pixels with
    a 4-neighbour on the other side), where coverage = max over the covering faces of the pixel
    and its 4-neighbours of clamp(½ + d, 0, 1), d = signed distance (pixels, + inside) to the
    nearest silhouette edge (boundary edge, or front/back-facing change) of that face.
    Returns (B, H, W)."""
    B, H, W = pix_to_face.shape
    tri = verts[:, faces][..., :2]  # (B, F, 3, 2)
    area2 = _cross2(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0])  # (B, F)
    orient = area2.detach().sign()
    nb_orient = orient[:, neighbours.clamp_min(0)]  # (B, F, 3)
    silhouette = (neighbours < 0) | (nb_orient != orient[..., None])  # (B, F, 3)
    pad = F.pad(pix_to_face, (1, 1, 1, 1), value=-1)  # (B, H+2, W+2)
    cand = torch.stack([pix_to_face, pad[:, :-2, 1:-1], pad[:, 2:, 1:-1], pad[:, 1:-1, :-2],
                        pad[:, 1:-1, 2:]], -1)  # (B, H, W, 5) own face, then up/down/left/right
    hard = (pix_to_face >= 0).to(verts.dtype)
    outline = (cand >= 0).any(-1) & (cand < 0).any(-1)  # (B, H, W)
    b, i, j, c = (outline[..., None] & (cand >= 0)).nonzero(as_tuple=True)  # (Q,) each
    f = cand[b, i, j, c]
    centre = torch.stack([j, i], -1).to(verts.dtype) + PIXEL_HALF  # (Q, 2)
    a_q = tri[b, f][:, (1, 2, 0)]  # (Q, 3, 2)
    edge = tri[b, f][:, (2, 0, 1)] - a_q
    length = edge.norm(dim=-1).clamp_min(torch.finfo(verts.dtype).eps)  # (Q, 3)
    dist = _cross2(edge, centre[:, None] - a_q) * orient[b, f, None] / length  # (Q, 3)
    dist = torch.where(silhouette[b, f], dist, math.inf).amin(-1)  # (Q,)
    dist = torch.where((c > 0) & dist.isinf(), -math.inf, dist)  # a neighbour needs an edge
    coverage = (PIXEL_HALF + dist).clamp(0, 1)
    flat_pix = (b * H + i) * W + j
    soft = verts.new_zeros(B * H * W).scatter_reduce(0, flat_pix, coverage, "amax")
    return torch.where(outline, soft.view(B, H, W), hard)


def icosphere(subdivisions: int = 3, dtype=torch.float32, device=None):
    """Unit icosphere: 12 icosahedron vertices, each subdivision splits a face into 4 and pushes the
    new midpoints to the sphere. Faces counter-clockwise seen from outside.
    Returns verts (V, 3), faces (20·4^s, 3) long."""
    t = (1 + math.sqrt(5)) / 2
    verts = torch.tensor([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t],
                          [0, -1, -t], [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]],
                         dtype=torch.float64)
    faces = torch.tensor([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9],
                          [5, 11, 4], [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2],
                          [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10],
                          [8, 6, 7], [9, 8, 1]])
    for _ in range(subdivisions):
        edges = torch.cat([faces[:, (0, 1)], faces[:, (1, 2)], faces[:, (2, 0)]]).sort(-1)[0]
        unique, inverse = torch.unique(edges, dim=0, return_inverse=True)  # (E, 2), (3F,)
        verts = torch.cat([verts, (verts[unique[:, 0]] + verts[unique[:, 1]]) / 2])
        mid = (inverse + len(verts) - len(unique)).view(3, -1).T  # (F, 3) mids of 01, 12, 20
        v0, v1, v2 = faces.unbind(-1)
        m01, m12, m20 = mid.unbind(-1)
        faces = torch.cat([torch.stack(s, -1) for s in ((v0, m01, m20), (v1, m12, m01),
                                                        (v2, m20, m12), (m01, m12, m20))])
    verts = F.normalize(verts, dim=-1)
    return verts.to(dtype=dtype, device=device), faces.to(device)


class Renderer(nn.Module):
    """DECA-style Lambertian renderer: project, rasterize, interpolate, texture, SH-shade.

    Parameters: faces (F, 3) long; face_uvs (F, 3, 2) UVs per face corner (v up) or None;
    image_size int or (H, W); cull_backfaces (default False: open meshes show their inside).
    forward(vertices (B, V, 3) world, albedo, light (B, 9, 3), cam (B, 3)) -> dict with
    image, mask, soft_mask, normal_image, albedo_image, shading (all (B, 3 or 1, H, W)),
    fragments, screen_vertices (B, V, 3). albedo is told apart by its rank: (B, 3, T, T') is a UV
    texture in [0, 1] (needs face_uvs); (B, V, 3) is per-vertex colour.
    """

    def __init__(self, faces: torch.Tensor, face_uvs=None, image_size=224,
                 cull_backfaces: bool = False):
        super().__init__()
        _check_mesh(torch.zeros(1, 0, 3), faces)
        if face_uvs is not None and face_uvs.shape != (faces.shape[0], 3, 2):
            raise ValueError(f"face_uvs must be (F, 3, 2), got {tuple(face_uvs.shape)}")
        self.image_size = _image_hw(image_size)
        self.cull_backfaces = cull_backfaces
        self.register_buffer("faces", faces.clone())
        self.register_buffer("face_uvs", None if face_uvs is None else face_uvs[None].clone())
        self.register_buffer("neighbours", edge_neighbours(faces))

    def forward(self, vertices, albedo, light, cam) -> dict:
        screen = project(vertices, cam, self.image_size)  # (B, V, 3)
        fragments = rasterize(screen, self.faces, self.image_size, self.cull_backfaces)
        mask = (fragments.pix_to_face >= 0)[:, None].to(vertices.dtype)  # (B, 1, H, W)
        normals = interpolate(vertex_normals(vertices, self.faces), self.faces, fragments)
        normal_image = F.normalize(normals, dim=-1).permute(0, 3, 1, 2)  # (B, 3, H, W)
        if albedo.dim() == 4 and albedo.shape[:2] == (vertices.shape[0], 3):
            if self.face_uvs is None:
                raise ValueError("a texture albedo (B, 3, T, T') needs face_uvs")
            uv = interpolate(self.face_uvs.to(vertices.dtype), self.faces, fragments)
            albedo_image = sample_texture(albedo, uv) * mask  # (B, 3, H, W)
        elif albedo.shape == (*vertices.shape[:2], 3):
            albedo_image = interpolate(albedo, self.faces, fragments).permute(0, 3, 1, 2)
        else:
            raise ValueError(f"albedo must be (B, 3, T, T') or (B, V, 3), got {tuple(albedo.shape)}")
        shading = sh_shading(normal_image, light) * mask
        soft_mask = soft_silhouette(screen, self.faces, self.neighbours, fragments.pix_to_face)
        return {"image": albedo_image * shading, "mask": mask, "soft_mask": soft_mask[:, None],
                "normal_image": normal_image, "albedo_image": albedo_image, "shading": shading,
                "fragments": fragments, "screen_vertices": screen}

"""Differentiable mesh rendering in plain PyTorch: DECA's orthographic camera, a z-buffer
rasterizer, attribute interpolation, vertex normals, UV texturing and spherical-harmonics shading.

DiffFAE (Wang et al. 2024, §3.1) conditions its UNet on I_R, a Lambertian render of FLAME under the
query's pose, expression, light and camera with the source's shape and albedo, made the way DECA
(Feng et al. 2021) renders. This file is that renderer: plain tensor ops, one code path for
CPU, CUDA and MPS (tested on CPU).

Camera (DECA, orthographic; REFERENCE.md):  ndc_xy = s · (xy + t),  cam = [s, tx, ty]
    pixels: x = (ndc_x + 1)·W/2,  y = (1 − ndc_y)·H/2 (image rows go down),  depth z_s = −z
    (world: right-handed, y up, +z toward the viewer, so a smaller depth is nearer).
    DECA also scales z by s, which does not change which surface is nearer for s > 0.
Rasterizer: pixel (row i, col j) is covered by a triangle when its centre p = (j+½, i+½) is
    inside: the three edge functions E_k(p) = (b_k − a_k) × (p − a_k) (edge k runs from vertex k+1
    to k+2) share the sign of the doubled area A. Barycentrics λ_k = E_k(p)/A, depth Σ λ_k z_k;
    the nearest covering triangle wins. A centre exactly on an edge belongs to the triangle whose
    inward edge normal n has n_x > 0, or n_x = 0 and n_y > 0 (a "top-left" rule: the centre moved
    a hair right-and-down decides), and E is evaluated so that it is exactly antisymmetric across a
    shared edge and exactly 0 at its ends (see _edge_functions): no gaps, no double cover, also
    at vertices on centres. Visibility is found without gradient; the winners' λ and depth are
    then recomputed from the vertices so gradients reach them. No near/far clipping, and no
    perspective correction (the camera is orthographic).
Shading (Ramamoorthi & Hanrahan 2001, "An efficient representation for irradiance environment
    maps", with DECA's constants c_k): shading_rgb = Σ_k light[k, rgb] · c_k · Y_k(n),
    Y = [1, x, y, z, xy, xz, yz, x² − y², 3z² − 1];  image = albedo · shading.
Soft silhouette (beyond DECA): on the outline of the mask, coverage = clamp(½ ± d, 0, 1), d the
    distance from the pixel centre to the nearest silhouette edge — the exact box-filtered coverage
    of a straight axis-aligned outline — so gradients reach the outline.

Shape letters: B batch, V vertices, F faces, H/W image height/width, T/T' texture height/width,
C channels, N faces of the whole batch (B·F), M faces in a chunk, (h, w) a chunk's pixel tile,
P covered pixels, Q (pixel, face) pairs.
"""
import math
from typing import NamedTuple, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

# Candidate (face, pixel) tests per chunk; each holds under ~50 bytes of temporaries, so a chunk
# stays near 100 MB whatever the image and batch size.
CANDIDATE_BUDGET = 2 ** 21
# A triangle is degenerate (skipped) when |doubled area| <= this × (longest edge)²: a sliver whose
# height is under 1e-6 of its length; float32 cannot resolve it (machine epsilon ~1.2e-7).
DEGENERATE_REL = 1e-6
# Half a pixel: box-filter coverage of a straight edge at signed distance d is ½ + d.
PIXEL_HALF = 0.5
# Fixed cost of one chunk of faces (~30 tensor ops) counted in pixel tests (a CPU measurement):
# neighbouring tile sizes share one padded tile when that adds fewer tests than this.
BUCKET_COST = 2 ** 15
# Per-face rows of the z-buffer's parameter table: tile origin x, y; c_x, c_y, o_x, o_y and tie
# threshold of the 3 edges; depth plane z = a·p_x + b·p_y + c.
TILE_ROWS = (1, 1, 3, 3, 3, 3, 3, 3)
_EMPTY_KEY = torch.iinfo(torch.int64).max
_LOW32 = 2 ** 32
_SIGN_BITS = 0x7FFFFFFF

# DECA's SH constants (Feng et al. 2021, its code): the real SH normalisations of Y_00 .. Y_22 times the
# Lambertian kernel Â_0 = π, Â_1 = 2π/3, Â_2 = π/4 of Ramamoorthi & Hanrahan (2001).
SH_C0 = 1 / math.sqrt(4 * math.pi)
_C1 = (2 * math.pi / 3) * math.sqrt(3 / (4 * math.pi))
_C2 = (math.pi / 4) * 3 * math.sqrt(5 / (12 * math.pi))
_C3 = (math.pi / 4) * (3 / 2) * math.sqrt(5 / (12 * math.pi))
_C4 = (math.pi / 4) * (1 / 2) * math.sqrt(5 / (4 * math.pi))
SH_CONSTANTS = (SH_C0, _C1, _C1, _C1, _C2, _C2, _C2, _C3, _C4)
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


def _size_class(n: torch.Tensor, limit: int) -> torch.Tensor:
    """Round box sides 1 <= n <= limit up to the next of 1, 2, 3, 4, 6, 8, 12, ... (<= 1.5×)."""
    sizes, power = [1], 1
    while sizes[-1] < limit:
        sizes += [3 * power // 2, 2 * power] if power > 1 else [2]
        power *= 2
    sizes = torch.tensor(sizes, device=n.device)
    return sizes[torch.searchsorted(sizes, n)]


def _tile_groups(tile_h: torch.Tensor, tile_w: torch.Tensor, W: int):
    """Faces sorted by tile size (h, w); consecutive sizes share one padded tile when that adds
    fewer pixel tests than BUCKET_COST. Returns [(h, w, face indices)]."""
    bucket, order = (tile_h * (2 * W + 1) + tile_w).sort()
    names, counts = torch.unique_consecutive(bucket, return_counts=True)
    groups = []  # [h, w, number of faces]
    for name, count in zip(names.tolist(), counts.tolist()):
        h, w = divmod(name, 2 * W + 1)
        if groups:
            gh, gw, gn = groups[-1]
            if max(gh, h) * max(gw, w) * (gn + count) <= gh * gw * gn + h * w * count + BUCKET_COST:
                groups[-1] = [max(gh, h), max(gw, w), gn + count]
                continue
        groups.append([h, w, count])
    return [(h, w, members) for (h, w, _), members in
            zip(groups, order.split([n for _, _, n in groups]))]


def _edge_functions(x: torch.Tensor, y: torch.Tensor, area2: torch.Tensor):
    """Edge k (from vertex k+1 to k+2) as E_k(p) = c_x·(p_x − o_x) + c_y·(p_y − o_y) > 0 inside.
    x, y (3, N) corner-major; area2 (N,). Returns c_x, c_y, o_x, o_y, tie threshold, (3, N) each.

    Exactness: a − b = −(b − a) in floats and the anchor o is the edge's lexicographically lower
    end, so the face across an edge computes exactly −E at every centre, and E is exactly 0 at
    both ends of an edge (the two products cancel): the tie rule decides alone."""
    ax, bx = x.roll(-1, 0), x.roll(-2, 0)  # (3, N) edge k runs a_k -> b_k
    ay, by = y.roll(-1, 0), y.roll(-2, 0)
    orient = area2.sign()
    coef_x = (ay - by) * orient
    coef_y = (bx - ax) * orient
    swap = (ax > bx) | ((ax == bx) & (ay > by))
    tie = (coef_x > 0) | ((coef_x == 0) & (coef_y > 0))  # inward normal points right(-down)
    # E >= 0 on tie edges, E > 0 elsewhere; no nonzero E of pixel-scale inputs is below `tiny`.
    threshold = torch.zeros_like(coef_x).masked_fill_(~tie, torch.finfo(x.dtype).tiny)
    return coef_x, coef_y, torch.where(swap, bx, ax), torch.where(swap, by, ay), threshold


def _zbuffer(verts: torch.Tensor, faces: torch.Tensor, H: int, W: int,
             cull_backfaces: bool) -> torch.Tensor:
    """Nearest face per pixel, without gradient. Returns keys (B·H·W,) = depth_key·2³² + face,
    _EMPTY_KEY where empty; equal float32 depths go to the lower face index.

    Faces are grouped by bounding-box height and width rounded up to a size class (<= 1.5× per
    side). A group tests an (h, w) tile of pixel centres per face. Faces sit on the last axis so
    every op runs along the long axis; E = column term + row term is one full-size add per edge,
    and so is the depth plane. Groups are chunked to CANDIDATE_BUDGET tile pixels."""
    B, V, nF = verts.shape[0], verts.shape[1], faces.shape[0]
    device, dtype = verts.device, verts.dtype
    corner = (torch.arange(B, device=device)[:, None] * V + faces.T[:, None]).reshape(-1)
    xyz = verts.reshape(B * V, 3).T.contiguous().index_select(1, corner).view(3, 3, B * nF)
    x, y = xyz[0], xyz[1]  # (3, N) each; xyz is (coordinate, corner, face)
    j0 = torch.ceil(x.amin(0) - PIXEL_HALF).clamp(0, W).long()  # first centre >= min
    j1 = torch.floor(x.amax(0) - PIXEL_HALF).clamp(-1, W - 1).long()
    i0 = torch.ceil(y.amin(0) - PIXEL_HALF).clamp(0, H).long()
    i1 = torch.floor(y.amax(0) - PIXEL_HALF).clamp(-1, H - 1).long()
    area2 = (x[1] - x[0]) * (y[2] - y[0]) - (y[1] - y[0]) * (x[2] - x[0])  # (N,)
    edge_len2 = ((x - x.roll(1, 0)) ** 2 + (y - y.roll(1, 0)) ** 2).amax(0)
    valid = (area2.abs() > DEGENERATE_REL * edge_len2) & xyz.isfinite().flatten(0, 1).all(0)
    if cull_backfaces:
        valid &= area2 < 0  # CCW in world (y up) appears with A < 0 in y-down screen space
    keep = (valid & (j1 >= j0) & (i1 >= i0)).nonzero().squeeze(1)  # (N',) faces that may cover
    x, y, z = xyz.view(9, -1).index_select(1, keep).view(3, 3, -1)  # (3, N') each
    area2, j0, j1, i0, i1 = (t.index_select(0, keep) for t in (area2, j0, j1, i0, i1))

    coef_x, coef_y, anchor_x, anchor_y, threshold = _edge_functions(x, y, area2)
    left = j0.to(dtype) + PIXEL_HALF  # (N',) centre of the tile's first column
    top = i0.to(dtype) + PIXEL_HALF
    coef_0 = -(coef_x * anchor_x + coef_y * anchor_y)  # E = c_x·p_x + c_y·p_y + c_0
    plane = [(z * c).sum(0) / area2.abs() for c in (coef_x, coef_y, coef_0)]  # z = Σ z_k E_k/A
    tile = torch.cat([left[None], top[None], coef_x, coef_y, anchor_x, anchor_y, threshold,
                      torch.stack(plane)])  # (20, N') rows as TILE_ROWS
    item = torch.div(keep, nF, rounding_mode="floor")
    first_pixel = item * (H * W) + i0 * W + j0  # (N',) top-left pixel of the tile
    face_id = keep - item * nF

    keys = torch.full((B * H * W,), _EMPTY_KEY, dtype=torch.long, device=device)
    groups = _tile_groups(_size_class(i1 - i0 + 1, H), _size_class(j1 - j0 + 1, W), W)
    for h, w, members in groups:
        offset_w = torch.arange(w, device=device, dtype=dtype)[:, None]  # (w, 1)
        offset_h = torch.arange(h, device=device, dtype=dtype)[:, None]
        for idx in members.split(max(1, CANDIDATE_BUDGET // (h * w))):
            origin_x, origin_y, cx, cy, ox, oy, threshold, depth_plane = \
                tile.index_select(1, idx).split(TILE_ROWS)  # (1 or 3, M) each
            px = origin_x + offset_w  # (w, M) pixel-centre x of the tile's columns
            py = origin_y + offset_h  # (h, M)
            px = torch.where(px < W, px, math.nan)  # NaN fails every edge test: off the image
            py = torch.where(py < H, py, math.nan)
            inside = None
            for e in range(3):
                col_term = cx[e] * (px - ox[e])  # (w, M)
                row_term = cy[e] * (py - oy[e])  # (h, M)
                ok = (col_term[None] + row_term[:, None]) >= threshold[e]  # (h, w, M)
                inside = ok if inside is None else inside & ok
            r, c, m = inside.nonzero(as_tuple=True)  # (Q,) each
            depth_tile = (depth_plane[0] * px + depth_plane[2])[None] \
                + (depth_plane[1] * py)[:, None]  # (h, w, M)
            depth = depth_tile.view(-1).index_select(0, (r * w + c) * len(idx) + m)  # (Q,)
            key = _depth_key(depth) * _LOW32 + face_id.index_select(0, idx).index_select(0, m)
            pixel = first_pixel.index_select(0, idx).index_select(0, m) + r * W + c
            keys.scatter_reduce_(0, pixel, key, "amin")
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
    face = keys.index_select(0, pix) & (_LOW32 - 1)  # (P,)
    pix_to_face = torch.where(keys != _EMPTY_KEY, keys & (_LOW32 - 1), -1).view(B, H, W)
    item = torch.div(pix, H * W, rounding_mode="floor")
    rest = pix - item * (H * W)
    row = torch.div(rest, W, rounding_mode="floor")
    px = (rest - row * W).to(verts.dtype) + PIXEL_HALF  # (P,) pixel centre
    py = row.to(verts.dtype) + PIXEL_HALF
    corner = item * verts.shape[1] + faces.T.contiguous().index_select(1, face)  # (3, P)
    coords = verts.reshape(-1, 3).T.contiguous().index_select(1, corner.view(-1))  # (3, 3·P)
    (x0, x1, x2), (y0, y1, y2), z = coords.view(3, 3, -1)  # (P,) each; z (3, P)
    w = torch.stack([(x2 - x1) * (py - y1) - (y2 - y1) * (px - x1),
                     (x0 - x2) * (py - y2) - (y0 - y2) * (px - x2),
                     (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)])  # (3, P) E_k(p)
    bary_p = w / w.sum(0)  # Σ_k E_k(p) = A for every p
    depth_p = (bary_p * z).sum(0)  # (P,)
    bary = verts.new_zeros(B * H * W, 3).index_copy_(0, pix, bary_p.T).view(B, H, W, 3)
    depth = verts.new_full((B * H * W,), math.inf).index_copy_(0, pix, depth_p).view(B, H, W)
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
    C = attrs.shape[-1]
    if attrs.dim() == 3 and attrs.shape[0] == B:
        rows = faces.index_select(0, face) + item[:, None] * attrs.shape[1]  # (P, 3) in (B·V)
        corners = [attrs.reshape(-1, C).index_select(0, rows[:, k]) for k in range(3)]
    else:
        attrs = attrs[None] if attrs.dim() == 3 else attrs  # (B or 1, F, 3, C)
        if attrs.dim() != 4 or attrs.shape[0] not in (1, B) or attrs.shape[1:3] != (nF, 3):
            raise ValueError(f"attrs must be (B={B}, V, C), (B or 1, F={nF}, 3, C) or "
                             f"(F, 3, C), got {tuple(attrs.shape)}")
        rows = item * nF + face if attrs.shape[0] == B else face  # (P,) in (B·F) or (F)
        corners = [attrs[:, :, k].reshape(-1, C).index_select(0, rows) for k in range(3)]
    bary = fragments.bary.reshape(-1, 3).index_select(0, pix)  # (P, 3)
    values = sum(bary[:, k, None] * corners[k] for k in range(3))  # (P, C)
    out = values.new_zeros(B * H * W, values.shape[-1]).index_copy(0, pix, values)
    return out.view(B, H, W, -1)


def face_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unnormalised face normals (v1 − v0) × (v2 − v0), length = 2·area; outward for faces that
    are counter-clockwise seen from outside. verts (B, V, 3) -> (B, F, 3)."""
    _check_mesh(verts, faces)
    tri = verts.index_select(1, faces.view(-1)).view(verts.shape[0], -1, 3, 3)  # (B, F, 3, 3)
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


def _sh_terms(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor):
    """DECA's 9 SH terms without constants: [1, x, y, z, xy, xz, yz, x² − y², 3z² − 1]."""
    return [torch.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1]


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """DECA's 9 SH basis functions at unit normals, constants c_k included. (..., 3) -> (..., 9)."""
    if normals.shape[-1] != 3:
        raise ValueError(f"normals must be (..., 3), got {tuple(normals.shape)}")
    return torch.stack(_sh_terms(*normals.unbind(-1)), -1) * normals.new_tensor(SH_CONSTANTS)


def sh_shading(normal_image: torch.Tensor, light: torch.Tensor) -> torch.Tensor:
    """Irradiance shading Σ_k light[k, rgb] · c_k · Y_k(n). normal_image (B, 3, H, W)
    channels-first (like the images); light (B, 9, 3) coefficients × RGB. Returns (B, 3, H, W)."""
    if normal_image.dim() != 4 or normal_image.shape[1] != 3:
        raise ValueError(f"normal_image must be (B, 3, H, W), got {tuple(normal_image.shape)}")
    if light.shape != (normal_image.shape[0], N_SH, 3):
        raise ValueError(f"light must be (B, {N_SH}, 3), got {tuple(light.shape)}")
    terms = torch.stack(_sh_terms(*normal_image.unbind(1)), 1)  # (B, 9, H, W)
    scaled = light * light.new_tensor(SH_CONSTANTS)[:, None]  # (B, 9, 3) c_k folded into light
    return torch.einsum("bkhw,bkc->bchw", terms, scaled)  # (B, 3, H, W)


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
    """Anti-aliased mask with gradients at the outline.

    verts (B, V, 3) screen space; neighbours (F, 3) from edge_neighbours; pix_to_face (B, H, W).
    Equals the hard mask except on the outline (pixels whose 4-neighbours differ in coverage);
    there coverage = clamp(½ ± d, 0, 1), + for covered pixels, with d the distance (pixels) from
    the centre to the nearest silhouette edge segment (a boundary edge, or one between a front-
    and a back-facing face) of the faces covering the pixel and its 4-neighbours. For a straight
    axis-aligned outline this is the exact box-filtered coverage. Returns (B, H, W).
    """
    B, H, W = pix_to_face.shape
    tri = verts[..., :2].index_select(1, faces.view(-1)).view(B, -1, 3, 2)  # (B, F, 3, 2)
    orient = _cross2(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0]).detach().sign()
    silhouette = (neighbours < 0) | (orient[:, neighbours.clamp_min(0)] != orient[..., None])
    pad = F.pad(pix_to_face, (1, 1, 1, 1), value=-1)  # (B, H+2, W+2)
    cand = torch.stack([pix_to_face, pad[:, :-2, 1:-1], pad[:, 2:, 1:-1], pad[:, 1:-1, :-2],
                        pad[:, 1:-1, 2:]], -1)  # (B, H, W, 5) own face, then up/down/left/right
    hard = pix_to_face >= 0
    outline = (cand >= 0).any(-1) & (cand < 0).any(-1)  # (B, H, W)
    b, i, j, c = (outline[..., None] & (cand >= 0)).nonzero(as_tuple=True)  # (Q,) each
    f = cand[b, i, j, c]
    centre = torch.stack([j, i], -1).to(verts.dtype)[:, None] + PIXEL_HALF  # (Q, 1, 2)
    start = tri[b, f].roll(-1, 1)  # (Q, 3, 2) edge k runs from vertex k+1 to vertex k+2
    edge = tri[b, f].roll(-2, 1) - start
    tiny = torch.finfo(verts.dtype).tiny
    t = ((centre - start) * edge).sum(-1) / (edge * edge).sum(-1).clamp_min(tiny)  # (Q, 3)
    gap = centre - start - t.clamp(0, 1)[..., None] * edge  # to the nearest point of the segment
    dist = (gap * gap).sum(-1).clamp_min(tiny).sqrt()
    dist = torch.where(silhouette[b, f], dist, math.inf).amin(-1)  # (Q,)
    nearest = verts.new_full((B * H * W,), math.inf).scatter_reduce(
        0, (b * H + i) * W + j, dist, "amin").view(B, H, W)
    coverage = (PIXEL_HALF + torch.where(hard, nearest, -nearest)).clamp(0, 1)
    return torch.where(outline, coverage, hard.to(verts.dtype))


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

    def __init__(self, faces: torch.Tensor, face_uvs, image_size,
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
        self.n_vertices = int(faces.max()) + 1 if len(faces) else 0

    def forward(self, vertices, albedo, light, cam) -> dict:
        if vertices.dim() != 3 or vertices.shape[1] < self.n_vertices:
            raise ValueError(f"vertices must be (B, V >= {self.n_vertices}, 3), "
                             f"got {tuple(vertices.shape)}")
        screen = project(vertices, cam, self.image_size)  # (B, V, 3)
        fragments = rasterize(screen, self.faces, self.image_size, self.cull_backfaces)
        mask = (fragments.pix_to_face >= 0)[:, None].to(vertices.dtype)  # (B, 1, H, W)
        normals = interpolate(vertex_normals(vertices, self.faces), self.faces, fragments)
        normal_image = F.normalize(normals, dim=-1).permute(0, 3, 1, 2).contiguous()  # (B,3,H,W)
        if albedo.dim() == 4 and albedo.shape[:2] == (vertices.shape[0], 3):
            if self.face_uvs is None:
                raise ValueError("a texture albedo (B, 3, T, T') needs face_uvs")
            uv = interpolate(self.face_uvs.to(vertices.dtype), self.faces, fragments)
            albedo_image = sample_texture(albedo, uv) * mask  # (B, 3, H, W)
        elif albedo.shape == (*vertices.shape[:2], 3):
            albedo_image = interpolate(albedo, self.faces, fragments).permute(0, 3, 1, 2)
            albedo_image = albedo_image.contiguous()  # (B, 3, H, W)
        else:
            raise ValueError(f"albedo must be (B, 3, T, T') or (B, V, 3), "
                             f"got {tuple(albedo.shape)}")
        shading = sh_shading(normal_image, light) * mask
        soft_mask = soft_silhouette(screen, self.faces, self.neighbours, fragments.pix_to_face)
        return {"image": albedo_image * shading, "mask": mask, "soft_mask": soft_mask[:, None],
                "normal_image": normal_image, "albedo_image": albedo_image, "shading": shading,
                "fragments": fragments, "screen_vertices": screen}

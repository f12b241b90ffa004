"""Mesh rendering in plain PyTorch, the way DECA renders: an orthographic camera, a z-buffer
rasterizer, attribute interpolation, vertex normals, UV texturing and spherical-harmonics shading.

DiffFAE (Wang et al. 2024, §3.1) conditions its UNet on I_R, a Lambertian render of FLAME under the
query's pose, expression, light and camera with the source's shape and albedo, made the way DECA
(Feng et al. 2021) renders. This file is that renderer: plain tensor ops, one code path for
CPU, CUDA and MPS (tested on CPU).

Camera (DECA's orthographic camera, Feng et al. 2021):  ndc_xy = s · (xy + t),  cam = [s, tx, ty]
    pixels: x = (ndc_x + 1)·W/2,  y = (1 − ndc_y)·H/2 (image rows go down),  depth z_s = −z
    (world: right-handed, y up, +z toward the viewer, so a smaller depth is nearer).
    DECA also scales z by s, which does not change which surface is nearer for s > 0.
Rasterizer: pixel (row i, col j) is covered by a triangle when its centre p = (j+½, i+½) is
    inside: the edge functions E_k(p) = (b_k − a_k) × (p − a_k) (edge k runs from vertex k+1 to
    k+2) all share the sign of the doubled area A. Barycentrics λ_k = E_k(p)/A, depth Σ λ_k z_k;
    the nearest covering triangle wins, the lower face index on equal depths. A centre exactly on
    an edge belongs to the triangle whose inward edge normal n has n_x > 0, or n_x = 0 and
    n_y > 0 (a "top-left" rule), so meshes have no gaps and no double cover. Visibility is found
    without gradient; the winners' λ and depth are recomputed from the vertices so gradients
    reach them. No near/far clipping, no perspective correction (the camera is orthographic).
Shading (Ramamoorthi & Hanrahan 2001, "An efficient representation for irradiance environment
    maps": Lambertian irradiance is nearly all in the first 9 SH terms; DECA's constants c_k):
    shading_rgb = Σ_k light[k, rgb] · c_k · Y_k(n),  Y = [1, x, y, z, xy, xz, yz, x² − y², 3z² − 1];
    image = albedo · shading.

Shape letters: B batch, V vertices, F faces, H/W image height/width, T/T' texture height/width,
C channels, N faces of the whole batch (B·F), M faces in a chunk, (h, w) a chunk's tile of pixels,
Q covered (pixel, face) pairs, P covered pixels.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# Pixel (row i, col j) has its centre at (j + ½, i + ½).
PIXEL_CENTRE = 0.5
# (pixel, face) tests per chunk, each under ~50 bytes of temporaries: chunks of about 100 MB.
CANDIDATE_BUDGET = 2 ** 21
# A triangle is degenerate (skipped) when |doubled area| <= this × (longest edge)²: a sliver whose
# height is under 1e-6 of its length; float32 cannot resolve it (machine epsilon ~1.2e-7).
DEGENERATE_REL = 1e-6

# DECA's SH constants c_k (Feng et al. 2021): the real SH normalisations of Y_00 .. Y_22 times the
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


def _image_hw(image_size):
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or not all(isinstance(n, int) and n > 0 for n in hw):
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return hw


def project(vertices: torch.Tensor, cam: torch.Tensor, image_size) -> torch.Tensor:
    """DECA's orthographic camera to screen space (x right, y down in pixels; depth −z).

    Parameters: vertices (B, V, 3) world; cam (B, 3) = [s, tx, ty]; image_size int or (H, W).
    The NDC square [−1, 1]² spans the whole image, so non-square images stretch.
    Returns (B, V, 3) screen vertices.
    """
    H, W = _image_hw(image_size)
    if cam.shape != (vertices.shape[0], 3):
        raise ValueError(f"cam must be (B, 3) = [s, tx, ty], got {tuple(cam.shape)}")
    ndc = cam[:, None, :1] * (vertices[..., :2] + cam[:, None, 1:])  # (B, V, 2)
    x = (ndc[..., 0] + 1) * (W / 2)
    y = (1 - ndc[..., 1]) * (H / 2)
    return torch.stack([x, y, -vertices[..., 2]], dim=-1)  # (B, V, 3)


def _candidate_faces(verts, faces, H, W, cull_backfaces):
    """Step 1 of _nearest_faces: the faces that can cover a pixel centre, sorted by size class.
    Returns keep (N',) indices into the B·F faces, size_class (N',), the corners x, y, z
    (3, N') each, the doubled signed area (N',) and the box of centres col0, row0, box_h, box_w
    (N',) each."""
    B, nF = verts.shape[0], faces.shape[0]
    corners = verts.index_select(1, faces.T.reshape(-1)).view(B, 3, nF, 3)  # (B, corner, F, xyz)
    xyz = corners.permute(3, 1, 0, 2).reshape(3, 3, B * nF)  # (xyz, corner, N)
    x, y, z = xyz  # (3, N) each
    # Not degenerate (non-finite x, y fail that too), finite z, facing us when culling, box of
    # centres (col0..col1, row0..row1) on the image.
    area2 = (x[1] - x[0]) * (y[2] - y[0]) - (y[1] - y[0]) * (x[2] - x[0])  # (N,) doubled area A
    longest2 = ((x - x.roll(1, 0)) ** 2 + (y - y.roll(1, 0)) ** 2).amax(0)  # (N,)
    valid = (area2.abs() > DEGENERATE_REL * longest2) & z.isfinite().all(0)
    if cull_backfaces:
        valid &= area2 < 0  # counter-clockwise in world (y up) is A < 0 in y-down screen space
    col0 = torch.ceil(x.amin(0) - PIXEL_CENTRE).clamp(0, W).long()  # first centre >= min x
    col1 = torch.floor(x.amax(0) - PIXEL_CENTRE).clamp(-1, W - 1).long()  # last centre <= max x
    row0 = torch.ceil(y.amin(0) - PIXEL_CENTRE).clamp(0, H).long()
    row1 = torch.floor(y.amax(0) - PIXEL_CENTRE).clamp(-1, H - 1).long()
    box_h, box_w = row1 - row0 + 1, col1 - col0 + 1  # (N,)
    keep = (valid & (box_h > 0) & (box_w > 0)).nonzero().squeeze(1)  # (N',)
    log2_hw = torch.stack([box_h, box_w]).index_select(1, keep).double().log2().ceil().long()
    size_class, order = (log2_hw[0] * 64 + log2_hw[1]).sort()  # (N',); any log2 is < 64
    keep = keep.index_select(0, order)
    x, y, z = xyz.reshape(9, -1).index_select(1, keep).view(3, 3, -1)  # (3, N') each
    area2, col0, row0, box_h, box_w = (t.index_select(0, keep) for t in (
        area2, col0, row0, box_h, box_w))  # (N',) each
    return keep, size_class, (x, y, z), area2, (col0, row0, box_h, box_w)


def _edge_planes(x, y, z, area2):
    """Steps 2-3 of _nearest_faces: each face's three edge functions, as inward normal c,
    origin o and top-left threshold (3, N') each, and its depth plane d_x, d_y, d_0 (N',)."""
    # 2. Edge k runs from a = corner k+1 to b = corner k+2; signed to be positive inside,
    #    E_k(p) = sign(A)·(b − a) × (p − a) = c_x·(p_x − o_x) + c_y·(p_y − o_y), with the inward
    #    normal (c_x, c_y) = sign(A)·(a_y − b_y, b_x − a_x) and o an end of the edge; Σ_k E_k = |A|.
    ax, ay, bx, by = x.roll(-1, 0), y.roll(-1, 0), x.roll(-2, 0), y.roll(-2, 0)  # (3, N')
    cx, cy = (ay - by) * area2.sign(), (bx - ax) * area2.sign()
    # Exactness: o is the edge's lower end in (x, y) order, so the face across a shared edge
    # (wound alike) has the same o and exactly −c (a − b = −(b − a) in floats): it computes
    # exactly −E at every centre. E is exactly 0 at both ends (its two products cancel). So the
    # top-left rule alone decides a centre on an edge: E ≥ 0 where the inward normal points right
    # (or straight down), E > 0 elsewhere, written E ≥ the smallest normal float (no nonzero E
    # of pixel coordinates is smaller).
    b_first = (ax > bx) | ((ax == bx) & (ay > by))
    ox, oy = torch.where(b_first, bx, ax), torch.where(b_first, by, ay)
    top_left = (cx > 0) | ((cx == 0) & (cy > 0))  # (3, N')
    threshold = torch.full_like(cx, torch.finfo(cx.dtype).tiny).masked_fill_(top_left, 0)
    # 3. Depth is a plane over the screen: z(p) = Σ_k z_k·E_k(p)/|A| = d_x·p_x + d_y·p_y + d_0.
    c0 = -(cx * ox + cy * oy)  # E_k(p) = c_x·p_x + c_y·p_y + c0
    dx, dy, d0 = ((z * c).sum(0) / area2.abs() for c in (cx, cy, c0))  # (N',) each
    return (cx, cy), (ox, oy), threshold, (dx, dy, d0)


def _nearest_faces(verts: torch.Tensor, faces: torch.Tensor, H: int, W: int,
                   cull_backfaces: bool) -> torch.Tensor:
    """The z-buffer, without gradient: for each pixel the index (0..F−1) of the nearest face that
    covers its centre, −1 where none. verts (B, V, 3) screen space -> (B·H·W,) long.

    Each face is tested against the centres of its bounding box. Faces whose box height and width
    round up to the same powers of two (a size class) share one (h, w) tile, the class's largest
    height by largest width: ~1.5× the tests the boxes need, in a few dozen tensor ops per class."""
    B, nF = verts.shape[0], faces.shape[0]
    # 1. Faces that can cover a centre, by size class (_candidate_faces).
    keep, size_class, (x, y, z), area2, (col0, row0, box_h, box_w) = _candidate_faces(
        verts, faces, H, W, cull_backfaces)
    # 2.-3. Edge functions and depth planes (_edge_planes).
    (cx, cy), (ox, oy), threshold, (dx, dy, d0) = _edge_planes(x, y, z, area2)
    # 4. First pass: each pixel's minimum depth (compared in float32 whatever the input dtype).
    #    Each face tests its class's (h, w) tile of centres from its box's top-left pixel (those
    #    past its box fail), faces on the last (long) axis; E_k = column + row term, once each.
    item, face_index = keep // nF, keep % nF  # (N',) each
    first_pixel = (item * H + row0) * W + col0  # (N',) a box's top-left pixel in (B·H·W)
    left, top = col0.to(verts.dtype) + PIXEL_CENTRE, row0.to(verts.dtype) + PIXEL_CENTRE
    min_depth = torch.full((B * H * W,), math.inf, device=verts.device)
    found = []  # (pixel, depth, face) of every covered (pixel, face) pair
    ends = torch.unique_consecutive(size_class, return_counts=True)[1].cumsum(0).tolist()
    for start, end in zip([0] + ends[:-1], ends):  # faces start..end−1 share a size class
        h, w = int(box_h[start:end].max()), int(box_w[start:end].max())
        rows, cols = (torch.arange(n).to(left)[:, None] for n in (h, w))  # (h, 1), (w, 1)
        step = max(1, CANDIDATE_BUDGET // (h * w))
        for first in range(start, end, step):
            s = slice(first, min(first + step, end))  # the chunk's M faces
            px, py = left[s] + cols, top[s] + rows  # (w, M), (h, M) the tile's centres
            inside = (px < W) & (py < H)[:, None]  # (h, w, M) on the image
            for k in range(3):
                col_term = cx[k, s] * (px - ox[k, s])  # (w, M)
                row_term = cy[k, s] * (py - oy[k, s])  # (h, M)
                inside &= col_term + row_term[:, None] >= threshold[k, s]  # (h, w, M)
            r, c, m = inside.nonzero(as_tuple=True)  # (Q,) each
            depth = (dx[s] * px + d0[s]) + (dy[s] * py)[:, None]  # (h, w, M)
            depth = depth.view(-1).index_select(0, (r * w + c) * depth.shape[-1] + m).float()
            pixel = first_pixel[s].index_select(0, m) + r * W + c  # (Q,)
            min_depth.scatter_reduce_(0, pixel, depth, "amin")
            found.append((pixel, depth, face_index[s].index_select(0, m)))
    # 5. Second pass: the lowest face index among the faces at a pixel's minimum depth.
    nearest = torch.full((B * H * W,), nF, device=verts.device)
    for pixel, depth, face in found:
        at_min = depth == min_depth[pixel]
        nearest.scatter_reduce_(0, pixel[at_min], face[at_min], "amin")
    return torch.where(nearest < nF, nearest, -1)


def rasterize(verts: torch.Tensor, faces: torch.Tensor, image_size,
              cull_backfaces: bool = False) -> Fragments:
    """Z-buffer rasterization of screen-space triangles (the rules are in the module docstring).

    verts (B, V, 3) screen space (x right, y down, pixels; smaller z nearer); faces (F, 3) long,
    shared by the batch; image_size int or (H, W); cull_backfaces drops faces clockwise in world
    (y up), i.e. with A >= 0 in y-down screen space. Degenerate and non-finite triangles cover
    nothing. Returns Fragments, whose bary and depth carry gradients to verts.
    """
    H, W = _image_hw(image_size)
    if verts.dim() != 3 or verts.shape[-1] != 3 or faces.dim() != 2 or faces.shape[-1] != 3 \
            or faces.dtype != torch.long:
        raise ValueError(f"verts must be (B, V, 3) and faces (F, 3) long, got "
                         f"{tuple(verts.shape)} and {tuple(faces.shape)} {faces.dtype}")
    B, V = verts.shape[:2]
    with torch.no_grad():
        pix_to_face = _nearest_faces(verts.detach(), faces, H, W, cull_backfaces)  # (B·H·W,)
    # λ and depth of the winners, again from the vertices so that gradients reach them
    pix = (pix_to_face >= 0).nonzero().squeeze(1)  # (P,)
    item, row, col = pix // (H * W), pix % (H * W) // W, pix % W  # (P,) each
    px, py = col.to(verts.dtype) + PIXEL_CENTRE, row.to(verts.dtype) + PIXEL_CENTRE
    corner = item * V + faces.T.contiguous().index_select(1, pix_to_face.index_select(0, pix))
    coords = verts.reshape(-1, 3).T.contiguous().index_select(1, corner.view(-1))  # (3, 3·P)
    (x0, x1, x2), (y0, y1, y2), z = coords.view(3, 3, -1)  # (P,) each; z (3, P)
    e = torch.stack([(x2 - x1) * (py - y1) - (y2 - y1) * (px - x1),
                     (x0 - x2) * (py - y2) - (y0 - y2) * (px - x2),
                     (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)])  # (3, P) (b − a) × (p − a)
    bary_p = e / e.sum(0)  # the three sum to A at every p
    depth_p = (bary_p * z).sum(0)  # (P,)
    bary = verts.new_zeros(B * H * W, 3).index_copy_(0, pix, bary_p.T).view(B, H, W, 3)
    depth = verts.new_full((B * H * W,), math.inf).index_copy_(0, pix, depth_p).view(B, H, W)
    return Fragments(pix_to_face.view(B, H, W), bary, depth)


def interpolate(attrs: torch.Tensor, faces: torch.Tensor, fragments: Fragments) -> torch.Tensor:
    """Barycentric interpolation of attributes; zeros where empty.

    attrs: per-vertex (B, V, C), or per-face-corner (B, F, 3, C), (1, F, 3, C) or (F, 3, C)
    broadcast over B. A 3-D tensor whose first size is B is read as per-vertex (use (1, F, 3, C)
    to force per-corner). Returns (B, H, W, C).
    """
    (B, H, W), nF, C = fragments.pix_to_face.shape, faces.shape[0], attrs.shape[-1]
    flat = fragments.pix_to_face.reshape(-1)  # (B·H·W,)
    pix = (flat >= 0).nonzero().squeeze(1)  # (P,)
    face, item = flat[pix], pix // (H * W)  # (P,) each
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
    return values.new_zeros(B * H * W, C).index_copy(0, pix, values).view(B, H, W, C)


def face_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unnormalised face normals (v1 − v0) × (v2 − v0), length = 2·area; outward for faces that
    are counter-clockwise seen from outside. verts (B, V, 3) -> (B, F, 3)."""
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
    grid = torch.stack([2 * uv_image[..., 0] - 1, 1 - 2 * uv_image[..., 1]], -1)  # (B, H, W, 2)
    return F.grid_sample(texture, grid.to(texture.dtype), mode="bilinear",
                         padding_mode="border", align_corners=False)


def _sh_terms(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor):
    """DECA's 9 SH terms without constants: [1, x, y, z, xy, xz, yz, x² − y², 3z² − 1]."""
    return [torch.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1]


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """DECA's 9 SH basis functions at unit normals, constants c_k included. (..., 3) -> (..., 9)."""
    return torch.stack(_sh_terms(*normals.unbind(-1)), -1) * normals.new_tensor(SH_CONSTANTS)


def sh_shading(normal_image: torch.Tensor, light: torch.Tensor) -> torch.Tensor:
    """Irradiance shading Σ_k light[k, rgb] · c_k · Y_k(n). normal_image (B, 3, H, W)
    channels-first (like the images); light (B, 9, 3) coefficients × RGB. Returns (B, 3, H, W)."""
    if light.shape != (normal_image.shape[0], N_SH, 3):
        raise ValueError(f"light must be (B, {N_SH}, 3), got {tuple(light.shape)}")
    terms = torch.stack(_sh_terms(*normal_image.unbind(1)), 1)  # (B, 9, H, W)
    scaled = light * light.new_tensor(SH_CONSTANTS)[:, None]  # (B, 9, 3) c_k folded into light
    return torch.einsum("bkhw,bkc->bchw", terms, scaled)  # (B, 3, H, W)


class Renderer(nn.Module):
    """DECA-style Lambertian renderer: project, rasterize, interpolate, texture, SH-shade.

    faces (F, 3) long; face_uvs (F, 3, 2) UVs per face corner (v up) or None; image_size int or
    (H, W); cull_backfaces (default False: open meshes show their inside). forward(vertices
    (B, V, 3) world, albedo, light (B, 9, 3), cam (B, 3)) -> dict of image, mask, normal_image,
    albedo_image, shading (each (B, 3 or 1, H, W)), fragments, screen_vertices (B, V, 3). albedo
    is a UV texture (B, 3, T, T') in [0, 1] (needs face_uvs) or per-vertex colour (B, V, 3).
    """

    def __init__(self, faces: torch.Tensor, face_uvs, image_size,
                 cull_backfaces: bool = False):
        super().__init__()
        if face_uvs is not None and face_uvs.shape != (faces.shape[0], 3, 2):
            raise ValueError(f"face_uvs must be (F, 3, 2), got {tuple(face_uvs.shape)}")
        self.image_size = _image_hw(image_size)
        self.cull_backfaces = cull_backfaces
        self.register_buffer("faces", faces.clone(), persistent=False)  # the mesh's, not saved
        self.register_buffer("face_uvs", None if face_uvs is None else face_uvs[None].clone(),
                             persistent=False)

    def forward(self, vertices, albedo, light, cam) -> dict:
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
        elif albedo.shape == (*vertices.shape[:2], 3):  # per-vertex colour
            albedo_image = interpolate(albedo, self.faces, fragments)
            albedo_image = albedo_image.permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
        else:
            raise ValueError(f"albedo {tuple(albedo.shape)}: expected (B, 3, T, T') or (B, V, 3)")
        shading = sh_shading(normal_image, light) * mask
        return {"image": albedo_image * shading, "mask": mask, "normal_image": normal_image,
                "albedo_image": albedo_image, "shading": shading, "fragments": fragments,
                "screen_vertices": screen}

"""Benchmarks of the pipeline's hot parts on the current device (CUDA if available, else CPU).

rasterizer: render.rasterize on the built-in FLAME head (256×256, batch 8) against a brute-force
    reference written here — every face tested against every pixel of a box as large as the largest
    face's bounding box, then a two-pass z-buffer (min depth, then lowest face index at that depth).
    Prints ms per image, the speed-up and the fraction of pixels on which both pick the same face.

Run: python bench.py   (numbers vary when other processes share the CPU; rerun when it is quiet)

Shape letters: B batch, V vertices, F faces, H/W image size, M faces per chunk, K pixels per box.
"""
import math
import time

import torch

import render

IMAGE_SIZE = 256
BATCH = 8
WARMUP = 1
REPEATS = 5
# Candidate (face, pixel) pairs per chunk of the reference, as render.CANDIDATE_BUDGET.
REFERENCE_BUDGET = 2 ** 21
# DECA-like framing: orthographic scale s and the half-height (m) of the head part of the mesh; the
# image then spans 2/s = 0.25 m around the head's centre (the neck is cropped).
FRAME_SCALE = 8.0
HEAD_HALF_HEIGHT = 0.12
# Fallback mesh: front half of a level-5 icosphere (~10k faces, like FLAME's 9976) 0.2 m across.
FALLBACK_SUBDIVISIONS = 5
FALLBACK_RADIUS = 0.1


def load_head(device):
    """Vertices (1, V, 3) in metres and faces (F, 3) of the built-in FLAME head at zero
    coefficients, or a stand-in hemisphere (with a printed note) if flame cannot be built."""
    try:
        import flame
        model = flame.FLAME().to(device)
        with torch.no_grad():
            vertices = model(torch.zeros(1, model.n_shape, device=device),
                             torch.zeros(1, model.n_exp, device=device),
                             torch.zeros(1, 15, device=device))
        return vertices, model.faces, "FLAME head"
    except Exception as error:  # any failure building the head falls back, said out loud
        print(f"note: FLAME unavailable ({type(error).__name__}: {error}); using an icosphere")
    verts, faces = render.icosphere(FALLBACK_SUBDIVISIONS, device=device)
    front = (verts[faces][..., 2] > 0).all(-1)  # faces of the hemisphere facing the camera
    return verts[None] * FALLBACK_RADIUS, faces[front], "hemisphere (fallback)"


def frame_camera(vertices):
    """DECA camera [s, tx, ty] (B, 3) centring the head (the top 2·HEAD_HALF_HEIGHT of the mesh,
    its full width) in the image at scale FRAME_SCALE."""
    centre_x = (vertices[..., 0].amin(1) + vertices[..., 0].amax(1)) / 2  # (B,)
    centre_y = vertices[..., 1].amax(1) - HEAD_HALF_HEIGHT
    scale = torch.full_like(centre_x, FRAME_SCALE)
    return torch.stack([scale, -centre_x, -centre_y], -1)  # (B, 3)


def reference_rasterize(verts, faces, image_size):
    """Brute force: each face against every pixel of a box of the largest bounding-box size.
    verts (B, V, 3) screen space -> pix_to_face (B, H, W), −1 where empty."""
    B, nF, H, W = verts.shape[0], faces.shape[0], image_size, image_size
    tri = verts[:, faces].reshape(B * nF, 3, 3)  # (B·F, 3, 3)
    x, y, z = tri.unbind(-1)  # (B·F, 3) each
    left = torch.ceil(x.amin(-1) - 0.5).clamp(0, W).long()
    top = torch.ceil(y.amin(-1) - 0.5).clamp(0, H).long()
    box_w = int((torch.floor(x.amax(-1) - 0.5).clamp(-1, W - 1).long() - left).max()) + 1
    box_h = int((torch.floor(y.amax(-1) - 0.5).clamp(-1, H - 1).long() - top).max()) + 1
    rows = torch.arange(box_h, device=verts.device).repeat_interleave(box_w)  # (K,)
    cols = torch.arange(box_w, device=verts.device).repeat(box_h)
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])
    chunk = max(1, REFERENCE_BUDGET // (box_w * box_h))
    depth_buf = torch.full((B * H * W,), math.inf, device=verts.device, dtype=verts.dtype)
    found = []
    for start in range(0, B * nF, chunk):
        ids = torch.arange(start, min(start + chunk, B * nF), device=verts.device)  # (M,)
        row = top[ids, None] + rows  # (M, K)
        col = left[ids, None] + cols
        px = col + 0.5
        py = row + 0.5
        w = [(x[ids, (k + 2) % 3, None] - x[ids, (k + 1) % 3, None]) * (py - y[ids, (k + 1) % 3, None])
             - (y[ids, (k + 2) % 3, None] - y[ids, (k + 1) % 3, None]) * (px - x[ids, (k + 1) % 3, None])
             for k in range(3)]  # 3 × (M, K) edge functions
        same = ((w[0] >= 0) & (w[1] >= 0) & (w[2] >= 0)) | ((w[0] <= 0) & (w[1] <= 0) & (w[2] <= 0))
        hit = same & (row < H) & (col < W) & (area[ids, None].abs() > 0)
        depth = sum(w[k] * z[ids, k, None] for k in range(3)) / area[ids, None]  # (M, K)
        m, c = hit.nonzero(as_tuple=True)
        pixel = (ids[m] // nF * H + row[m, c]) * W + col[m, c]
        depth_buf.scatter_reduce_(0, pixel, depth[m, c], "amin")
        found.append((pixel, depth[m, c], ids[m] % nF))
    face_buf = torch.full((B * H * W,), nF, device=verts.device)
    for pixel, depth, face in found:  # second pass: the lowest face index at the minimum depth
        nearest = depth == depth_buf[pixel]
        face_buf.scatter_reduce_(0, pixel[nearest], face[nearest], "amin")
    return torch.where(face_buf < nF, face_buf, -1).view(B, H, W)


def time_ms(fn, device):
    """Median wall time of fn() in ms over REPEATS runs after WARMUP runs."""
    times = []
    for i in range(WARMUP + REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= WARMUP:
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def bench_rasterizer(device):
    """Rows (name, ms per image, note) for render.rasterize and the brute-force reference."""
    vertices, faces, mesh = load_head(device)
    vertices = vertices.expand(BATCH, -1, -1)
    cam = frame_camera(vertices)
    screen = render.project(vertices, cam, IMAGE_SIZE)  # (B, V, 3)
    with torch.no_grad():
        ours = render.rasterize(screen, faces, IMAGE_SIZE).pix_to_face
        reference = reference_rasterize(screen, faces, IMAGE_SIZE)
        fast = time_ms(lambda: render.rasterize(screen, faces, IMAGE_SIZE), device) / BATCH
        slow = time_ms(lambda: reference_rasterize(screen, faces, IMAGE_SIZE), device) / BATCH
    agree = (ours == reference).double().mean().item()
    covered = (ours >= 0).double().mean().item()
    setting = f"{mesh}, F={faces.shape[0]}, {IMAGE_SIZE}², B={BATCH}"
    return [("rasterize", fast, f"{setting}, {covered:.0%} covered"),
            ("rasterize (brute force)", slow, f"speed-up {slow / fast:.1f}x, "
                                              f"same face on {agree:.4%} of pixels")]


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = bench_rasterizer(device)
    width = max(len(name) for name, _, _ in rows)
    print(f"{'part':<{width}}  {'ms/image':>9}  notes")
    for name, ms, note in rows:
        print(f"{name:<{width}}  {ms:>9.2f}  {note}")


if __name__ == "__main__":
    main()

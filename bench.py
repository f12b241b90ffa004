"""Benchmarks of the pipeline's hot parts on the current device (CUDA if available, else CPU).

rasterizer: render.rasterize on the built-in FLAME head (256×256, batch 8), with and without
    back-face culling, against the brute-force reference_rasterize written here, with the
    speed-up and the fraction of pixels on which both pick the same face.
renderer: the whole render.Renderer forward, and forward + backward to the vertices.
flame: the FLAME forward for a batch of 64 random faces (ms per batch).
data: synthetic training pairs rendered per second at 64 px and 256 px.
diffusion: one UNet forward (batch 1) at the paper's scale (64×64×3 latent, 256 px images) and at
    the bundled tiny model's; a whole edit per image (estimator, FLAME, render, slots, identity,
    sampling, decoding) with DDIM-50 and DPM-Solver++(2M)-20; and each sampler's own arithmetic
    per step (with a free ε prediction), to show that the UNet is the cost.

Run: python bench.py   (a table of ms per image, median and best of REPEATS; numbers vary when
other processes share the CPU — rerun when it is quiet)

Shape letters: B batch, V vertices, F faces, H/W image size, K (face, pixel) pairs in a chunk.
"""
import math
import time

import torch

import render

IMAGE_SIZE = 256
BATCH = 8
WARMUP = 1
REPEATS = 5
# Faces per chunk of the brute-force reference (bounds its memory).
REFERENCE_FACES = 2 ** 15
# DECA-like framing: orthographic scale s and the half-height (m) of the head part of the mesh; the
# image then spans 2/s = 0.25 m around the head's centre (the neck is cropped).
FRAME_SCALE = 8.0
HEAD_HALF_HEIGHT = 0.12
FLAME_BATCH = 64
DATA_SIZES = ((64, 64), (256, 16))  # (image size, pairs per batch) of the data benchmark


def neutral_head(flame, batch):
    """The built-in head at zero coefficients: vertices (batch, V, 3) in metres."""
    with torch.no_grad():
        return flame(*(torch.zeros(batch, n, device=flame.faces.device)
                       for n in (flame.n_shape, flame.n_exp, 15)))


def frame_camera(vertices):
    """DECA camera [s, tx, ty] (B, 3) centring the head (the top 2·HEAD_HALF_HEIGHT of the mesh,
    its full width) in the image at scale FRAME_SCALE."""
    centre_x = (vertices[..., 0].amin(1) + vertices[..., 0].amax(1)) / 2  # (B,)
    centre_y = vertices[..., 1].amax(1) - HEAD_HALF_HEIGHT
    scale = torch.full_like(centre_x, FRAME_SCALE)
    return torch.stack([scale, -centre_x, -centre_y], -1)  # (B, 3)


def reference_rasterize(verts, faces, image_size):
    """The independent reference for render.rasterize (also used by its tests). Brute force:
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


def time_ms(fns, device, per=BATCH):
    """(median, best) wall time in ms of each function divided by `per`, run in turn REPEATS
    times after WARMUP rounds, so that a load change from other processes hits all alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    times = [[] for _ in fns]
    for i in range(WARMUP + REPEATS):
        for fn, kept in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= WARMUP:
                kept.append((time.perf_counter() - start) * 1e3)
    return [(sorted(t)[len(t) // 2] / per, min(t) / per) for t in times]


def bench_rasterizer(device, flame):
    """Rows (name, (median, best) ms per image, note): render.rasterize with and without back-face
    culling, and the brute-force reference, on the same screen-space head."""
    vertices = neutral_head(flame, 1).expand(BATCH, -1, -1)
    screen, faces = render.project(vertices, frame_camera(vertices), IMAGE_SIZE), flame.faces
    calls = [lambda: render.rasterize(screen, faces, IMAGE_SIZE).pix_to_face,
             lambda: render.rasterize(screen, faces, IMAGE_SIZE, cull_backfaces=True).pix_to_face,
             lambda: reference_rasterize(screen, faces, IMAGE_SIZE)]
    with torch.no_grad():
        ours, culled, reference = (call() for call in calls)
        fast, cull, slow = time_ms(calls, device)
    agree, agree_culled, covered = (t.double().mean().item() for t in (
        ours == reference, ours == culled, ours >= 0))
    return [("rasterize", fast, f"FLAME head, F={faces.shape[0]}, {IMAGE_SIZE}², B={BATCH}, "
                                f"{covered:.0%} covered; with bary + depth"),
            ("rasterize, cull_backfaces", cull, f"same face on {agree_culled:.4%} of pixels"),
            ("brute-force reference", slow, f"pix_to_face only; rasterize is "
                                            f"{slow[0] / fast[0]:.1f}x faster (medians); "
                                            f"same face on {agree:.4%} of pixels")]


def bench_renderer(device, flame):
    """Rows for the whole Renderer (normals, UV texture, SH shading), forward and forward +
    backward to the vertices."""
    renderer = render.Renderer(flame.faces, flame.face_uvs, IMAGE_SIZE).to(device)
    vertices = neutral_head(flame, BATCH)
    with torch.no_grad():
        albedo = flame.albedo(torch.zeros(BATCH, flame.n_albedo, device=device))
    cam = frame_camera(vertices)
    light = torch.zeros(BATCH, render.N_SH, 3, device=device)
    light[:, 0], light[:, 3] = 3.0, 1.0  # ambient and light from the front (+z)

    def forward_backward():
        leaf = vertices.detach().requires_grad_(True)
        renderer(leaf, albedo, light, cam)["image"].sum().backward()

    def forward():
        with torch.no_grad():
            renderer(vertices, albedo, light, cam)

    forward, both = time_ms([forward, forward_backward], device)
    return [("Renderer forward", forward, "project, rasterize, normals, UV texture, SH"),
            ("Renderer forward + backward", both, "gradient of the image sum to the vertices")]


def bench_flame(device, flame):
    """FLAME forward (blendshapes, joints, skinning) for a batch of FLAME_BATCH random faces."""
    gen = torch.Generator().manual_seed(0)
    shape = torch.randn(FLAME_BATCH, flame.n_shape, generator=gen).to(device)
    expression = torch.randn(FLAME_BATCH, flame.n_exp, generator=gen).to(device)
    pose = (0.2 * torch.randn(FLAME_BATCH, 15, generator=gen)).to(device)
    with torch.no_grad():
        (forward,) = time_ms([lambda: flame(shape, expression, pose)], device, per=1)
    note = f"ms per batch of {FLAME_BATCH}, V={flame.v_template.shape[0]}"
    return [("FLAME forward", forward, note)]


def bench_data(device, flame):
    """Synthetic training pairs per second (source + query rendered as one batch, on the CPU)."""
    from synthetic import SyntheticPortraits
    rows = []
    for size, batch in DATA_SIZES:
        data = SyntheticPortraits(size, "train", length=10 ** 5)
        items = (range(i, i + batch) for i in range(0, 10 ** 5, batch))  # fresh every run
        (ms,) = time_ms([lambda: data.__getitems__(next(items))], torch.device("cpu"), per=batch)
        rows.append((f"synthetic pair, {size}px", ms,
                     f"{1000 / ms[0]:.0f} pairs/s (median), batches of {batch}"))
    return rows


def bench_diffusion(device, flame):
    """Rows for the denoiser and whole edits (see the module docstring)."""
    from difffae import load_model, make_timesteps, sample_loop
    from sample import DEFAULT_CHECKPOINT
    from unet import UNet, UNetConfig
    rows = []
    paper = UNetConfig()
    unet = UNet(paper).to(device).eval()
    latent = torch.randn(1, paper.in_channels, 64, 64, device=device)
    context = torch.randn(1, 4, paper.context_dim, device=device)
    identity = torch.randn(1, paper.id_dim, device=device)
    with torch.no_grad():
        (forward,) = time_ms([lambda: unet(latent, 500, context, identity)], device, per=1)
    parameters = sum(p.numel() for p in unet.parameters()) / 1e6
    rows.append(("UNet forward, paper scale", forward, f"64×64 latent, {parameters:.0f}M "
                 "parameters, batch 1"))
    eps = torch.randn(1, paper.out_channels, 64, 64, device=device)
    alphas = torch.linspace(0.9991, 0.0047, 1000, device=device)  # any decreasing ᾱ will do
    for sampler, steps in (("ddim", 50), ("dpm++2m", 20)):
        timesteps = make_timesteps(steps, 1000)
        (ms,) = time_ms([lambda: sample_loop(lambda x, t: eps, eps, alphas, timesteps, sampler)],
                        device, per=steps)
        rows.append((f"{sampler} arithmetic per step", ms, "64×64×3 latent, ε given"))
    if not DEFAULT_CHECKPOINT.exists():
        print(f"note: {DEFAULT_CHECKPOINT} missing; skipping the tiny model's rows")
        return rows
    model = load_model(DEFAULT_CHECKPOINT, device)
    size = model.image_size
    images = torch.rand(2, 3, size, size, device=device) * 2 - 1
    with torch.no_grad():
        rendered, _ = model.render(model.estimator(images[:1]))
        cond = model.conditions(images[:1], rendered)
        z = torch.randn_like(cond["f_r"])
        (forward,) = time_ms([lambda: model.denoise(z, 500, cond)], device, per=1)
    parameters = sum(p.numel() for p in model.unet.parameters()) / 1e6
    rows.append(("UNet forward, tiny", forward, f"{z.shape[-1]}×{z.shape[-1]} latent, "
                 f"{parameters:.1f}M parameters, batch 1"))
    for sampler, steps in (("ddim", 50), ("dpm++2m", 20)):
        (ms,) = time_ms([lambda: model.edit(images[:1], images[1:], steps=steps,
                                            sampler=sampler)], device, per=1)
        rows.append((f"edit, {sampler} {steps} steps, tiny", ms, f"{size} px, one image"))
    return rows


def main():
    from flame import FLAME
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"ms per image, median and best of {REPEATS} interleaved runs")
    flame = FLAME().to(device)  # the built-in head
    rows = [row for part in (bench_rasterizer, bench_renderer, bench_flame, bench_data,
                             bench_diffusion) for row in part(device, flame)]
    width = max(len(name) for name, _, _ in rows)
    print(f"{'part':<{width}}  {'median':>7}  {'best':>7}  notes")
    for name, (median, best), note in rows:
        print(f"{name:<{width}}  {median:>7.2f}  {best:>7.2f}  {note}")


if __name__ == "__main__":
    main()

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

python bench.py --paper-step: the paper preset wired end to end on the CPU. Each stage runs as
    `train.py --preset paper` (256 px, batch 1, synthetic pairs rendered as drawn): one step
    from scratch (build, forward, backward, Adam, checkpoint, evaluation), then a second one
    resumed from that checkpoint; then sample.py edits at 256 px with 4 DPM-Solver++ steps. It
    prints each run's wall time and peak memory (RSS, from os.wait4) and each network's size.
python bench.py --gpu-check: the GPU figures of the README in one run of a few minutes. Every
    stage trains a few steps of train.py at the paper preset (batch 16, bf16 autocast), which
    gives the peak GPU memory per stage and the ldm stage's steps/s; a 2-process nccl DDP run of
    the ldm stage when two GPUs are present; the latency of a 256 px edit with DPM-Solver++(2M)
    20 and DDIM 50, in bf16 and float32. `--device cpu` is its dry run: the same code at tiny
    sizes with bf16 autocast on the CPU and a gloo DDP run (tests/test_gpu_check.py runs it).

Shape letters: B batch, V vertices, F faces, H/W image size, K (face, pixel) pairs in a chunk.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import render
from sample import check_device, fail

ROOT = Path(__file__).resolve().parent

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
    from checkpoint import load_model
    from samplers import SAMPLERS, make_timesteps
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
        (ms,) = time_ms([lambda: SAMPLERS[sampler](lambda x, t: eps, eps, alphas, timesteps)],
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


# -- The paper preset's step on the CPU and the GPU check: train.py's stages in order -------------

# One step of every stage at the paper preset's sizes with batch 1, then a second, resumed one
# (the checkpoint's round trip); the PatchGAN on from step 0, so that its terms run too.
PAPER_STEP = ["--preset", "paper", "--batch_size=1", "--eval_items=1"]
STAGE_ARGS = {"vqvae": ["--vqvae.disc_start=0"], "ldm": ["--diffusion.sample_steps=2"]}
# The GPU check: the paper preset (its batch of 16) on CUDA; the CPU dry run at tiny sizes.
# steps per stage (ldm_steps for the ldm stage, whose speed is measured from logged step `warm`
# on), steps of the DDP run, and the (sampler, steps) of the timed edits.
CHECK = {"cuda": {"args": ["--preset", "paper", "--pool=64", "--eval_items=2"],
                  "steps": 3, "ldm_steps": 25, "warm": 5, "ddp_steps": 20,
                  "edits": (("dpm++2m", 20), ("ddim", 50))},
         "cpu": {"args": ["--preset", "tiny", "--image_size=32", "--batch_size=2", "--pool=8",
                          "--identities=4", "--eval_items=2", "--bf16_cpu=true"],
                 "steps": 2, "ldm_steps": 8, "warm": 2, "ddp_steps": 4,
                 "edits": (("dpm++2m", 2), ("ddim", 3))}}


def run_measured(command, env=None):
    """Runs a command; returns (wall s, peak resident memory in GiB, exit status, output)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own peak, not the session's
    process.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - started, usage.ru_maxrss / 2 ** 20, process.returncode, output


def train_command(stage, out, *args):
    return [sys.executable, "train.py", "--stage", stage, *args, *STAGE_ARGS.get(stage, []),
            f"--out={out}"]


def parameter_counts(config):
    """Parameters of every network (millions), built on the meta device from the ldm
    checkpoint's config."""
    from estimator import ArcMarginHead, CoefficientEstimator, EstimatorConfig
    from estimator import IdentityConfig, IdentityEncoder
    from slots import RegionSlots, SlotsConfig
    from unet import UNet, UNetConfig
    from vqvae import PatchDiscriminator, VQConfig, VQVAE
    vq, identity = VQConfig(**config["vqvae"]), IdentityConfig(**config["identity"])
    with torch.device("meta"):
        networks = {
            "VQ-VAE": VQVAE(vq), "PatchGAN discriminator": PatchDiscriminator(
                vq.in_channels, vq.disc_channels, vq.disc_layers, vq.norm_groups),
            "region encoder φ^E + slot attention + decoder ζ": RegionSlots(
                SlotsConfig(**config["slots"])),
            "coefficient estimator": CoefficientEstimator(EstimatorConfig(**config["estimator"])),
            "identity encoder": IdentityEncoder(identity),
            "ArcFace head": ArcMarginHead(identity.embedding_dim, config["train"]["identities"]),
            "UNet ε_θ": UNet(UNetConfig(**config["unet"]))}
    return {name: sum(p.numel() for p in net.parameters()) / 1e6
            for name, net in networks.items()}


def paper_step(out):
    """Every stage at the paper preset's sizes on the CPU (see PAPER_STEP), then an edit of
    4 DPM-Solver++ steps with sample.py; prints Markdown tables of time, memory, parameters."""
    import stages
    print("| stage | run | wall time | peak memory (RSS) |\n|---|---|---|---|")
    for stage in stages.STAGES:
        for steps, what in ((1, "step 1 from scratch"), (2, "step 2, resumed")):
            wall, rss, status, output = run_measured(train_command(
                stage, out, *PAPER_STEP, f"--steps={steps}"))
            if status:
                raise SystemExit(f"{stage} failed:\n{output[-3000:]}")
            print(f"| {stage} | {what} | {wall:.0f} s | {rss:.1f} GiB |", flush=True)
    ckpt = Path(out) / "ldm" / "ckpt.pt"
    wall, rss, status, output = run_measured(
        [sys.executable, "sample.py", "examples/src.png", "examples/qry.png", "--ckpt", str(ckpt),
         "--sampler", "dpm++2m", "--steps", "4", "--panel", "--out", str(Path(out) / "edit.png")])
    if status:
        raise SystemExit(f"sample.py failed:\n{output[-3000:]}")
    print(f"| edit (sample.py) | DPM-Solver++(2M), 4 steps | {wall:.0f} s | {rss:.1f} GiB |")
    config = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True)["config"]
    print("\n| network | parameters |\n|---|---|")
    for name, millions in parameter_counts(config).items():
        print(f"| {name} | {millions:.1f}M |")


def logged_speed(log, first):
    """Steps per second of a train.py log.jsonl from logged step `first` to the last one."""
    lines = [json.loads(line) for line in open(log)]
    lines = [line for line in lines if "time" in line and line["step"] >= first]
    return (lines[-1]["step"] - lines[0]["step"]) / (lines[-1]["time"] - lines[0]["time"])


def gpu_check(device, out):
    """The measurements for the README's GPU table (see CHECK); prints it in Markdown."""
    import stages
    import train
    from checkpoint import load_model
    from synthetic import SyntheticPortraits
    check, cuda = CHECK[device.type], device.type == "cuda"
    rows = []

    def peak():
        if not cuda:
            return "— (CPU)"
        gib = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.empty_cache()  # the cache goes back too: the DDP run needs this GPU
        torch.cuda.reset_peak_memory_stats()
        return f"{gib:.1f} GiB"

    peak()
    for stage in stages.STAGES:  # train.py's loop in this process, bf16 autocast on CUDA
        steps = check["ldm_steps"] if stage == "ldm" else check["steps"]
        cfg, parts = train.build_configs(train_command(stage, out, *check["args"], "--log_every=1",
                                                       f"--steps={steps}")[2:])
        started = time.perf_counter()
        train.train(cfg, parts)
        rows.append((f"peak GPU memory, {stage} stage", peak(), f"{steps} steps of train.py, "
                     f"batch {cfg.batch_size}, {cfg.image_size} px, evaluation included, "
                     f"{time.perf_counter() - started:.0f} s"))
    speed = logged_speed(Path(out) / "ldm" / "log.jsonl", check["warm"])
    rows.insert(0, ("ldm training speed, bf16", f"{speed:.2f} steps/s", f"steps {check['warm']}"
                    f"–{check['ldm_steps']}, batch {cfg.batch_size} on one GPU"))
    gpus = torch.cuda.device_count()
    ddp = f"DDP, 2 processes ({'nccl' if cuda else 'gloo'}), ldm, {check['ddp_steps']} steps"
    if cuda and gpus < 2:
        rows.insert(1, (ddp, "skipped", f"{gpus} GPU visible; it needs 2"))
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        wall, _, status, output = run_measured(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             *train_command("ldm", out, *check["args"], "--tag=ddp", "--log_every=1",
                            f"--steps={check['ddp_steps']}")[1:]], env)
        if status:
            raise SystemExit(f"the DDP run failed:\n{output[-3000:]}")
        speed = logged_speed(Path(out) / "ldm-ddp" / "log.jsonl", check["warm"])
        rows.insert(1, (ddp, f"{speed:.2f} steps/s", f"rank 0's log, {wall:.0f} s in all"))
    model = load_model(Path(out) / "ldm" / "ckpt.pt", device)
    pair = SyntheticPortraits(model.image_size, "test", length=1)[0]
    source, query = (pair[key][None].to(device) for key in ("source", "query"))
    for sampler, steps in check["edits"]:
        for precision in ("bf16", "float32"):
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                (ms,) = time_ms([lambda: model.edit(source, query, steps=steps,
                                                    sampler=sampler)], device, per=1)
            rows.append((f"edit, {sampler} {steps} steps, {precision}", f"{ms[0] / 1e3:.2f} s",
                         f"{model.image_size} px, batch 1, median of {REPEATS}"))
    rows.append(("peak GPU memory, edit", peak(), "the four edits above"))
    name = torch.cuda.get_device_name(device) if cuda else "CPU (dry run, tiny sizes)"
    print(f"\n{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, {gpus} GPU(s)\n")
    print("| measurement | value | setting |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.error = fail
    command = parser.add_mutually_exclusive_group()
    command.add_argument("--gpu-check", action="store_true", help="the GPU table of the README")
    command.add_argument("--paper-step", action="store_true",
                         help="one step of every stage at the paper preset's sizes on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cuda", "cpu"), help="--gpu-check's device (cpu: a dry run)")
    parser.add_argument("--out", help="checkpoints of --gpu-check / --paper-step (default: a "
                        "temporary folder, removed after)")
    args = parser.parse_args()
    try:
        check_device(args.device)
    except ValueError as error:
        fail(error)
    if args.gpu_check or args.paper_step:
        with tempfile.TemporaryDirectory() as temporary:
            out = Path(args.out or temporary)
            if args.gpu_check:
                gpu_check(torch.device(args.device), out)
            else:
                paper_step(out)
        return
    from flame import FLAME
    device = torch.device(args.device)
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

"""Benchmarks of the pipeline's hot parts on the current device (CUDA if available, else CPU).

    python -m tools.bench         a table of ms per image, median and best of REPEATS:
        rasterizer  render.rasterize on the built-in FLAME head (256×256, batch 8), with and
                    without back-face culling;
        renderer    the whole render.Renderer forward, and forward + backward to the vertices;
        flame       the FLAME forward for a batch of 64 random faces (ms per batch);
        data        synthetic training pairs rendered per second at 64 px and 256 px;
        diffusion   one UNet forward (batch 1) at the paper's scale (64×64×3 latent) and at the
                    bundled tiny model's; a whole edit with DDIM-50 and DPM-Solver++(2M)-20; each
                    sampler's own arithmetic per step (ε given), to show that the UNet is the cost.
    python -m tools.bench --paper-step  every stage of `train.py --preset paper` (256 px, batch
        1) on the CPU: one step from scratch, one resumed, then a 256 px sample.py edit; each
        run's wall time and peak memory (RSS, from os.wait4), and each network's size.
    python -m tools.bench --rehearse PRESET  every stage's first step at the preset's real
        sizes on the CPU (batch included): wall time and peak memory, the FLOPs of a forward and
        backward, and the GPU step rate they imply at an assumed sustained rate.
    python -m tools.bench --ldm-step    the tiny preset's ldm training step on the CPU as it was
        (the region encoder twice, the frozen parts run every step) and as it is (once, cached),
        side by side: median ms and steps per CPU-second.
    python -m tools.bench --gpu-check   a few train.py steps of every stage at the paper preset
        (bf16 autocast): peak GPU memory per stage, the ldm stage's steps/s, a 2-process DDP run
        when two GPUs are present, and the latency of a 256 px edit. `--device cpu` is its dry run
        at tiny sizes (bf16 autocast on the CPU, a gloo DDP run).

Shape letters: B batch, V vertices, F faces, H/W image size.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import render
from training.config import STAGES, build_configs, stage_defaults
from runtime.cli import DEFAULT_CHECKPOINT, Parser, check_device, fail, run

ROOT = Path(__file__).resolve().parents[1]

IMAGE_SIZE = 256
BATCH = 8
WARMUP = 1
REPEATS = 5
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
    culling on the same screen-space head."""
    vertices = neutral_head(flame, 1).expand(BATCH, -1, -1)
    screen, faces = render.project(vertices, frame_camera(vertices), IMAGE_SIZE), flame.faces
    calls = [lambda: render.rasterize(screen, faces, IMAGE_SIZE).pix_to_face,
             lambda: render.rasterize(screen, faces, IMAGE_SIZE, cull_backfaces=True).pix_to_face]
    with torch.no_grad():
        ours, culled = (call() for call in calls)
        fast, cull = time_ms(calls, device)
    agree_culled, covered = (t.double().mean().item() for t in (ours == culled, ours >= 0))
    return [("rasterize", fast, f"FLAME head, F={faces.shape[0]}, {IMAGE_SIZE}², B={BATCH}, "
                                f"{covered:.0%} covered; with bary + depth"),
            ("rasterize, cull_backfaces", cull, f"same face on {agree_culled:.4%} of pixels")]


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
    from assets.synthetic import SyntheticPortraits
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
    from runtime.checkpoint import load_model
    from samplers import SAMPLERS, make_timesteps
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
# (the checkpoint's round trip).
PAPER_STEP = ["--preset", "paper", "--batch_size=1", "--eval_items=1"]
STAGE_ARGS = {"ldm": ["--diffusion.sample_steps=2"]}
# The GPU check: the paper preset (its batch of 16) on CUDA; the CPU dry run at tiny sizes.
# steps per stage (ldm_steps for the ldm stage, whose speed is measured from logged step `warm`
# on), steps of the DDP run, and the (sampler, steps) of the timed edits.
CHECK = {"cuda": {"args": ["--preset", "paper", "--pool=64", "--eval_items=2",
                           "--workers=16"],
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
    from estimator import CoefficientEstimator, EstimatorConfig
    from training.arcface import ArcMarginHead
    from estimator import IdentityConfig, IdentityEncoder
    from slots import RegionSlots, SlotsConfig
    from unet import UNet, UNetConfig
    from vqvae import VQConfig, VQVAE
    vq, identity = VQConfig(**config["vqvae"]), IdentityConfig(**config["identity"])
    with torch.device("meta"):
        networks = {
            "VQ-VAE": VQVAE(vq),
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
    print("| stage | run | wall time | peak memory (RSS) |\n|---|---|---|---|")
    for stage in STAGES:
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


# --rehearse PRESET: each stage's first step at the preset's real sizes on the CPU, and the GPU
# step rate its FLOPs imply at an assumed sustained rate: small 64 px networks keep a GPU far
# from the 790 TFLOP/s an H200 reaches on large bf16 matrix products, so one eighth is assumed.
ASSUMED_TFLOPS = 100


class FlopCount(TorchDispatchMode):
    """Within the block, adds up the FLOPs of every operator that PyTorch's flop counter has a
    formula for (matrix products, convolutions, attention; torch.utils.flop_counter)."""
    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **(kwargs or {}),
                                                              out_val=out)
        return out


def step_cost(cfg, parts):
    """(FLOPs, seconds, trained parameters) of one forward and backward of the stage that
    (cfg, parts) describe, on the CPU, with a batch of synthetic pairs. The ldm stage's step is
    counted as it trains: with the frozen parts' outputs from its cache, computed beforehand."""
    from training import stages
    from training.frozen_cache import pair_inputs
    from assets.synthetic import SyntheticPortraits
    stage = stages.build(cfg, parts, torch.device("cpu"), cfg.identities)
    data = SyntheticPortraits(cfg.image_size, "train", cfg.seed, length=cfg.batch_size,
                              identities=cfg.identities)
    batch = default_collate(data.__getitems__(range(cfg.batch_size)))
    if cfg.stage == "ldm" and cfg.frozen_cache:
        frozen = pair_inputs(stage.model, batch)
        stage.cache, batch["index"] = (lambda index: frozen), torch.arange(cfg.batch_size)
    started = time.perf_counter()
    with FlopCount() as count:
        stage(batch, 0)["loss"].backward()
    trained = sum(p.numel() for p in stage.parameters() if p.requires_grad)
    return count.total, time.perf_counter() - started, trained


def rehearse(preset, out):
    """Every stage of `preset` at its real sizes on the CPU: train.py's first step (its wall
    time from start to checkpoint and its peak memory), then one forward and backward counted
    (FLOPs) and timed; prints a Markdown table with the GPU step rate the FLOPs imply."""
    print(f"| stage | batch | trained parameters | GFLOP a step | first step of train.py (wall, "
          f"peak RSS) | CPU forward + backward | GPU estimate at {ASSUMED_TFLOPS} TFLOP/s |\n"
          f"|---|---|---|---|---|---|---|")
    for stage in STAGES:
        options = ["--stage", stage, "--preset", preset, f"--out={out}", "--steps=1",
                   "--pool=64", "--eval_items=2", "--workers=0", "--time_limit=0"]
        wall, rss, status, output = run_measured([sys.executable, "train.py", *options])
        if status:
            raise SystemExit(f"{stage} failed:\n{output[-3000:]}")
        cfg, parts = build_configs(options)
        flops, seconds, trained = step_cost(cfg, parts)
        rate = ASSUMED_TFLOPS * 1e12 / flops
        limit = stage_defaults(stage, preset)[0].time_limit  # the preset's, not the one above
        steps = f", {rate * limit:.0f} steps in its {limit:g} s" if limit else ""
        print(f"| {stage} | {cfg.batch_size} | {trained / 1e6:.1f}M | {flops / 1e9:.0f} | "
              f"{wall:.0f} s, {rss:.1f} GiB | {seconds:.1f} s | {rate:.0f} steps/s{steps} |",
              flush=True)


# --ldm-step: the tiny preset's ldm step three ways, side by side
LDM_STEP_REPEATS = 12


def ldm_step(out):
    """The tiny preset's ldm training step (64 px, batch 8, forward and backward) as it was and
    as it is: the region encoder run twice on the source (a pass for the conditions, one for
    the slots term) with the frozen parts run; once, frozen parts run (`--frozen_cache=false`);
    once, frozen parts cached (the preset). Random weights, which do not change the time; a
    pool of 8 pairs under `out`. Prints a Markdown table of median milliseconds, interleaved."""
    from training import stages
    from assets.synthetic import true_coefficients
    from training import datasets
    from slots import pretraining_loss
    options = [f"--out={out}", "--pool=8", "--identities=8"]
    stages.write_random_parts(out, options)
    cfg, parts = build_configs(["--stage", "ldm", *options])
    stage = stages.build(cfg, parts, torch.device("cpu"), cfg.identities).train()
    pool = datasets.make_dataset(cfg, master=True)
    batch = default_collate(pool.__getitems__(range(cfg.batch_size)))
    model = stage.model
    model.set_latent_scale(batch["query"])
    stage.prepare(pool, master=True)
    cache = stage.cache

    def twice():  # the slots term outside the loss, with a second pass of the region encoder
        d = model.diffusion
        weight, d.slots_weight = d.slots_weight, 0.0
        try:
            losses = model.loss(batch["source"], batch["query"], true_coefficients(batch, "query"))
        finally:
            d.slots_weight = weight
        held = pretraining_loss(model.slots, batch["source"], model.vqvae.encode(batch["source"]),
                                batch["source_regions"], d.slots_supervision)
        return losses["loss"] + weight * held["loss"]

    def once(cached):
        stage.cache = cache if cached else None
        return stage(batch, 0)["loss"]

    ways = {"region encoder twice, frozen parts run (before)": twice,
            "region encoder once, frozen parts run": lambda: once(False),
            "region encoder once, frozen parts cached (now)": lambda: once(True)}
    times = {name: [] for name in ways}
    for repeat in range(WARMUP + LDM_STEP_REPEATS):
        for name, loss in ways.items():
            started = time.perf_counter()
            loss().backward()
            stage.zero_grad(set_to_none=True)
            if repeat >= WARMUP:
                times[name].append(time.perf_counter() - started)
    medians = {name: float(torch.tensor(values).median()) for name, values in times.items()}
    first = next(iter(medians.values()))
    print(f"torch threads: {torch.get_num_threads()}; median of {LDM_STEP_REPEATS} interleaved "
          f"steps\n"
          f"| the step | ms | steps per CPU-second |\n|---|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {median * 1000:.0f} | {first / median:.2f}× |")


def logged_speed(log, first):
    """Steps per second of a train.py log.jsonl from logged step `first` to the last one."""
    lines = [json.loads(line) for line in open(log)]
    lines = [line for line in lines if "time" in line and line["step"] >= first]
    return (lines[-1]["step"] - lines[0]["step"]) / (lines[-1]["time"] - lines[0]["time"])


def train_stages(check, out, peak, cuda):
    """Rows of every stage trained for a few steps in this process (bf16 autocast on CUDA),
    then the ldm stage's speed and a 2-process DDP run of it; returns (rows, batch size)."""
    import train
    rows = []
    for stage in STAGES:
        steps = check["ldm_steps"] if stage == "ldm" else check["steps"]
        cfg, parts = build_configs(train_command(stage, out, *check["args"], "--log_every=1",
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
        return rows
    env = dict(os.environ, OMP_NUM_THREADS="1")
    wall, _, status, output = run_measured(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *train_command("ldm", out, *check["args"], "--tag=ddp", "--log_every=1",
                        f"--steps={check['ddp_steps']}")[1:]], env)
    if status:
        raise SystemExit(f"the DDP run failed:\n{output[-3000:]}")
    speed = logged_speed(Path(out) / "ldm-ddp" / "log.jsonl", check["warm"])
    rows.insert(1, (ddp, f"{speed:.2f} steps/s", f"rank 0's log, {wall:.0f} s in all"))
    return rows


def time_edits(check, out, device):
    """Rows of the latency of one edit by the ldm checkpoint in `out`, per sampler and
    precision."""
    from runtime.checkpoint import load_model
    from assets.synthetic import SyntheticPortraits
    model = load_model(Path(out) / "ldm" / "ckpt.pt", device)
    pair = SyntheticPortraits(model.image_size, "test", length=1)[0]
    source, query = (pair[key][None].to(device) for key in ("source", "query"))
    rows = []
    for sampler, steps in check["edits"]:
        for precision in ("bf16", "float32"):
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                (ms,) = time_ms([lambda: model.edit(source, query, steps=steps,
                                                    sampler=sampler)], device, per=1)
            rows.append((f"edit, {sampler} {steps} steps, {precision}", f"{ms[0] / 1e3:.2f} s",
                         f"{model.image_size} px, batch 1, median of {REPEATS}"))
    return rows


def gpu_check(device, out):
    """The measurements for the README's GPU table (see CHECK); prints it in Markdown."""
    check, cuda = CHECK[device.type], device.type == "cuda"

    def peak():
        if not cuda:
            return "— (CPU)"
        gib = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.empty_cache()  # the cache goes back too: the DDP run needs this GPU
        torch.cuda.reset_peak_memory_stats()
        return f"{gib:.1f} GiB"

    peak()
    rows = train_stages(check, out, peak, cuda) + time_edits(check, out, device)
    rows.append(("peak GPU memory, edit", peak(), "the four edits above"))
    name = torch.cuda.get_device_name(device) if cuda else "CPU (dry run, tiny sizes)"
    print(f"\n{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{torch.cuda.device_count()} GPU(s)\n")
    print("| measurement | value | setting |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main():
    parser = Parser(description=__doc__.splitlines()[0])
    command = parser.add_mutually_exclusive_group()
    command.add_argument("--gpu-check", action="store_true", help="the GPU table of docs/gpu.md")
    command.add_argument("--paper-step", action="store_true",
                         help="one step of every stage at the paper preset's sizes on the CPU")
    command.add_argument("--rehearse", metavar="PRESET", choices=("tiny", "paper", "gpu"),
                         help="every stage's first step at the preset's real sizes on the CPU: "
                              "time, memory, FLOPs and the GPU rate they imply")
    command.add_argument("--ldm-step", action="store_true",
                         help="the tiny preset's ldm step with and without its savings, on the "
                              "CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cuda", "cpu"), help="--gpu-check's device (cpu: a dry run)")
    parser.add_argument("--out", help="checkpoints of --gpu-check, --paper-step, --rehearse, "
                        "--ldm-step (default: a temporary folder, removed after)")
    args = parser.parse_args()
    try:
        check_device(args.device)
    except ValueError as error:
        fail(error)
    if args.gpu_check or args.paper_step or args.rehearse or args.ldm_step:
        with tempfile.TemporaryDirectory() as temporary:
            out = Path(args.out or temporary)
            if args.gpu_check:
                gpu_check(torch.device(args.device), out)
            elif args.rehearse:
                rehearse(args.rehearse, out)
            elif args.ldm_step:
                ldm_step(out)
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
    run(main)

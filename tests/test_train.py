"""The training program: config parsing, one step of every stage, resume, DDP, clear errors."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import default_collate

from runtime import guard
from training import config, datasets
from training import stages
import train
from training.config import build_configs
from fitting.fit import photometric_loss
from layers import FACE
from slots import masks_at
from assets.synthetic import SyntheticPortraits, export_synthetic, true_coefficients

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--image_size=32", "--batch_size=2", "--pool=8", "--identities=4", "--eval_items=8",
         "--log_every=1", "--warmup=1"]


def run(args, out, **kwargs):
    """Runs train.py in a subprocess (as a user would) and returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args, *SMALL,
                           f"--out={out}"], capture_output=True, text=True, cwd=ROOT, **kwargs)


def test_overrides_are_typed_and_unknown_keys_rejected():
    cfg, parts = build_configs(["--stage", "vqvae", "--lr=0.5", "--bf16=false",
                                      "--vqvae.channel_mult=1,2", "--vqvae.codebook_size=64"])
    assert cfg.lr == 0.5 and cfg.bf16 is False
    assert parts["vqvae"].channel_mult == (1, 2) and parts["vqvae"].codebook_size == 64
    assert cfg.steps == config.PRESETS["tiny"]["vqvae"]["train"]["steps"]
    with pytest.raises(train.ConfigError, match="unknown key"):
        build_configs(["--stage", "vqvae", "--learning_rate=1"])
    with pytest.raises(train.ConfigError, match="expected int"):
        build_configs(["--stage", "vqvae", "--steps=many"])
    with pytest.raises(ValueError, match="norm_groups"):  # the part's own validation
        build_configs(["--stage", "vqvae", "--vqvae.base_channels=12"])
    # a config's options apply together: its checks between fields see the final values, in
    # any order (the tiny preset has γ = 5 and a floor of 1, which γ = 0 alone would refuse)
    for order in (1, -1):
        _, parts = build_configs(["--stage", "ldm", *["--diffusion.min_snr_gamma=0",
                                                      "--diffusion.snr_floor=0"][::order]])
        assert (parts["diffusion"].min_snr_gamma, parts["diffusion"].snr_floor) == (0, 0)


@pytest.fixture(scope="module")
def batch():
    items = SyntheticPortraits(32, "train", length=2, identities=2).__getitems__([0, 1])
    return default_collate(items)


def small_configs(stage, tmp_path):
    cfg, parts = build_configs(["--stage", stage, *SMALL, f"--out={tmp_path}"])
    return cfg, parts


@pytest.mark.parametrize("stage", ["vqvae", "estimator", "identity", "slots"])
def test_a_few_steps_of_every_stage_lower_the_loss(stage, batch, tmp_path):
    torch.manual_seed(0)
    if stage == "slots":  # needs a VQ-VAE checkpoint
        cfg, parts = small_configs("vqvae", tmp_path)
        vq = stages.build(cfg, parts, torch.device("cpu"), 2)
        guard.atomic_save({"model": vq.state_dict(), "config": {"vqvae": vars(parts["vqvae"])}},
                          tmp_path / "vqvae" / "ckpt.pt")
    cfg, parts = small_configs(stage, tmp_path)
    model = stages.build(cfg, parts, torch.device("cpu"), n_identities=2)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(6):
        loss = model(batch, step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.after_step(batch, step)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_estimator_expression_mesh_term_counts_millimetres_moved(batch, tmp_path):
    """A prediction exact but for one expression coefficient, off by e, jaw closed: every vertex
    is off by e·E_k[v] (zero pose: no skinning, no pose correctives), so the term is
    e²·mean_v ‖E_k[v]‖² / scale²."""
    stage = stages.build(*small_configs("estimator", tmp_path), torch.device("cpu"), 2)
    closed = dict(batch)
    for image in ("source", "query"):
        params = closed[f"{image}_params"] = dict(batch[f"{image}_params"])
        params["pose6"] = params["pose6"].clone()
        params["pose6"][:, 3:] = 0  # the jaw closed
    predicted = {key: torch.cat([true_coefficients(closed, image)[key]
                                 for image in ("source", "query")])
                 for key in stages.COEFFICIENT_SCALE}
    k, e = 2, 0.4
    predicted["expression"][:, k] += e
    stage.estimator.forward = lambda images: predicted
    term = stage(closed, 0)["expression_mesh_loss"]
    flame = stage.fixed["flame"]
    direction = flame.blenddirs[:, :, flame.n_shape + k].double()  # (V, 3)
    expected = e ** 2 * direction.pow(2).sum(1).mean() / stages.EXPRESSION_MESH_SCALE ** 2
    assert term.item() == pytest.approx(expected.item(), rel=1e-4)


def test_the_estimator_learns_from_frames_without_coefficients(tmp_path):
    """--data=PATH for the estimator stage: item i is synthetic pair i // F beside clip i % F of
    the folder, and the loss gains the frames' photometric loss, on the face slot's pixels,
    with its own weight; the frames' coefficients are never read."""
    folder = tmp_path / "vox"
    clips = export_synthetic(folder, 3, 32)
    for clip in clips:
        (clip / "params.json").unlink()  # withheld: nothing may depend on them
    options = ["--stage", "estimator", *SMALL, f"--out={tmp_path}", f"--data={folder}",
               "--frames_weight=0.5"]
    cfg, parts = build_configs(options)
    with pytest.raises(stages.MissingCheckpoint, match="--stage slots"):
        stages.require_earlier_checkpoints(cfg)  # the face is found by the slots stage
    stages.write_random_parts(tmp_path, SMALL[:4])
    dataset = datasets.make_dataset(cfg, master=True)
    clips = len(dataset.frames)  # the 3 clips, each drawn many times
    assert len(dataset) == 8 * clips and clips == 3 * datasets.CLIP_DRAWS
    item = dataset.__getitems__([2 * clips + 4])[0]  # pair 2, the folder's item 4
    assert torch.equal(item["source"], dataset.pairs.__getitems__([2])[0]["source"])
    assert torch.equal(item["frame_query"], dataset.frames[4]["query"])

    stage = stages.build(cfg, parts, torch.device("cpu"), n_identities=2)
    batch = default_collate(dataset.__getitems__([4, 5 * clips + 2]))
    plain = {key: value for key, value in batch.items() if not key.startswith("frame_")}
    both, alone = stage(batch, 0), stage(plain, 0)
    assert "frames_photometric_loss" not in alone
    term = both["frames_photometric_loss"]
    assert both["loss"].item() == pytest.approx(alone["loss"].item() + 0.5 * term.item(),
                                                rel=1e-5)
    frames = torch.cat([batch["frame_source"], batch["frame_query"]])
    face = masks_at(stage.fixed["slots"](frames)["masks"], (32, 32))[:, FACE:FACE + 1]
    render, mask = stage.render(stage.estimator(frames))
    assert term.item() == pytest.approx(photometric_loss(render, mask, frames, face).item(),
                                        rel=1e-5)
    stage.frames_term(batch).backward()  # the frames alone teach the estimator...
    head = stage.estimator.head.weight.grad.abs().sum(1)  # (P,) one row per coefficient
    rows = stage.estimator.decode(torch.arange(len(head))[None])  # each coefficient's row
    held = torch.zeros(len(head), dtype=torch.bool)
    held[torch.cat([rows["expression"][0], rows["pose"][0, 3:]])] = True  # pose: [global, jaw]
    assert head[held].abs().max() == 0  # ...but not the jaw and the expression, as the fit
    assert (head[~held] > 0).float().mean() > 0.9


def test_the_vqvae_stage_weighs_the_true_face(batch, tmp_path):
    cfg, parts = build_configs(["--stage", "vqvae", *SMALL, f"--out={tmp_path}",
                                      "--vqvae.face_weight=3"])
    stage = stages.build(cfg, parts, torch.device("cpu"), 2)
    images = torch.cat([batch["source"], batch["query"]])
    face = torch.cat([batch["source_regions"], batch["query_regions"]])[:, None] == FACE
    with torch.no_grad():
        recon = stage.vqvae(images)[0]
        weighted = stage(batch, 0)["reconstruction_loss"]
    error = (recon - images).abs().sum(1, keepdim=True)
    expected = (error * (1 + 3 * face)).sum() / (3 * (1 + 3 * face).sum())
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)


def test_face_only_identity_stage_sees_the_face_alone(batch, tmp_path):
    cfg, parts = build_configs(["--stage", "identity", *SMALL, f"--out={tmp_path}",
                                      "--face_only=true"])
    stage = stages.build(cfg, parts, torch.device("cpu"), n_identities=2)
    torch.manual_seed(0)
    loss = stage(batch, 0)["loss"]
    changed = dict(batch)
    for image in ("source", "query"):
        outside = (batch[f"{image}_regions"] != FACE)[:, None]
        changed[image] = torch.where(outside, torch.rand_like(batch[image]), batch[image])
    torch.manual_seed(0)
    assert torch.equal(stage(changed, 0)["loss"], loss)
    changed["source"] = -batch["source"]  # the face itself changed
    torch.manual_seed(0)
    assert not torch.equal(stage(changed, 0)["loss"], loss)


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    """The path users take: run to N, rerun to 2N. Codes die and restart on both sides of N (a
    short usage memory, restarts every step), and the runs evaluate at different steps (the
    first run ends with an evaluation at N, the uninterrupted one evaluates every step): the
    rerun matches an uninterrupted 2N run, so evaluating changes nothing training uses."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["--stage", "vqvae", "--ckpt_every=1", "--vqvae.restart_every=1",
              "--vqvae.usage_decay=0.1"]
    assert run([*common, "--steps=4", "--eval_every=1"], whole).returncode == 0
    assert run([*common, "--steps=2", "--eval_every=3"], split).returncode == 0
    resumed = run([*common, "--steps=4", "--eval_every=3"], split)
    assert resumed.returncode == 0, resumed.stderr
    assert "vqvae: resuming from" in resumed.stdout and "at step 2" in resumed.stdout
    a = torch.load(whole / "vqvae" / "ckpt.pt", weights_only=True)
    b = torch.load(split / "vqvae" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in a["model"]:  # weights, codebook and its usage
        assert torch.equal(a["model"][key], b["model"][key]), key
    logs = [[json.loads(line) for line in open(out / "vqvae" / "log.jsonl")]
            for out in (whole, split)]
    losses = [[(line["step"], line["loss"]) for line in log if "loss" in line] for log in logs]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert [line["step"] for line in logs[1] if "eval" in line] == [2, 3, 4]


def test_missing_prerequisite_is_a_clear_error(tmp_path):
    done = run(["--stage", "slots", "--steps=1"], tmp_path)
    assert done.returncode == 2
    assert (f"vqvae/ckpt.pt is missing: run `python train.py --stage vqvae --out={tmp_path}` "
            f"first") in done.stderr
    assert not (tmp_path / "data").exists()  # refused before the pool is rendered
    bad = run(["--stage", "vqvae", "--no_such_key=1"], tmp_path)
    assert bad.returncode == 2 and "unknown key" in bad.stderr


def test_a_stage_on_an_unfinished_earlier_stage_says_so(tmp_path, capsys):
    """A VQ-VAE stopped at step 5 of its 100 (Ctrl-C, say): the slots stage built on it says so
    in one line with the command that finishes it; one stopped by its time limit, by design,
    is taken without a word."""
    stages.write_random_parts(tmp_path, SMALL[:4])
    path = tmp_path / "vqvae" / "ckpt.pt"
    checkpoint = torch.load(path, weights_only=True)
    cfg, parts = build_configs(["--stage", "slots", *SMALL, f"--out={tmp_path}"])
    for run_config, said in (({"steps": 100, "time_limit": 0.0}, True),
                             ({"steps": 100, "time_limit": 60.0}, False),
                             ({"steps": 5, "time_limit": 0.0}, False)):
        checkpoint["step"], checkpoint["config"]["train"] = 5, run_config
        guard.atomic_save(checkpoint, path)
        stages.build(cfg, dict(parts), torch.device("cpu"), cfg.identities)
        err = capsys.readouterr().err
        expected = (f"warning: {path} is at step 5 of 100: this stage starts from an unfinished "
                    f"vqvae stage (finish it with `python train.py --stage vqvae --out={tmp_path}`)"
                    f"\n")
        assert err == (expected if said else ""), err


def test_batch_size_is_the_total_over_the_processes(tmp_path):
    """Each of N processes takes batch_size / N; a size N does not divide is refused before
    the processes meet (this one would otherwise wait for a second process forever)."""
    env = dict(os.environ, RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29519")
    done = run(["--stage", "vqvae", "--steps=1"], tmp_path, env=env, timeout=60)  # batch 2
    assert done.returncode == 2
    assert "--batch_size=2: not divisible by the 3 processes" in done.stderr


def test_two_process_ddp_run_of_the_slots_stage(tmp_path):
    assert run(["--stage", "vqvae", "--steps=1"], tmp_path).returncode == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29517", os.path.join(ROOT, "train.py"), "--stage",
                           "slots", "--steps=2", *SMALL, f"--out={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "slots" / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 2 and len(checkpoint["rng"]) == 2
    assert sorted(p.name for p in (tmp_path / "slots").iterdir() if p.suffix == ".pt") == [
        "ckpt.pt"]


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--stage", "vqvae", "--steps=400",
               "--ckpt_every=1", *SMALL, f"--out={tmp_path}"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "vqvae" / "ckpt.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    process.kill()  # SIGKILL: no cleanup, possibly in the middle of writing a checkpoint
    process.wait()
    saved = torch.load(checkpoint, weights_only=True)["step"]  # never a half-written file
    assert 1 <= saved < 400
    resumed = run(["--stage", "vqvae", f"--steps={saved + 2}", "--ckpt_every=1"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {saved}" in resumed.stdout
    assert torch.load(checkpoint, weights_only=True)["step"] == saved + 2
    log = [json.loads(line) for line in open(tmp_path / "vqvae" / "log.jsonl")]
    assert [line["step"] for line in log if "loss" in line] == list(range(1, saved + 3))


def test_ema_follows_its_formula_and_swaps_weights_in_and_out():
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    ema = train.EMA(layer, decay=0.5)
    expected = torch.ones(1, 2)
    for n, value in enumerate((3.0, 5.0, 9.0), 1):
        with torch.no_grad():
            layer.weight.fill_(value)
        ema.update(layer)
        d = min(0.5, (1 + n) / (10 + n))  # the warm-up holds d below `decay` at first
        expected = d * expected + (1 - d) * value
    assert torch.allclose(ema.shadow["weight"], expected)
    with ema.applied(layer):
        assert torch.allclose(layer.weight, expected)
    assert torch.equal(layer.weight, torch.full((1, 2), 9.0))


class _KnownNoise:
    """A stand-in denoiser that predicts ε exactly (given it), or 0."""

    def __init__(self, exact):
        self.alphas_cumprod = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
        self.exact, self.noise = exact, None

    def denoise(self, z_t, t, cond):
        alpha_bar = self.alphas_cumprod[t[0]]
        eps = (z_t - alpha_bar.sqrt() * cond["z0"]) / (1 - alpha_bar).sqrt()
        return (eps if self.exact else torch.zeros_like(z_t)), None


def test_x0_report_against_its_closed_forms():
    z0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    face = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    face[:, :, 1:3] = True
    cond = {"z0": z0, "f_r": z0 + 0.5}
    exact = stages.x0_report(_KnownNoise(True), cond, z0, face, timesteps=(999, 50))
    assert exact["f_r_face_rms"] == pytest.approx(0.5)
    assert max(exact[f"x0_{kind}_t{t}"] for kind in ("face_rms", "spread")
               for t in (999, 50)) < 1e-9  # the true ε gives x̂_0 = z_0 for every draw
    # ε̂ = 0: x̂_0 − z_0 = √((1 − ᾱ)/ᾱ)·ε, whose rms over 48 face values is about √(1/SNR)
    blind = stages.x0_report(_KnownNoise(False), cond, z0, face, timesteps=(999,))
    alpha_bar = 0.01
    assert blind["x0_face_rms_t999"] == pytest.approx(((1 - alpha_bar) / alpha_bar) ** 0.5,
                                                      rel=0.3)
    assert blind["x0_spread_t999"] == pytest.approx((2 * (1 - alpha_bar) / alpha_bar) ** 0.5,
                                                    rel=0.3)


class _Follows:
    """A stand-in denoiser whose x̂_0 is z_t + a·f_r: it follows f_r by the factor a."""

    def __init__(self, a):
        self.alphas_cumprod = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
        self.a = a

    def denoise(self, z_t, t, cond):
        alpha_bar = self.alphas_cumprod[t[0]]
        x0 = z_t + self.a * cond["f_r"]
        return (z_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt(), None


@pytest.mark.parametrize("a", [0.0, 0.37, 1.0])
def test_x0_report_measures_how_far_x0_follows_the_render(a):
    z0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    face = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    face[:, :, 1:3] = True
    f_r = z0 + 0.5
    exact_f_r = z0 + 0.2 * torch.randn_like(z0)
    exact_f_r[~face.expand_as(z0)] += 100  # off the face: not counted
    cond = {"f_r": f_r}
    report = stages.x0_report(_Follows(a), cond, z0, face, exact_f_r, timesteps=(999, 50))
    weight = face.expand_as(z0)
    assert report["exact_f_r_face_rms"] == pytest.approx(
        float((exact_f_r - z0)[weight].pow(2).mean().sqrt()))
    for t in (999, 50):
        assert report[f"x0_follows_f_r_t{t}"] == pytest.approx(a, abs=1e-6)  # float32 sums

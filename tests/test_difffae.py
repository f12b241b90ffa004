"""DiffFAE as a whole: the loss and its ablation switches, what trains and what stays frozen,
editing and swapping, the ldm stage with its EMA through train.py (resume included), the
inference export, and the sample.py program with its error messages
(evaluate.py's tests, in test_evaluate.py, use these fixtures).

Pretrained parts are random networks saved in the stages' checkpoint format, at 32 px: these
tests check the plumbing and the numbers that do not depend on training."""
import contextlib
import json
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import default_collate

from training import frozen_cache
from training import datasets, stages
from training.config import build_configs
from runtime.images import save_image
from runtime.checkpoint import (PARTS, TRAINING_ONLY, CheckpointError, configs_of, export_inference,
                        load_model, read_checkpoint)
from difffae import DiffFAE, DiffusionConfig
from layers import FACE, REGION_NAMES
from samplers import predict_x0
from slots import masks_at, pretraining_loss
from assets.synthetic import SyntheticPortraits, true_coefficients

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
SMALL = [f"--image_size={SIZE}", "--batch_size=2", "--pool=8", "--identities=4",
         "--eval_items=4", "--log_every=1", "--warmup=1", "--diffusion.sample_steps=2",
         # the paper's I_R, ε-prediction, plain loss and first noise; the preset's choices
         # (render_from "refined", v, the face weight, τ = 0) have tests of their own
         "--diffusion.render_from=estimated", "--diffusion.prediction=eps",
         "--diffusion.face_weight=0", "--diffusion.temperature=1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    stages.write_random_parts(out, SMALL[:4])
    return out


@pytest.fixture(scope="module")
def batch():
    items = SyntheticPortraits(SIZE, "test", length=2).__getitems__([0, 1])
    return default_collate(items)


@pytest.fixture(scope="module")
def ldm_stage(pretrained, batch):
    torch.manual_seed(0)
    cfg, parts = build_configs(["--stage", "ldm", *SMALL, f"--out={pretrained}"])
    stage = stages.build(cfg, parts, torch.device("cpu"), n_identities=4)
    stage.model.set_latent_scale(batch["query"])  # as the stage's first step does
    return stage


def run(program, *args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, program), *args],
                          capture_output=True, text=True, cwd=cwd)


def test_latent_scale_is_measured_once_and_makes_unit_variance(ldm_stage, batch):
    model = ldm_stage.model
    model.latent_scale.zero_()
    ldm_stage(batch, 0)
    scale = float(model.latent_scale)
    assert scale > 0
    with torch.no_grad():
        z = model.encode_latent(batch["query"])
    assert z.std().item() == pytest.approx(1.0, rel=1e-5)
    ldm_stage(batch, 1)
    assert float(model.latent_scale) == scale  # not re-measured on later batches


def handed(model, batch, coefficients, **options):
    """model.loss with I_R of `coefficients` handed in: every pair takes the "exact" render."""
    d = model.diffusion
    kept, d.truth_fraction = d.truth_fraction, 1.0
    try:
        return model.loss(batch["source"], batch["query"], coefficients, batch["source_regions"],
                          exact=torch.ones(len(batch["source"]), dtype=torch.bool), **options)
    finally:
        d.truth_fraction = kept


@contextlib.contextmanager
def diffusion_settings(model, **fields):
    """model.diffusion with `fields` set for the block, then as it was."""
    d = model.diffusion
    kept = {name: getattr(d, name) for name in fields}
    for name, value in fields.items():
        setattr(d, name, value)
    try:
        yield d
    finally:
        for name, value in kept.items():
            setattr(d, name, value)


@contextlib.contextmanager
def zeroed_output(model):
    """The UNet's last conv zeroed for the block (as LDM initialises it), then restored."""
    conv_out = model.unet.conv_out
    saved = [p.detach().clone() for p in conv_out.parameters()]
    with torch.no_grad():
        for p in conv_out.parameters():
            p.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(conv_out.parameters(), saved):
                p.copy_(value)


def test_loss_terms_and_which_parts_train(ldm_stage, batch):
    """At fixed t and ε, L is linear in δ and in the slots weight w: L(δ, w) − L(0, 0) =
    δ·L_attn + w·(the slots stage's own loss on the sources, slots.pretraining_loss); and at a
    t whose SNR lies inside [floor, γ] the Min-SNR weight is 1, so L(0, 0) is the plain
    ‖ε − ε̂‖² of the UNet's prediction. Only the UNet and the region encoder (not ζ) learn."""
    model, d = ldm_stage.model, ldm_stage.model.diffusion
    assert (d.acr_weight, d.slots_weight, d.slots_supervision) == (0.1, 1.0, 1.0)  # tiny preset
    snr = model.alphas_cumprod / (1 - model.alphas_cumprod)
    t = torch.nonzero((snr > d.snr_floor) & (snr < d.min_snr_gamma))[[0, -1], 0]  # (2,)
    noise = torch.randn((2, *model.encode_latent(batch["query"]).shape[1:]),
                        generator=torch.Generator().manual_seed(4))
    coefficients = true_coefficients(batch, "query")

    def loss(acr, slots):
        with diffusion_settings(model, acr_weight=acr, slots_weight=slots):
            return handed(model, batch, coefficients, t=t, noise=noise)

    base = loss(0.0, 0.0)["loss"]
    with torch.no_grad():
        z0 = model.encode_latent(batch["query"])
        alpha_bar = model.alphas_cumprod[t].view(-1, 1, 1, 1)
        cond = model.conditions(batch["source"], model.render(coefficients)[0])
        eps, _ = model.denoise(alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise, t, cond)
    assert base.item() == pytest.approx((eps - noise).pow(2).mean().item(), rel=1e-5)
    with torch.no_grad():
        acr = loss(1.0, 0.0)["loss"] - base
        held = pretraining_loss(model.slots, batch["source"],
                                model.vqvae.encode(batch["source"]), batch["source_regions"],
                                1.0)["loss"]
    assert loss(0.5, 0.0)["loss"].item() == pytest.approx((base + 0.5 * acr).item(), rel=1e-5)
    assert acr.item() > 0
    assert loss(0.0, 2.0)["loss"].item() == pytest.approx((base + 2 * held).item(), rel=1e-5)
    ldm_stage.zero_grad()
    torch.manual_seed(1)
    ldm_stage(batch, 0)["loss"].backward()
    trained = {name.split(".")[1] for name, p in ldm_stage.named_parameters()
               if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {"slots", "unet"}
    assert all(p.grad is None for p in model.slots.decoder.parameters())
    for frozen in (model.vqvae, model.estimator, model.identity):
        assert not any(p.requires_grad for p in frozen.parameters())


def test_paper_variant_is_eq8_alone_with_i_r_from_the_estimator(pretrained, batch):
    """Without the tiny preset's two extra terms L = L_LDM + δ·L_attn, and render_from
    "estimated" (the paper's, and the default) draws I_R from the estimator's reading of the
    query, as an edit does."""
    cfg, parts = build_configs(["--stage", "ldm", *SMALL, f"--out={pretrained}",
                                      "--diffusion.slots_weight=0",
                                      "--diffusion.truth_fraction=0"])
    stage = stages.build(cfg, parts, torch.device("cpu"), n_identities=4)
    assert DiffusionConfig().render_from == "estimated"
    torch.manual_seed(1)
    out = stage(batch, 0)
    assert set(out) == {"loss", "ldm_loss", "acr_loss"}
    model = stage.model
    with torch.no_grad():
        read = model.estimator(batch["query"])
    torch.manual_seed(1)
    assert torch.equal(out["loss"], handed(model, batch, read)["loss"])


def test_acr_term_is_the_squared_distance_of_attention_to_query_masks(ldm_stage, batch):
    """With the UNet's attention forced uniform (1/K everywhere), L_attn = mean (1/K − M_Q)²."""
    model = ldm_stage.model
    unet_forward = model.unet.forward

    def uniform(x, t, context, id_embed, return_attn=False):
        eps = unet_forward(x, t, context, id_embed)
        k = context.shape[1]
        return eps, [torch.full((x.shape[0], 1, 4, 4, k), 1.0 / k)]

    model.unet.forward = uniform
    try:
        out = model.loss(batch["source"], batch["query"], true_coefficients(batch, "query"),
                         batch["source_regions"])
    finally:
        del model.unet.forward
    with torch.no_grad():
        masks = model.slots(batch["query"])["masks"]
    expected = (masks - 1.0 / masks.shape[1]).pow(2).mean()
    assert out["acr_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("gamma, floor", [(0.0, 0.0), (5.0, 0.0), (5.0, 1.0)])
def test_min_snr_weights_each_image_by_its_timestep(ldm_stage, batch, gamma, floor):
    """With ε̂ = 0 (the UNet's last conv zeroed, as LDM initialises it) the loss of image b is
    mean(ε_b²); Min-SNR-γ weighs it by min(SNR_t, γ)/SNR_t, SNR_t = ᾱ_t/(1−ᾱ_t) (γ = 0: no
    weights, the paper's loss), and with a floor by clamp(SNR_t, floor, γ)/SNR_t."""
    model = ldm_stage.model
    t = torch.tensor([10, 900])  # a low-noise step (weighted when γ > 0) and a noisy one
    noise = torch.randn(model.encode_latent(batch["query"]).shape,
                        generator=torch.Generator().manual_seed(3))
    with zeroed_output(model), diffusion_settings(model, min_snr_gamma=gamma, snr_floor=floor):
        out = model.loss(batch["source"], batch["query"], true_coefficients(batch, "query"),
                         batch["source_regions"], t=t, noise=noise)
    alpha_bar = model.alphas_cumprod[t].double()
    snr = alpha_bar / (1 - alpha_bar)
    weight = snr.clamp(max=gamma) / snr if gamma else torch.ones_like(snr)
    if floor:
        weight = torch.where(snr < floor, floor / snr, weight)  # the noisy step: above 1
        assert weight.max() > 1
    expected = (noise.double().pow(2).flatten(1).mean(1) * weight).mean()
    assert out["ldm_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert gamma == 0 or weight.min() < 1  # the draw includes a weighted (low-noise) step


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_the_loss_of_v_or_x0_prediction_by_hand(ldm_stage, batch, prediction):
    """With γ = 0 the loss is the plain ‖out − target‖² of the UNet's raw output, its target
    computed here from its definition: v = √ᾱ·ε − √(1−ᾱ)·z_0 (Salimans & Ho 2022) or z_0; and
    the sampler's x̂_0 is the UNet's x̂_0 itself: 0 when its last conv is zeroed."""
    model = ldm_stage.model
    t = torch.tensor([10, 900])
    noise = torch.randn(model.encode_latent(batch["query"]).shape,
                        generator=torch.Generator().manual_seed(5))
    coefficients = true_coefficients(batch, "query")
    settings = dict(prediction=prediction, min_snr_gamma=0.0, snr_floor=0.0, acr_weight=0.0,
                    slots_weight=0.0)
    with diffusion_settings(model, **settings), torch.no_grad():
        loss = handed(model, batch, coefficients, t=t, noise=noise)["loss"]
        z0 = model.encode_latent(batch["query"])
        cond = model.conditions(batch["source"], model.render(coefficients)[0])
        a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        out = model.unet(torch.cat([z_t, cond["f_r"]], 1), t, cond["slots"], cond["id"])
        target = {"v": a.sqrt() * noise - (1 - a).sqrt() * z0, "x0": z0}[prediction]
        assert loss.item() == pytest.approx((out - target).pow(2).mean().item(), rel=1e-4)
        with zeroed_output(model):
            x0 = predict_x0(z_t, model.denoise(z_t, t, cond)[0], a)
        expected = a.sqrt() * z_t if prediction == "v" else torch.zeros_like(z0)
        torch.testing.assert_close(x0, expected, rtol=0, atol=1e-4)


def test_face_weight_makes_the_loss_a_weighted_mean(ldm_stage, batch):
    """With face_weight a, a pair's L_LDM is Σ ω·e / Σ ω over the latent's cells, e the squared
    error of ε̂ averaged over the channels and ω = 1 + a·M_Q[face], the query's face slot mask
    at the latent's size; checked at steps whose Min-SNR weight is 1, with a = 0 the plain
    mean."""
    model, d = ldm_stage.model, ldm_stage.model.diffusion
    snr = model.alphas_cumprod / (1 - model.alphas_cumprod)
    t = torch.nonzero((snr > d.snr_floor) & (snr < d.min_snr_gamma))[[0, -1], 0]  # (2,)
    noise = torch.randn((2, *model.encode_latent(batch["query"]).shape[1:]),
                        generator=torch.Generator().manual_seed(6))
    coefficients = true_coefficients(batch, "query")
    with torch.no_grad():
        z0 = model.encode_latent(batch["query"])
        alpha_bar = model.alphas_cumprod[t].view(-1, 1, 1, 1)
        cond = model.conditions(batch["source"], model.render(coefficients)[0])
        eps, _ = model.denoise(alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise, t, cond)
        error = (eps - noise).pow(2).mean(1)  # (B, h, w)
        face = masks_at(model.slots(batch["query"])["masks"], z0.shape[-2:])[:, FACE]
        for a in (0.0, 3.0):
            with diffusion_settings(model, face_weight=a, acr_weight=0.0, slots_weight=0.0):
                loss = handed(model, batch, coefficients, t=t, noise=noise)["ldm_loss"]
            omega = 1 + a * face
            expected = ((error * omega).sum((1, 2)) / omega.sum((1, 2))).mean()
            assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert (face.amax((1, 2)) - face.amin((1, 2))).min() > 0.01  # ω is not a constant


def test_loss_draws_t_then_noise_when_not_given(ldm_stage, batch):
    """Training draws t ~ U{0..T−1}, then ε ~ N(0, I), then the pairs whose I_R is exact, from
    the global generator: the loss of those draws handed in is the same to the bit."""
    model = ldm_stage.model
    inputs = batch["source"], batch["query"], true_coefficients(batch, "query")
    torch.manual_seed(4)
    drawn = model.loss(*inputs, batch["source_regions"])
    torch.manual_seed(4)
    t = torch.randint(model.diffusion.timesteps, (len(batch["query"]),))
    noise = torch.randn(model.encode_latent(batch["query"]).shape)
    exact = torch.rand(len(t)) < model.diffusion.truth_fraction
    given = model.loss(*inputs, batch["source_regions"], t=t, noise=noise, exact=exact)
    assert torch.equal(drawn["loss"], given["loss"])


def test_edit_swaps_slot_tokens_and_keeps_unedited_attributes(ldm_stage, batch):
    model = ldm_stage.model.eval()
    source, query = batch["source"][:1], batch["query"][:1]
    seen = []
    denoise = model.denoise

    def spy(z_t, t, cond):
        seen.append(cond["slots"].clone())
        return denoise(z_t, t, cond)

    model.denoise = spy
    try:
        out = model.edit(source, query, edit=("lighting",), swap={"hair": query}, steps=2)
    finally:
        del model.denoise
    assert out["image"].shape == (1, 3, SIZE, SIZE) and out["image"].abs().max() <= 1
    with torch.no_grad():
        own, other = model.slots(source)["slots"], model.slots(query)["slots"]
        mine, theirs = model.estimator(source), model.estimator(query)
    hair = REGION_NAMES.index("hair")
    for k in range(len(REGION_NAMES)):
        expected = other[:, k] if k == hair else own[:, k]
        assert torch.allclose(seen[0][:, k], expected, atol=1e-6)
    c = out["coefficients"]
    assert torch.equal(c["light"], theirs["light"])
    assert torch.equal(c["pose"], mine["pose"]) and torch.equal(c["expression"],
                                                               mine["expression"])
    with pytest.raises(AssertionError, match="cannot swap 'face'"):  # sample.py says why
        model.edit(source, query, swap={"face": query}, steps=1)


def test_same_seed_same_edit_and_sampler_choice(ldm_stage, batch):
    model = ldm_stage.model.eval()
    source, query = batch["source"][:1], batch["query"][:1]
    a = model.edit(source, query, steps=3, seed=5)["image"]
    b = model.edit(source, query, steps=3, seed=5)["image"]
    c = model.edit(source, query, steps=3, seed=6)["image"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(AssertionError):  # sample.py (below) and evaluate.py refuse it
        model.edit(source, query, steps=3, sampler="euler")


def test_an_edit_handed_its_readings_is_the_same_edit(ldm_stage, batch):
    """DiffFAE.read once, then edits handed its result (as evaluate.py edits a pair several
    ways): the same images as edits that read for themselves, with and without the query.
    Without one, the edit fits the source alone, yet each image's fit is its own (up to the
    rounding of batched kernels: a few 1e-5 on a few edge pixels)."""
    model, source, query = ldm_stage.model.eval(), batch["source"], batch["query"]
    readings = model.read(source, query, refine_steps=2)
    for other, given in ((query, readings), (None, [readings[0], None])):
        read_itself = model.edit(source, other, steps=2, refine_steps=2)
        handed = model.edit(source, other, steps=2, refine_steps=2, readings=given)
        for key in ("image", "render"):
            torch.testing.assert_close(handed[key], read_itself[key], atol=1e-3, rtol=0)
    refined = model.edit(source, query, steps=2, readings=readings)["render"]
    unread = model.edit(source, query, steps=2, refine_steps=0)["render"]
    assert not torch.allclose(unread, refined, atol=1e-3)  # the fit moved I_R


def test_temperature_scales_the_distance_from_the_mean_sample(ldm_stage, monkeypatch):
    # Data Gaussian given the conditions, x_0 ~ N(μ, s²): the optimal ε is affine in z_t and
    # the probability-flow ODE carries z_T to μ + s·(z_T − √ᾱ_T·μ)/√v_T, v_t = ᾱ_t·s² + 1 − ᾱ_t
    model, (mu, s) = ldm_stage.model, (0.5, 0.3)
    alphas = model.alphas_cumprod.double()

    def gaussian(z, t, cond):  # E[ε | z_t] for that data
        a = alphas[t]
        return (1 - a).sqrt() * (z.double() - a.sqrt() * mu) / (a * s * s + 1 - a), {}
    monkeypatch.setattr(model, "denoise", gaussian)
    cond = {"f_r": torch.zeros(2, 4, 8, 8, dtype=torch.float64)}
    out = {}
    for tau in (1.0, 0.4, 0.0):
        with diffusion_settings(model, temperature=tau):
            out[tau] = model.sample(cond, steps=200, seed=3)
    # affine samplers of an affine ε: the temperature scales the distance from τ = 0's output
    torch.testing.assert_close(out[0.4] - out[0.0], 0.4 * (out[1.0] - out[0.0]), rtol=0,
                               atol=1e-9)
    z_T, a_T = torch.randn(cond["f_r"].shape, generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64), alphas[model.diffusion.timesteps - 1]

    def flow(z):
        return mu + s * (z - a_T.sqrt() * mu) / (a_T * s * s + 1 - a_T).sqrt()
    # as near as the samplers' last step allows (tests/test_samplers.py: under 0.025 at 200)
    for tau in (1.0, 0.0):
        torch.testing.assert_close(out[tau], flow(tau * z_T), rtol=0, atol=0.025)


def test_ldm_stage_trains_resumes_with_its_ema_and_exports(pretrained, tmp_path):
    """A run split 2 + 2 steps ends with the weights and EMA of an uninterrupted 4-step run."""
    for folder in ("whole", "split"):
        for stage in PARTS["ldm"].requires:
            (tmp_path / folder / stage).mkdir(parents=True)
            os.link(pretrained / stage / "ckpt.pt", tmp_path / folder / stage / "ckpt.pt")
    common = ["--stage", "ldm", *SMALL, "--ckpt_every=1", "--ema_decay=0.9"]
    done = run("train.py", *common, "--steps=4", f"--out={tmp_path / 'whole'}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert run("train.py", *common, "--steps=2", f"--out={tmp_path / 'split'}").returncode == 0
    resumed = run("train.py", *common, "--steps=4", f"--out={tmp_path / 'split'}")
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "whole" / "ldm" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ldm" / "ckpt.pt", weights_only=True)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 4
    for key, value in a["ema"]["shadow"].items():
        assert torch.equal(value, b["ema"]["shadow"][key]), key
        assert not torch.equal(value, a["model"][key]), key  # an average, not the weights
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    log = [json.loads(line) for line in open(tmp_path / "whole" / "ldm" / "log.jsonl")]
    assert "psnr_face" in log[-1]["eval"]

    exported = tmp_path / "model.pt"
    done = run("train.py", *common, f"--out={tmp_path / 'whole'}", f"--export={exported}")
    assert done.returncode == 0, done.stderr
    bundle = torch.load(exported, weights_only=True)
    assert all(v.dtype == torch.float16 for v in bundle["weights"].values()
               if v.is_floating_point())
    model = load_model(exported)
    ema = a["ema"]["shadow"]["model.unet.conv_in.weight"]
    assert torch.allclose(model.unet.conv_in.weight, ema.half().float())
    reference = load_model(tmp_path / "whole" / "ldm" / "ckpt.pt")  # EMA in float32
    assert torch.equal(reference.unet.conv_in.weight, ema)
    assert float(model.latent_scale) == pytest.approx(float(reference.latent_scale), rel=1e-3)


def test_two_process_ddp_run_of_the_ldm_stage(pretrained, tmp_path):
    """Frozen parts and the unused slot decoder must not trip DDP's unused-parameter check."""
    for stage in PARTS["ldm"].requires:
        (tmp_path / stage).mkdir()
        os.link(pretrained / stage / "ckpt.pt", tmp_path / stage / "ckpt.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29519", os.path.join(ROOT, "train.py"), "--stage",
                           "ldm", "--steps=2", "--ema_decay=0.9", *SMALL, f"--out={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "ldm" / "ckpt.pt", weights_only=True)
    assert checkpoint["step"] == 2 and len(checkpoint["rng"]) == 2
    assert checkpoint["ema"]["updates"] == 2


@pytest.fixture(scope="module")
def exported(ldm_stage, batch, tmp_path_factory):
    """An inference file of the fixture's model, as train.py --export writes it (in one)."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    config = {name: vars(c) for name, c in ldm_stage.model.configs.items()}
    export_inference({"step": 0, "config": config, "model": ldm_stage.state_dict()}, path)
    return path


def test_load_model_errors_name_the_file(exported, pretrained, tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint"):
        load_model(tmp_path / "nothing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable checkpoint"):
        load_model(junk)
    with pytest.raises(ValueError, match="a vqvae checkpoint"):
        load_model(pretrained / "vqvae" / "ckpt.pt")
    bundle = torch.load(exported, weights_only=True)
    bundle["config"]["unet"]["base_channels"] = 64
    torch.save(bundle, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: incompatible"):
        load_model(tmp_path / "other.pt")
    assert isinstance(load_model(exported), DiffFAE)
    assert configs_of(bundle)["unet"].base_channels == 64
    bundle = torch.load(exported, weights_only=True)  # the slot decoder is not exported ...
    assert not any(name.startswith(TRAINING_ONLY) for name in bundle["weights"])
    bundle["weights"].pop(next(name for name in bundle["weights"] if name.startswith("unet.")))
    torch.save(bundle, tmp_path / "short.pt")  # ... but every other weight must be there
    with pytest.raises(ValueError, match="short.pt: incompatible.*missing weights"):
        load_model(tmp_path / "short.pt")


def test_a_truncated_or_retired_checkpoint_is_one_line(exported, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(exported.read_bytes()[:5000])
    with pytest.raises(CheckpointError) as error:
        load_model(cut)
    assert str(error.value) == (f"{cut}: not a readable checkpoint (truncated or not a PyTorch "
                                f"file)")
    with pytest.raises(CheckpointError, match="a directory"):
        read_checkpoint(tmp_path)
    bundle = torch.load(exported, weights_only=True)
    bundle["config"]["vqvae"]["use_mid_attention"] = True  # a retired field, at its one value
    assert configs_of(bundle)["vqvae"] == configs_of(torch.load(exported, weights_only=True))[
        "vqvae"]
    bundle["config"]["vqvae"]["use_mid_attention"] = False
    torch.save(bundle, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="old.pt: incompatible.*use_mid_attention=False"):
        load_model(tmp_path / "old.pt")


def test_the_shipped_model_is_what_the_default_preset_builds():
    """One source of defaults: every config stored with the bundle equals what `python train.py
    --preset tiny` builds for its stage, but for the fields a stage fills in from the data
    (image sizes, FLAME's coefficient counts, the VQ latent's and the slots' shapes) and where
    the run went (--out, --tag, --export)."""
    from sample import DEFAULT_CHECKPOINT
    stored = torch.load(DEFAULT_CHECKPOINT, weights_only=True)["config"]
    filled = {"slots": {"image_size", "target_channels", "target_size"},
              "estimator": {"image_size", "n_shape", "n_exp", "n_albedo"},
              "identity": {"image_size"},
              "unet": {"in_channels", "out_channels", "context_dim", "id_dim"},
              "train": {"out", "tag", "export"}}
    built = {}
    for stage in PARTS:
        cfg, parts = build_configs(["--stage", stage])
        built.update({name: dataclasses.asdict(c) for name, c in parts.items()})
        if stage == "ldm":
            built["train"] = dataclasses.asdict(cfg)
    assert set(stored) == set(built)
    for name, fields in stored.items():
        for field, value in fields.items():
            if field not in filled.get(name, ()):
                want = built[name][field]
                assert value == want or list(value) == list(want), (name, field, value, want)
        assert set(fields) <= set(built[name]), name  # nothing stored that the code lacks


def test_sample_program_writes_an_edit_and_fails_cleanly(exported, batch, tmp_path, capsys,
                                                          monkeypatch):
    save_image(batch["source"][0], tmp_path / "src.png")
    save_image(batch["query"][0], tmp_path / "qry.png")
    out = tmp_path / "out.png"
    done = run("sample.py", "src.png", "qry.png", f"--ckpt={exported}", "--steps=2", "--panel",
               "--zoom=2", "--swap", "hair=qry.png", "--set", "yaw=10", f"--out={out}",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    from PIL import Image
    assert Image.open(out).size == (4 * SIZE * 2, SIZE * 2)
    failures = {
        ("missing.png", "qry.png"): "missing.png: no such file",
        ("src.png", "qry.png", "--edit=pose,hair"): "--edit pose,hair",
        ("src.png", "qry.png", "--swap", "face=qry.png"): "cannot swap 'face'",
        ("src.png", "qry.png", "--set", "nose=3"): "unknown number 'nose'",
        ("src.png",): "nothing to edit",
        ("src.png", "qry.png", "--ckpt=none.pt"): "none.pt: no such checkpoint",
        ("src.png", "--set", "light=0,0,0"): "--set light=0,0,0",
        ("src.png", "--set", "light=1,0"): "--set light=1,0",
        ("src.png", "qry.png", "--sampler=euler"): "invalid choice: 'euler'",
        ("src.png", "qry.png", "--steps=0"): "--steps 0: expected 1..1000",
        ("src.png", "qry.png", "--eta=1.5"): "--eta 1.5: expected a value in [0, 1]",
        ("src.png", "qry.png", "--eta=1", "--sampler=dpm++2m"): "ddim sampler only",
        ("src.png", "qry.png", "--steps", "0"): "--steps 0: expected 1..1000",
        ("src.png", "qry.png", "--device=cuda:99"): "--device cuda:99: this machine has",
        ("src.png", "qry.png", f"--out={tmp_path}"): f"--out {tmp_path}: a directory",
        ("src.png", "qry.png", f"--ckpt={tmp_path}"): "a directory, not a checkpoint file",
    }
    # the failures in this process (the success above ran the real program): same main(), no
    # torch import per case
    import sample
    monkeypatch.chdir(tmp_path)
    for args, message in failures.items():
        extra = [] if any(a.startswith("--ckpt") for a in args) else [f"--ckpt={exported}"]
        with pytest.raises(SystemExit) as exit_status:
            sample.main([*args, *extra])
        stderr = capsys.readouterr().err
        assert exit_status.value.code == 2, (args, stderr)
        assert message in stderr and "Traceback" not in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1, stderr


def test_the_bundled_model_edits_the_examples(tmp_path):
    """The shipped weights: one file, float16, at most 40 MB, loadable with weights_only, and
    the README's first command works as written."""
    from sample import DEFAULT_CHECKPOINT
    bundle = torch.load(DEFAULT_CHECKPOINT, weights_only=True)
    assert DEFAULT_CHECKPOINT.stat().st_size <= 40 * 10 ** 6 and "parts" not in bundle
    weights = bundle["weights"]
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}
    out = tmp_path / "out.png"
    done = run("sample.py", "examples/src.png", "examples/qry.png", f"--out={out}")
    assert done.returncode == 0, done.stderr
    from PIL import Image
    size = load_model(DEFAULT_CHECKPOINT).image_size
    assert Image.open(out).size == (size, size)


def test_the_region_encoder_runs_once_with_the_same_loss_and_gradients(ldm_stage, batch):
    """The ldm step shares one pass of the region encoder between DiffFAE.loss and the slots
    term; computing each with its own pass gives the same loss and gradients."""
    model = ldm_stage.model
    d = model.diffusion
    assert d.slots_weight > 0
    calls = []
    hook = model.slots.register_forward_hook(lambda *_: calls.append(1))
    parameters = [p for p in ldm_stage.parameters() if p.requires_grad]

    def loss_and_gradients(compute):
        torch.manual_seed(5)
        loss = compute()
        return loss.detach(), torch.autograd.grad(loss, parameters, allow_unused=True)

    try:
        shared = loss_and_gradients(lambda: ldm_stage(batch, step=1)["loss"])
        passes = len(calls)

        def separate():  # the slots term outside the loss, with its own pass
            weight, fraction = d.slots_weight, d.truth_fraction
            d.slots_weight = d.truth_fraction = 0.0  # ldm_stage's step 1 draws no exact pair
            try:
                losses = model.loss(batch["source"], batch["query"])
            finally:
                d.slots_weight, d.truth_fraction = weight, fraction
            held = pretraining_loss(model.slots, batch["source"],
                                    model.vqvae.encode(batch["source"]), batch["source_regions"],
                                    d.slots_supervision)
            return losses["loss"] + weight * held["loss"]

        reference = loss_and_gradients(separate)
    finally:
        hook.remove()
    assert passes == 2 and len(calls) == 5  # shared: source + query masks; separate: three
    assert torch.allclose(shared[0], reference[0], rtol=1e-6)
    for mine, theirs in zip(shared[1], reference[1]):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-7)


def test_the_frozen_parts_cache_gives_the_same_step_and_is_keyed_by_their_weights(
        pretrained, tmp_path, capsys):
    """The ldm stage's FrozenCache: a step from the cached outputs has the loss and gradients of
    one that runs the frozen parts; the file is read again by the same networks, named anew when
    a frozen weight changes, and computed again (with one line) when damaged."""
    for stage in PARTS["ldm"].requires:
        (tmp_path / stage).mkdir()
        os.link(pretrained / stage / "ckpt.pt", tmp_path / stage / "ckpt.pt")
    cfg, parts = build_configs(["--stage", "ldm", *SMALL, f"--out={tmp_path}",
                                      "--diffusion.truth_fraction=0.5"])  # exact renders too
    stage = stages.build(cfg, parts, torch.device("cpu"), n_identities=4)
    pool = datasets.make_dataset(cfg, master=True)
    batch = default_collate(pool.__getitems__([5, 2, 7, 0]))
    stage.model.set_latent_scale(batch["query"])
    parameters = [p for p in stage.parameters() if p.requires_grad]

    def loss_and_gradients():
        torch.manual_seed(3)
        loss = stage(batch, step=1)["loss"]
        return loss.detach(), torch.autograd.grad(loss, parameters, allow_unused=True)

    reference = loss_and_gradients()
    stage.prepare(pool, master=True)
    cache = stage.cache
    assert cache.path.exists() and len(cache.tensors["z0"]) == len(pool) == 8
    cached = loss_and_gradients()
    # float tolerance: the cache ran the frozen parts on 8 pairs at once, the step on 4 (some
    # gradients are rounding noise around 0, so they are compared as one vector)
    assert torch.allclose(cached[0], reference[0], rtol=1e-6)
    assert [g is None for g in cached[1]] == [g is None for g in reference[1]]
    mine, theirs = (torch.cat([g.flatten() for g in grads if g is not None])
                    for grads in (cached[1], reference[1]))
    assert (mine - theirs).norm() <= 1e-5 * theirs.norm()

    def computed_again():
        computed = []
        original = frozen_cache.FrozenCache.compute
        frozen_cache.FrozenCache.compute = lambda self, *a: computed.append(1) or original(self, *a)
        try:
            stage.prepare(pool, master=True)
        finally:
            frozen_cache.FrozenCache.compute = original
        return bool(computed)

    assert not computed_again() and stage.cache.path == cache.path  # the same networks: read
    cache.path.write_bytes(b"damaged")
    assert computed_again() and "unreadable" in capsys.readouterr().err
    with torch.no_grad():
        stage.model.estimator.head.weight[0, 0] += 1e-3  # a frozen part changed: another file
    assert computed_again() and stage.cache.path != cache.path


def test_truth_fraction_draws_i_r_from_the_exact_coefficients(pretrained, batch):
    """--diffusion.truth_fraction=1 is the step of a model trained on exact renders, 0 that of
    one trained on the estimator's, as at inference. Compared by the UNet's gradients: its last
    layer starts at zero, so the loss alone does not yet depend on I_R."""
    grads = {}
    for fraction in (0.0, 1.0):
        cfg, parts = build_configs(["--stage", "ldm", *SMALL, f"--out={pretrained}",
                                          "--diffusion.slots_weight=0",
                                          f"--diffusion.truth_fraction={fraction}"])
        stage = stages.build(cfg, parts, torch.device("cpu"), n_identities=4)
        model = stage.model
        model.set_latent_scale(batch["query"])
        unet = list(model.unet.parameters())

        def gradient(loss):
            return torch.cat([g.flatten() for g in torch.autograd.grad(loss, unet)])

        torch.manual_seed(2)
        grads[fraction] = gradient(stage(batch, step=3)["loss"])
        with torch.no_grad():
            read = model.estimator(batch["query"])
        for name, coefficients in (("estimated", read),
                                   ("truth", true_coefficients(batch, "query"))):
            torch.manual_seed(2)
            grads[fraction, name] = gradient(handed(model, batch, coefficients)["loss"])
    assert torch.allclose(grads[0.0], grads[0.0, "estimated"], rtol=1e-5, atol=1e-8)
    assert torch.allclose(grads[1.0], grads[1.0, "truth"], rtol=1e-5, atol=1e-8)
    moved = grads[1.0, "truth"] - grads[1.0, "estimated"]
    assert moved.norm() > 1e-3 * grads[1.0, "truth"].norm()  # the exact render changes the step


def test_i_r_from_refined_coefficients_uses_the_pretrained_face_masks(pretrained, tmp_path):
    """--diffusion.render_from=refined: the step's I_R is of fit_coefficients(I_Q, N) with the
    face masks of the region encoder as pretrained, a frozen copy that training does not move;
    the cache holds those renders, and a cache of another N is another file."""
    for stage_name in PARTS["ldm"].requires:
        (tmp_path / stage_name).mkdir()
        os.link(pretrained / stage_name / "ckpt.pt", tmp_path / stage_name / "ckpt.pt")
    cfg, parts = build_configs(["--stage", "ldm", *SMALL, f"--out={tmp_path}",
                                      "--diffusion.render_from=refined",
                                      "--diffusion.refine_steps=3",
                                      "--diffusion.slots_weight=0",
                                      "--diffusion.truth_fraction=0"])
    stage = stages.build(cfg, parts, torch.device("cpu"), n_identities=4)
    model, fit_slots = stage.model, stage.fit_slots
    assert fit_slots is not model.slots and not any(p.requires_grad
                                                    for p in fit_slots.parameters())
    with torch.no_grad():
        for p in model.slots.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the trained encoder moves; the fit's does not
    pool = datasets.make_dataset(cfg, master=True)
    batch = default_collate(pool.__getitems__([1, 4]))
    model.set_latent_scale(batch["query"])
    torch.manual_seed(0)
    step = stage(batch, step=0)["loss"]
    fitted = model.fit_coefficients(batch["query"], 3, slots=fit_slots)
    assert not torch.allclose(fitted["pose"], model.estimator(batch["query"])["pose"])
    torch.manual_seed(0)
    assert torch.allclose(step, handed(model, batch, fitted)["loss"], rtol=1e-5)

    stage.prepare(pool, master=True)
    with torch.no_grad():
        exact_f_r = model.vqvae.encode(model.render(fitted)[0])
    assert torch.allclose(stage.cache(torch.tensor([1, 4]))["f_r"], exact_f_r, atol=1e-4)
    model.diffusion.refine_steps = 4
    assert frozen_cache.FrozenCache.fingerprint(model, fit_slots) not in stage.cache.path.name


def test_a_model_trained_on_refined_renders_refines_its_edits_by_default(ldm_stage, batch):
    model = ldm_stage.model
    assert model.default_refine_steps == 0  # trained on the estimator's reading: not refined
    kept = model.diffusion.render_from, model.diffusion.refine_steps
    model.diffusion.render_from, model.diffusion.refine_steps = "refined", 2
    try:
        assert model.default_refine_steps == 2
        images = {name: model.edit(batch["source"], batch["query"], refine_steps=steps)["render"]
                  for name, steps in (("default", None), ("two", 2), ("none", 0))}
    finally:
        model.diffusion.render_from, model.diffusion.refine_steps = kept
    assert torch.equal(images["default"], images["two"])
    assert not torch.equal(images["default"], images["none"])


def test_retired_config_fields_load_as_their_kept_value_or_any_value(ldm_stage):
    """A field that no longer exists loads if it holds the value the code now always has (and
    the VQ-VAE's adversarial settings with any value: they never shaped its network); another
    value is refused by name."""
    config = {name: vars(c) for name, c in ldm_stage.model.configs.items()}
    old = {**config, "vqvae": {**config["vqvae"], "disc_start": 30000, "disc_weight": 0.75},
           "diffusion": {**config["diffusion"], "use_identity": True}}
    assert configs_of({"config": old})["vqvae"] == ldm_stage.model.configs["vqvae"]
    old["diffusion"]["use_identity"] = False
    with pytest.raises(TypeError, match="diffusion.use_identity=False is no longer supported"):
        configs_of({"config": old})

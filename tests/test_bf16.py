"""bf16 autocast on the CPU: the code path of CUDA training (train.py), run without a GPU.

torch.autocast("cpu", dtype=torch.bfloat16) casts the same operations to bf16 as CUDA's autocast
does (convolutions, matrix products), so every stage is trained here for a few steps under it, at
32 px, and DiffFAE then edits under it. The parts that must stay in float32 are checked against
their float32 or float64 values: the VQ distance, the softmax statistics (slot masks M_Q and the
cross-attention maps A_cross of Eq. 7), the latent scale and the sampler arithmetic; the losses and
gradients of every stage are compared with float32's on the same weights and batch."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from runtime import guard
from training import stages
import train
from training.config import build_configs, STAGES
from samplers import SAMPLERS, make_timesteps, scaled_linear_alphas_cumprod
from assets.synthetic import SyntheticPortraits
from vqvae import VectorQuantizer

SIZE = 32
SMALL = [f"--image_size={SIZE}", "--batch_size=2", "--pool=8", "--identities=4",
         "--eval_items=4", "--log_every=1", "--warmup=1"]
STEPS = 3
# The ldm stage's I_R refined as the tiny preset does, by fewer steps.
EXTRA = {"ldm": ["--diffusion.refine_steps=2"]}


def bf16(enabled=True):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


@pytest.fixture(scope="module")
def batch():
    return default_collate(SyntheticPortraits(SIZE, "train", length=2, identities=2)
                           .__getitems__([0, 1]))


@pytest.fixture(scope="module")
def trained(batch, tmp_path_factory):
    """Every stage in order, STEPS Adam steps under bf16 autocast, each saved as train.py saves
    it for the next. Returns {stage: (module, [losses of every step])}."""
    out = tmp_path_factory.mktemp("runs")
    result = {}
    for stage in STAGES:
        torch.manual_seed(0)
        cfg, parts = build_configs(["--stage", stage, *SMALL, f"--out={out}",
                                          *EXTRA.get(stage, [])])
        module = stages.build(cfg, parts, torch.device("cpu"), n_identities=2)
        optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], 1e-3)
        history = []
        for step in range(STEPS):
            with bf16():
                losses = module(batch, step)
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
            module.after_step(batch, step)
            history.append({key: value.detach() for key, value in losses.items()})
        if stage != "ldm":
            guard.atomic_save({"stage": stage, "step": STEPS, "model": module.state_dict(),
                               "config": {stage: vars(parts[stage])}}, out / stage / "ckpt.pt")
        result[stage] = (module, history)
    return result


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_trains_under_bf16_with_finite_float32_losses(trained, stage):
    _, history = trained[stage]
    for losses in history:
        assert losses["loss"].dtype == torch.float32  # the reductions are not left in bf16
        for name, value in losses.items():
            assert torch.isfinite(value).all(), (stage, name, value)


def loss_and_gradient(module, batch, enabled):
    torch.manual_seed(1)  # the same t and ε in the ldm stage
    module.zero_grad()
    with bf16(enabled):
        loss = module(batch, STEPS)["loss"]
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    return loss.item(), gradient


# bf16 keeps 8 bits of mantissa (relative rounding 2^-9); measured agreement at these sizes:
# losses within 0.4 % of the stage's loss at its first step (the scale of its terms: the identity
# loss, with two identities, falls from 3.5 to 3e-4 in three steps, while its logits keep their
# size and their rounding), gradient cosines 0.996 and above
@pytest.mark.parametrize("stage", STAGES)
def test_bf16_loss_and_gradient_agree_with_float32(trained, batch, stage):
    module, history = trained[stage]
    loss32, gradient32 = loss_and_gradient(module, batch, enabled=False)
    loss16, gradient16 = loss_and_gradient(module, batch, enabled=True)
    assert loss16 != loss32  # autocast is on: bf16 rounds differently
    scale = abs(float(history[0]["loss"]))
    assert abs(loss16 - loss32) < 0.01 * scale, (loss16, loss32, scale)
    assert F.cosine_similarity(gradient16, gradient32, dim=0) > 0.98


def test_vq_codes_under_autocast_are_the_exact_nearest_ones():
    # the codebook at its initialisation, U(−1/K, 1/K): in bf16, ||z||² swamps −2 z·e
    torch.manual_seed(0)
    quantizer = VectorQuantizer(512, 3, beta=0.25)
    z = torch.randn(2, 3, 8, 8).to(torch.bfloat16)  # an encoder's output under autocast
    with bf16():
        _, info = quantizer(z)
    z64 = z.double().permute(0, 2, 3, 1).reshape(-1, 3)
    exact = torch.cdist(z64, quantizer.codebook.detach().double()).argmin(1)
    assert torch.equal(info["indices"].flatten(), exact)
    _, info32 = quantizer(z.float())
    assert info["perplexity"].dtype == torch.float32
    assert info["perplexity"] == info32["perplexity"]


def test_softmax_statistics_stay_float32(trained, batch):
    model = trained["ldm"][0].model.eval()
    with torch.no_grad(), bf16():
        slots = model.slots(batch["source"])
        decoded = model.slots.decode(slots["slots"])
        cond = model.conditions(batch["source"], batch["query"])
        _, maps = model.denoise(torch.randn_like(cond["f_r"]), 500, cond)
    for name, probs, dim in [("M_Q", slots["masks"], 1), ("alphas", decoded["alphas"], 1),
                             *[("A_cross", m, -1) for m in maps]]:
        assert probs.dtype == torch.float32, name  # in bf16 sums were off by 3e-3
        torch.testing.assert_close(probs.sum(dim), torch.ones_like(probs.sum(dim)),
                                   atol=1e-6, rtol=0)


def test_latent_scale_latents_and_sampler_stay_float32(trained, batch):
    model = trained["ldm"][0].model.eval()
    model.set_latent_scale(batch["query"])
    scale = model.latent_scale.clone()
    with torch.no_grad(), bf16():
        model.set_latent_scale(batch["query"])
        latent = model.encode_latent(batch["query"])
        cond = model.conditions(batch["source"], batch["query"])
        sample = model.sample(cond, steps=3, sampler="dpm++2m")
    assert model.latent_scale.dtype == torch.float32
    assert torch.equal(model.latent_scale, scale)  # measured with autocast off, as in training
    assert latent.dtype == cond["f_r"].dtype == sample.dtype == torch.float32


def test_geometry_and_arcface_logits_stay_float32(trained, batch):
    model = trained["ldm"][0].model.eval()
    with torch.no_grad():
        coefficients = model.estimator(batch["query"])
        rendered, _ = model.render(coefficients)
        with bf16():
            rendered16, _ = model.render(coefficients)
    assert torch.equal(rendered16, rendered)  # FLAME and the rasterizer skip autocast
    identity = trained["identity"][0]
    wrong = {**batch, "identity": batch["identity"].flip(0)}  # a large loss, not a rounded 0
    labels = wrong["identity"].repeat(2)
    with torch.no_grad(), bf16():
        loss = identity(wrong, STEPS)["loss"]
        embeddings = identity.encoder(torch.cat([batch["source"], batch["query"]]))
    head64 = copy.deepcopy(identity.head).double()  # cos(θ + m) from the same bf16 embeddings
    exact = F.cross_entropy(head64(embeddings.double(), labels), labels)
    assert abs(loss.item() - exact.item()) < 1e-5 * exact.item()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_arithmetic_on_a_bf16_eps_is_float32(sampler):
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 8, 8, generator=generator)
    eps = torch.randn(2, 3, 8, 8, generator=generator).to(torch.bfloat16)  # a bf16 network's
    alphas = scaled_linear_alphas_cumprod(1000, 0.00085, 0.012)
    timesteps = make_timesteps(10, 1000)
    out = SAMPLERS[sampler](lambda x, t: eps, x_T, alphas.float(), timesteps)
    exact = SAMPLERS[sampler](lambda x, t: eps.double(), x_T.double(), alphas, timesteps)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler, steps", [("ddim", 8), ("dpm++2m", 4)])
def test_edit_under_bf16_is_finite_and_close_to_float32(trained, batch, sampler, steps):
    model = trained["ldm"][0].model.eval()
    images = {}
    for enabled in (False, True):
        with bf16(enabled):
            images[enabled] = model.edit(batch["source"], batch["query"], steps=steps,
                                         sampler=sampler)["image"].float()
    assert images[True].shape == (2, 3, SIZE, SIZE)
    assert torch.isfinite(images[True]).all()
    difference = (images[True] - images[False]).abs()
    assert 0 < difference.mean() < 0.02, difference.mean()  # in [-1, 1]; measured 0.002


def test_the_training_loop_autocasts_on_the_cpu_when_asked(tmp_path):
    def first_loss(tag, *flags):  # one out folder: the runs share the rendered pool
        cfg, parts = build_configs(["--stage", "vqvae", "--steps=1", *SMALL,
                                          f"--out={tmp_path}", f"--tag={tag}", *flags])
        train.train(cfg, parts)
        return json.loads(open(tmp_path / f"vqvae-{tag}" / "log.jsonl").readline())["loss"]

    fp32, bf16_cpu = first_loss("fp32"), first_loss("bf16", "--bf16_cpu=true")
    assert bf16_cpu != fp32  # the same weights and batch, rounded differently
    assert abs(bf16_cpu - fp32) < 0.02 * fp32
    assert first_loss("off", "--bf16_cpu=true", "--bf16=false") == fp32  # bf16 off wins

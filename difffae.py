"""DiffFAE: one-shot facial appearance editing with latent diffusion (Wang et al., ECCV 2024,
arXiv 2403.17664, §4), put together from the parts in the leaf modules. Start reading here.

Space-sensitive Physical Customization (SPC, §4.1). The coefficient estimator reads shape β and
albedo α from the source and expression ψ, pose θ (global + jaw), light l and camera c from the
query; FLAME and render.py turn them into the rendered face I_R (Eq. 2-3), whose VQ latent f_r
is concatenated with the noisy latent:  ε̂ = ε_θ([z_t ; f_r], t, F, f_id).
Region-responsive Semantic Composition (RSC, §4.2). The source's slot tokens F (face, hair,
clothes, background) are the UNet's cross-attention context (Eq. 6); its identity embedding f_id
enters every res block by AdaIN (Eq. 4-5). The region encoder is trained jointly with the UNet,
starting from the slots stage.
Objective (§4.3, Eq. 1, 7, 8; every step in DiffFAE.loss), with z_0 the scaled VQ latent of I_Q:
    z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε,   t ~ U{0..T−1},   ε ~ N(0, I)
    L = ‖ε − ε̂‖² + δ·‖A_cross − M_Q‖²,   δ = 0.1
Not in the paper, each an option measured in docs/ablations.md: Min-SNR weights (Hang et al.
2023) with a floor on the x̂_0 weight (min_snr_gamma, snr_floor); the UNet predicting v
(Salimans & Ho 2022) or x̂_0 instead of ε (prediction); the face's latents weighing more in
L_LDM (face_weight); a share `truth_fraction` of the pairs taking I_R from the exact
coefficients (synthetic data), so that the UNet learns that I_R can be trusted, and the others
from the estimator's reading refined through the renderer (render_from); `slots_weight` keeping
the slots stage's loss on, so that slot k stays the token of region k (trained by L alone, the
slot called "background" took the face, and the region swaps went with it); and sampling from
a colder first noise (temperature).
A_cross: the UNet's cross-attention maps per slot token, averaged over heads and layers; M_Q: the
slot-attention masks of the query (detached: the target of the consistency term, not a second
route for the masks to drift towards the attention).
Schedule: LDM's scaled-linear β, √β evenly spaced from √0.00085 to √0.012, T = 1000 (Rombach
et al. 2022). Latents are scaled to unit variance by 1/std measured on the first training batch
(LDM's scale_factor, set_latent_scale) and stored with the model. Samplers: samplers.py.

Letters: B batch, K slots, C latent channels, h/w latent size, H/W image size.
"""
import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from assets.head import EXPRESSION_NAMES
from estimator import CoefficientEstimator, IdentityEncoder
from fitting.fit import refine
from fitting.landmarks import landmark_term
from flame import FLAME, head_pose_degrees, pose6_to_flame15
from layers import FACE, REGION_NAMES, require
from render import Renderer
from samplers import (PREDICTIONS, SAMPLERS, eps_from_prediction, loss_weight, make_timesteps,
                      scaled_linear_alphas_cumprod)
from slots import RegionSlots, masks_at, pretraining_loss
from unet import UNet, average_cross_attention
from vqvae import VQVAE


@dataclasses.dataclass
class DiffusionConfig:
    """The diffusion process, the loss and sampling defaults (DiffFAE §4, §5.1)."""
    timesteps: int = 1000          # T (LDM)
    beta_start: float = 0.00085    # LDM scaled-linear schedule
    beta_end: float = 0.012
    acr_weight: float = 0.1        # δ of Eq. 8; 0 is the "no ACR" ablation
    min_snr_gamma: float = 0.0     # γ of Min-SNR loss weights (Hang et al. 2023); 0: none (paper)
    snr_floor: float = 0.0         # with Min-SNR, the least x0-weight: w = clamp(SNR, floor, γ)/SNR
                                   # (1: the noisiest steps count as at SNR 1; 0: as published)
    truth_fraction: float = 0.0    # share of the training pairs whose I_R is of the exact
                                   # coefficients (synthetic data; not in the paper)
    slots_weight: float = 0.0      # weight of the slots stage's loss kept on (not in the paper)
    slots_supervision: float = 0.0  # weight of that loss's region term (synthetic data)
    render_from: str = "estimated"  # the other pairs' I_R: the estimator's reading ("estimated",
                                   # as in an edit) or that reading "refined" by refine_steps of
                                   # the fit (fitting/fit.py; not in the paper)
    refine_steps: int = 20         # render_from "refined": the fit's steps
    prediction: str = "eps"        # what the UNet predicts: "eps" (the paper), "v" or "x0"
    face_weight: float = 0.0       # a: the face's latents weigh 1 + a in L_LDM (not in the paper)
    sample_steps: int = 20
    sampler: str = "dpm++2m"       # "ddim" (Song et al. 2021) or "dpm++2m" (Lu et al. 2022)
    temperature: float = 1.0       # τ: sampling starts from z_T ~ N(0, τ²·I); 1: the paper

    def __post_init__(self):
        require(self.timesteps >= 2, f"DiffusionConfig.timesteps={self.timesteps}: expected >= 2")
        require(0 < self.beta_start < self.beta_end < 1, f"DiffusionConfig.beta_start="
                f"{self.beta_start}, beta_end={self.beta_end}: expected 0 < start < end < 1")
        require(self.min_snr_gamma >= 0, f"DiffusionConfig.min_snr_gamma={self.min_snr_gamma}: "
                f"expected >= 0")
        require(0 <= self.snr_floor <= self.min_snr_gamma or self.snr_floor == 0,
                f"DiffusionConfig.snr_floor={self.snr_floor}: expected 0, or a value in "
                f"[0, min_snr_gamma={self.min_snr_gamma}]")
        for name in ("slots_weight", "slots_supervision", "face_weight"):
            require(getattr(self, name) >= 0, f"DiffusionConfig.{name}={getattr(self, name)}: "
                    f"expected >= 0")
        require(0 <= self.truth_fraction <= 1, f"DiffusionConfig.truth_fraction="
                f"{self.truth_fraction}: expected a share in [0, 1]")
        require(self.render_from in ("estimated", "refined"), f"DiffusionConfig.render_from="
                f"{self.render_from!r}: expected 'estimated' or 'refined'")
        require(self.refine_steps >= 0, f"DiffusionConfig.refine_steps={self.refine_steps}: "
                f"expected >= 0")
        require(1 <= self.sample_steps <= self.timesteps, f"DiffusionConfig.sample_steps="
                f"{self.sample_steps}: expected 1..{self.timesteps}")
        require(self.prediction in PREDICTIONS, f"DiffusionConfig.prediction="
                f"{self.prediction!r}: expected one of {', '.join(PREDICTIONS)}")
        require(self.sampler in SAMPLERS, f"DiffusionConfig.sampler={self.sampler!r}: expected "
                f"one of {', '.join(SAMPLERS)}")
        require(self.temperature >= 0, f"DiffusionConfig.temperature={self.temperature}: "
                f"expected >= 0")


# -- The coefficients of an edit (SPC, Eq. 3) and editing by numbers (not in the paper) ------------
# Coefficients are dicts as estimator.CoefficientEstimator returns them: shape β (B, S), albedo
# α (B, A), expression ψ (B, E), pose θ (B, 6: global rotation vector, then jaw), light l
# (B, 9, 3: SH bands × colours), cam c (B, 3: scale, tx, ty). Eq. 3: β, α always from I_S;
# ψ, θ, l, c from I_Q for the attributes edited, from I_S otherwise. Editing by numbers writes
# explicit head angles, jaw opening, light direction or expression values over them.

EDIT_ATTRIBUTES = ("pose", "expression", "lighting")
# The estimator coefficients (key, columns) each attribute takes from the query. The jaw
# (pose6[3:]) is part of the expression; the camera moves with the head pose (DiffFAE Eq. 3 takes
# both from I_Q).
ATTRIBUTE_KEYS = {"pose": (("pose", slice(0, 3)), ("cam", slice(None))),
                  "expression": (("expression", slice(None)), ("pose", slice(3, None))),
                  "lighting": (("light", slice(None)),)}


def combine_coefficients(source, query, edit=EDIT_ATTRIBUTES):
    """Eq. 3: shape and albedo always from the source; each attribute in `edit` from the query,
    the others from the source. Coefficient dicts as CoefficientEstimator returns them."""
    assert not isinstance(edit, str) and set(edit) <= set(EDIT_ATTRIBUTES), edit
    out = {key: value.clone() for key, value in source.items()}
    for attribute in edit:
        for key, columns in ATTRIBUTE_KEYS[attribute]:
            out[key][:, columns] = query[key][:, columns]
    return out


NUMBERS = ("yaw", "pitch", "roll", "jaw", "light")  # and the built-in head's expression names


def set_numbers(coefficients, numbers, expression_names=EXPRESSION_NAMES):
    """Edit by numbers: overwrite coefficients with explicit values.

    numbers: {name: value}; yaw/pitch/roll/jaw in degrees (head rotation as intrinsic Y-X-Z
    Euler angles, the convention of head_pose_degrees; jaw opening about the x axis);
    light: a non-zero 3-vector direction — the first-order SH band is set to that direction with
    its current strength per colour; any name in expression_names sets that expression
    coefficient.
    """
    assert set(numbers) <= {*NUMBERS, *expression_names}, numbers
    out = {key: value.clone() for key, value in coefficients.items()}
    euler = {}
    for name, value in numbers.items():
        if name in ("yaw", "pitch", "roll"):
            euler[name] = float(value)
        elif name == "jaw":
            out["pose"][:, 3:] = 0
            out["pose"][:, 3] = math.radians(float(value))
        elif name == "light":
            direction = torch.as_tensor(value, dtype=out["light"].dtype,
                                        device=out["light"].device).flatten()
            assert direction.numel() == 3 and direction.norm() > 0, value
            strength = out["light"][:, 1:4].norm(dim=1, keepdim=True)  # (B, 1, 3) per colour
            out["light"][:, 1:4] = strength * (direction / direction.norm())[None, :, None]
        else:
            out["expression"][:, list(expression_names).index(name)] = float(value)
    if euler:
        angles = head_pose_degrees(out["pose"])  # (B, 3) yaw, pitch, roll
        for index, name in enumerate(("yaw", "pitch", "roll")):
            if name in euler:
                angles[:, index] = euler[name]
        rotvec = Rotation.from_euler("YXZ", angles.numpy(), degrees=True).as_rotvec()
        out["pose"][:, :3] = torch.as_tensor(rotvec, dtype=out["pose"].dtype)
    return out


def edit_coefficients(source, query, edit, numbers):
    """The coefficients of an edit: Eq. 3's mix of the source's and the query's (the source's
    alone without a query), then the numbers set over them (set_numbers)."""
    coefficients = source if query is None else combine_coefficients(source, query, edit)
    return set_numbers(coefficients, numbers) if numbers else coefficients


# -- The model -------------------------------------------------------------------------------------

def render_face(flame, renderer, coefficients):
    """SPC, Eq. 2-3: FLAME(β, ψ, θ) rendered with albedo α, SH light l and camera c → I_R in
    [-1, 1] (black outside the head) and its mask (B, 1, H, W). Coefficients as the estimator's."""
    # float32 under autocast too: bf16 would move vertices by up to 1/256 of their coordinates
    with torch.autocast(coefficients["shape"].device.type, enabled=False):
        c = {key: value.float() for key, value in coefficients.items()}
        vertices = flame(c["shape"], c["expression"], pose6_to_flame15(c["pose"]))
        out = renderer(vertices, flame.albedo(c["albedo"]), c["light"], c["cam"])
    return out["image"] * 2 - 1, out["mask"]


class DiffFAE(nn.Module):
    """All networks of the method. FLAME (the built-in head) and the renderer are submodules
    whose buffers are not saved: they are rebuilt (FLAME's license forbids redistributing it,
    and the built-in head is deterministic).

    configs: {"vqvae", "slots", "estimator", "identity", "unet": part config, "diffusion":
    DiffusionConfig}, consistent with each other (the ldm stage makes them so).
    """

    def __init__(self, configs):
        super().__init__()
        self.configs = configs
        self.diffusion = d = configs["diffusion"]
        self.vqvae = VQVAE(configs["vqvae"])
        self.slots = RegionSlots(configs["slots"])
        self.estimator = CoefficientEstimator(configs["estimator"])
        self.identity = IdentityEncoder(configs["identity"])
        self.unet = UNet(configs["unet"])
        self.flame = FLAME()
        self.renderer = Renderer(self.flame.faces, self.flame.face_uvs, self.image_size,
                                 cull_backfaces=True)
        self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod(
            d.timesteps, d.beta_start, d.beta_end).float(), persistent=False)
        # LDM's scale_factor: 0 until set_latent_scale measures it where training starts; saved
        self.register_buffer("latent_scale", torch.tensor(0.0))
        c, unet, latent = configs, configs["unet"], configs["vqvae"].latent_channels
        assert c["slots"].image_size == c["estimator"].image_size == c["identity"].image_size
        assert (unet.in_channels, unet.out_channels, unet.context_dim, unet.id_dim) == (
            2 * latent, latent, c["slots"].slot_dim, c["identity"].embedding_dim), unet
        assert all(getattr(c["estimator"], f"n_{name}") == getattr(self.flame, f"n_{name}")
                   for name in ("shape", "exp", "albedo")), "estimator and FLAME disagree"

    @property
    def image_size(self):
        return self.configs["slots"].image_size

    # -- the pieces of Eq. 3 and §4.2 ------------------------------------------------------
    def encode_latent(self, image):
        """(B, 3, H, W) in [-1, 1] → scaled VQ latent (B, C, h, w), float32 even under bf16."""
        return self.vqvae.encode(image).to(self.latent_scale.dtype) * self.latent_scale

    def decode_latent(self, z):
        """Scaled latent (B, C, h, w) → image (B, 3, H, W); the decoder quantises (LDM VQ-reg)."""
        return self.vqvae.decode(z / self.latent_scale).clamp(-1, 1)

    def render(self, coefficients):
        """SPC's I_R (see render_face)."""
        return render_face(self.flame, self.renderer, coefficients)

    @property
    def default_refine_steps(self):
        """The fit's steps where none are given: those the training I_R was refined with
        (diffusion.render_from "refined"), else 0, the estimator alone."""
        d = self.diffusion
        return d.refine_steps if d.render_from == "refined" else 0

    def fit_coefficients(self, images, steps=None, losses=None, slots=None):
        """The estimator's coefficients of `images` (B, 3, H, W), refined (fitting/fit.py; not
        in the paper): to its detector's landmarks if it has one, then by `steps` steps of
        the photometric loss through the renderer on the face slot's pixels. steps = 0 is the
        estimator alone, None the model's default. `losses` receives the photometric loss.
        slots: the region encoder whose face slot weighs the pixels, self.slots by default."""
        steps = self.default_refine_steps if steps is None else steps
        estimates = self.estimator(images)
        if steps == 0 and losses is None:
            return estimates
        slots = self.slots if slots is None else slots
        with torch.no_grad():  # the masks are fixed during the fit
            face = masks_at(slots(images)["masks"], images.shape[-2:])[:, FACE:FACE + 1]
        landmarks = landmark_term(self.estimator, self.flame, images)
        return refine(estimates, images, face, self.render, steps, landmarks, losses=losses)

    def conditions(self, source, rendered, regions=None):
        """Everything the UNet is conditioned on: f_r (B, C, h, w), the slot tokens F (B, K, D)
        and f_id (B, Di); with the rest of RegionSlots' output (the source's slot masks).
        regions: self.slots(source) when the caller has it already."""
        regions = self.slots(source) if regions is None else regions
        return {**regions, "f_r": self.encode_latent(rendered), "id": self.identity(source)}

    def swap_slots(self, cond, swap):
        """cond with the slot tokens of the regions in swap ({"hair" | "clothes" |
        "background": images (B, 3, H, W)}) replaced by those images' (expandable editing,
        App. G). Changes cond in place and returns it."""
        for region, image in (swap or {}).items():
            assert region in REGION_NAMES[1:], f"cannot swap {region!r}"  # the face is the edit
            k = REGION_NAMES.index(region)
            cond["slots"][:, k] = self.slots(image)["slots"][:, k]
        return cond

    def denoise(self, z_t, t, cond):
        """ε_θ([z_t ; f_r], t, F, f_id): the predicted noise (B, C, h, w), made from the UNet's
        v or x̂_0 where it predicts those (samplers.eps_from_prediction), and the UNet's
        cross-attention maps (unet.UNet.forward with return_attn)."""
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar = alpha_bar.view(-1, 1, 1, 1) if alpha_bar.dim() else alpha_bar
        out, maps = self.unet(torch.cat([z_t, cond["f_r"]], dim=1), t, cond["slots"], cond["id"],
                              return_attn=True)
        return eps_from_prediction(out, z_t, alpha_bar, self.diffusion.prediction), maps

    # -- training ----------------------------------------------------------------------------
    @property
    def latent_scale_set(self):  # False until set_latent_scale
        return bool(self.latent_scale != 0)

    @torch.no_grad()
    def set_latent_scale(self, images):
        """LDM's scale_factor, measured once where training starts: 1/std of the VQ latents of
        `images` (B, 3, H, W), the mean over the processes under DDP (each measured its own)."""
        with torch.autocast(images.device.type, enabled=False):  # float32: it scales every latent
            std = self.vqvae.encode(images).float().std()
        self.latent_scale.fill_(1.0 / float(std))
        if dist.is_initialized():
            dist.all_reduce(self.latent_scale)
            self.latent_scale /= dist.get_world_size()

    @torch.no_grad()
    def frozen_inputs(self, source, query, coefficients=None, fit_slots=None, every=False):
        """What the loss takes from the parts that do not train (the VQ-VAE, the estimator,
        FLAME and the renderer, the identity encoder), for same-person pairs I_S, I_Q, unscaled,
        float32: "z0", the VQ latent of I_Q; "f_r", that of I_R of the estimator's reading of
        I_Q (diffusion.render_from "estimated", as in an edit), or of that reading refined
        ("refined": fit_coefficients with fit_slots' face masks, the ldm stage's copy of the
        region encoder as pretrained); "id", f_id of I_S; with truth_fraction > 0 (or every)
        "f_r_truth", the latent of I_R of the query's exact `coefficients`; with slots_weight
        > 0 (or every) "source_z", the VQ latent of I_S, the slots term's target. The ldm stage
        computes every one once per pair of its pool (training.frozen_cache)."""
        d = self.diffusion
        if d.render_from == "refined":
            reading = self.fit_coefficients(query, d.refine_steps, slots=fit_slots)
        else:
            reading = self.estimator(query)
        def f_r(coefficients):  # the latent of I_R, unscaled
            return self.vqvae.encode(self.render(coefficients)[0]).float()

        inputs = {"z0": self.vqvae.encode(query).float(), "f_r": f_r(reading),
                  "id": self.identity(source)}
        if every or d.truth_fraction:
            assert coefficients is not None, "truth_fraction needs the exact coefficients"
            inputs["f_r_truth"] = f_r(coefficients)
        if every or d.slots_weight:
            inputs["source_z"] = self.vqvae.encode(source).float()
        return inputs

    def loss(self, source, query, coefficients=None, source_regions=None, t=None, noise=None,
             exact=None, frozen=None, fit_slots=None):
        """The whole training step's L = L_LDM + δ·L_attn (Eq. 8) [+ the slots term] for
        same-person pairs I_S, I_Q (B, 3, H, W) in [-1, 1]. coefficients: I_Q's exact ones
        (synthetic data), for the truth_fraction share; source_regions (B, H, W): I_S's, for the
        slots term. t (B,), ε (B, C, h, w), exact (B,) bool (the pairs whose I_R is exact):
        drawn from the global generator in that order when not given. frozen: frozen_inputs
        when the caller has them (fit_slots goes to it otherwise). Returns {"loss", "ldm_loss",
        "acr_loss"[, "slots_loss"]}, all but "loss" detached."""
        d = self.diffusion
        assert self.latent_scale_set, "set_latent_scale first (LDM's scale_factor)"
        # 1. SPC, Eq. 3: f_r = ℰ(I_R) of the query's coefficients drawn through FLAME, z_0 =
        #    ℰ(I_Q), f_id of I_S (frozen_inputs); latents scaled as encode_latent scales them
        if frozen is None:
            frozen = self.frozen_inputs(source, query, coefficients, fit_slots)
        scale, batch = self.latent_scale, len(source)
        z0, f_r = frozen["z0"] * scale, frozen["f_r"]  # (B, C, h, w)
        # 2. RSC (§4.2): the slot tokens F of I_S, the cross-attention's context (Eq. 6)
        regions = self.slots(source)
        # 3. forward diffusion (Eq. 1): t ~ U{0..T−1}, ε ~ N(0, I), z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε
        if t is None:
            t = torch.randint(d.timesteps, (batch,), device=z0.device)
        if noise is None:
            noise = torch.randn(z0.shape, device=z0.device, dtype=z0.dtype)
        alpha_bar = self.alphas_cumprod[t].view(batch, 1, 1, 1)
        z_t = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise
        # 4. not in the paper: a truth_fraction share of the pairs takes I_R of the exact
        #    coefficients, so that the UNet learns that I_R can be trusted
        if d.truth_fraction:
            if exact is None:
                exact = torch.rand(batch) < d.truth_fraction
            exact = exact.to(z0.device).view(-1, 1, 1, 1)
            f_r = torch.where(exact, frozen["f_r_truth"], f_r)
        cond = {**regions, "f_r": f_r * scale, "id": frozen["id"]}  # f_id: AdaIN, Eq. 4-5
        # 5. ε-prediction (Eq. 1): L_LDM = ‖ε − ε_θ([z_t ; f_r], t, F, f_id)‖², weighted by w_t
        #    (samplers.loss_weight). Not in the paper (docs/ablations.md): v or x̂_0 predicted
        #    (v: +0.8 dB on the edit), Min-SNR's x̂_0 weight clamp(SNR_t, floor, γ) for γ > 0, a
        #    mean weighted by ω = 1 + a·M_Q[face] (a = 4: +0.7 dB on the exact-render face)
        with torch.no_grad():  # M_Q, the query's slot masks (B, K, h', w'): fixed, as in step 6
            query_masks = self.slots(query)["masks"]
        eps, attn = self.denoise(z_t, t, cond)
        omega = 1 + d.face_weight * masks_at(query_masks.float(), z0.shape[-2:])[:, FACE:FACE + 1]
        ldm = ((eps.float() - noise.float()).pow(2) * omega).mean((1, 2, 3)) / omega.mean((1, 2, 3))
        ldm = (ldm * loss_weight(alpha_bar.flatten(), d.prediction, d.min_snr_gamma,
                                 d.snr_floor)).mean()
        # 6. ACR (Eq. 7): L_attn = ‖A_cross − M_Q‖²
        attention = average_cross_attention(attn, query_masks.shape[-2:])  # (B, K, h', w')
        acr = F.mse_loss(attention.float(), query_masks.float())
        # 7. L = L_LDM + δ·L_attn (Eq. 8)
        losses = {"loss": ldm + d.acr_weight * acr, "ldm_loss": ldm.detach(),
                  "acr_loss": acr.detach()}
        # 8. not in the paper: the slots stage's loss kept on (slots.pretraining_loss), so
        #    that slot k stays the token of region k; ζ, its decoder, stays as pretrained
        if d.slots_weight:
            assert source_regions is not None or not d.slots_supervision, "source_regions"
            held = pretraining_loss(self.slots, source, frozen["source_z"], source_regions,
                                    d.slots_supervision, out=regions)["loss"]
            losses["loss"] = losses["loss"] + d.slots_weight * held
            losses["slots_loss"] = held.detach()
        return losses

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond, steps=None, sampler=None, seed=0, eta=0.0, callback=None):
        """Latent (B, C, h, w) from z_T ~ N(0, τ²·I) (seeded) under the given conditions, by a
        sampler of samplers.SAMPLERS; callback receives its dict per step plus "attn", the
        UNet's cross-attention maps of that step.

        Not in the paper: the temperature τ < 1 (as Glow's reduced-temperature sampling, Kingma
        & Dhariwal 2018) trades the variety of the samples for their fidelity to the
        conditions; for data that is Gaussian given them, the deterministic samplers' output
        then lies τ times as far from its mean (tests/test_difffae.py). τ = 0 starts every edit
        from z_T = 0, the same for every seed. docs/ablations.md measures it."""
        d, sampler = self.diffusion, self.diffusion.sampler if sampler is None else sampler
        assert sampler in SAMPLERS, f"sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}"
        generator = torch.Generator(device=cond["f_r"].device).manual_seed(seed)
        x_T = d.temperature * torch.randn(cond["f_r"].shape, generator=generator,
                                          device=cond["f_r"].device, dtype=cond["f_r"].dtype)
        maps = {}

        def model_fn(x, t):
            eps, maps["attn"] = self.denoise(x, t, cond)  # the maps are computed in any case
            return eps

        step = None if callback is None else lambda state: callback({**state, **maps})
        timesteps = make_timesteps(d.sample_steps if steps is None else steps, d.timesteps)
        return SAMPLERS[sampler](model_fn, x_T, self.alphas_cumprod, timesteps, step, eta,
                                 generator)

    @torch.no_grad()
    def read(self, source, query=None, refine_steps=None, losses=None):
        """[the source's coefficients, the query's (None without a query)] as an edit uses
        them: the estimator's reading refined by refine_steps of fit_coefficients (0: the
        reading, as in the paper; None: the model's default_refine_steps), the source and the
        query fitted together (half the steps' overhead; each image's fit is its own).
        `losses` as fit_coefficients'."""
        images = source if query is None else torch.cat([source, query])
        fitted, n = self.fit_coefficients(images, refine_steps, losses), len(source)
        return [{k: v[:n] for k, v in fitted.items()},
                None if query is None else {k: v[n:] for k, v in fitted.items()}]

    def edit(self, source, query=None, edit=EDIT_ATTRIBUTES, swap=None, numbers=None,
             steps=None, sampler=None, seed=0, eta=0.0, refine_steps=None, readings=None,
             trace=None):
        """The source person (B, 3, H, W in [-1, 1]) with the query's pose / expression /
        lighting, any subset of EDIT_ATTRIBUTES (those not edited keep the source's).

        swap: {"hair" | "clothes" | "background": images (B, 3, H, W)} replaces those slot
        tokens by the other image's (expandable editing, App. G). numbers: explicit coefficient
        values applied last (editing.set_numbers); with no query, only numbers change the
        source. refine_steps: the coefficients of the source and the query are refined by that
        many steps of fit_coefficients (DiffFAE.read); readings: what read gave for this source
        and query, when the caller has it (one pair edited several ways reads it once).
        trace: a dict that receives the edit's own tensors, for
        explain.figure to draw: "cond",
        "estimates" (as used), "fit_losses" (the photometric loss before each fitting step and
        after the last), "unrefined_render" (I_R from the estimator alone; None without
        refinement) and "steps", the sampler's dict of each step (DiffFAE.sample).
        Returns {"image", "render" (I_R), "mask", "coefficients"}.
        """
        refine_steps = self.default_refine_steps if refine_steps is None else refine_steps
        losses = None if trace is None else []  # stays empty without refinement
        estimates = readings if readings is not None else self.read(
            source, query, refine_steps, losses if refine_steps else None)
        coefficients = edit_coefficients(*estimates, edit, numbers)
        rendered, mask = self.render(coefficients)
        cond = self.swap_slots(self.conditions(source, rendered), swap)
        callback = None
        if trace is not None:  # "steps" fills as the sampler steps
            unrefined = None
            if refine_steps:  # I_R as the estimator alone would have drawn it
                unrefined = self.render(edit_coefficients(*self.read(source, query, 0), edit,
                                                          numbers))[0]
            trace.update(cond=cond, estimates=estimates, fit_losses=losses,
                         unrefined_render=unrefined, steps=[], sampler=sampler)
            callback = trace["steps"].append
        image = self.decode_latent(self.sample(cond, steps, sampler, seed, eta, callback))
        return {"image": image, "render": rendered, "mask": mask, "coefficients": coefficients}

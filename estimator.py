"""Trainable stand-ins for DECA's coefficient regressor and ArcFace's identity network.

DiffFAE (Wang et al., ECCV 2024, arXiv 2403.17664, §3.2 and Eq. 3) reads FLAME coefficients off
a portrait with DECA (Feng et al., SIGGRAPH 2021) and an identity token off it with ArcFace
(Deng et al., CVPR 2019). Both sets of weights are licensed, so this file holds small networks
with the same roles and the same outputs, trained elsewhere on synthetic portraits with exact
ground-truth coefficients.

CoefficientEstimator (DECA's coarse encoder E_c, Feng et al. 2021 §4.1):
    v = W · GAP(ResNet(I)) + b + v_0,   v ∈ R^P,  P = n_shape + n_albedo + n_exp + 6 + 3 + 27
    v is split in DECA's order and layout (yfeng95/DECA: shape, tex, exp, pose, cam, light):
    shape β | albedo α (DECA: tex) | expression ψ | pose θ = [global 3, jaw 3] axis-angle |
    cam c = [s, t_x, t_y] (orthographic) | light l: 27 → (9, 3) by row-major reshape,
    so l[k, ch] = v[offset + 3k + ch] (9 SH coefficients × RGB).
    v_0 is a fixed prior (cam scale s_0, SH DC light l_0) so that the untrained network already
    renders a visible, lit head: the photometric loss only has gradients where the head covers
    pixels.

IdentityEncoder (ArcFace's embedding network; its BN-Dropout-FC-BN output, Deng et al. §4.1,
without BatchNorm):
    f_id = normalize(W · flatten(ResNet(I)) + b) ∈ S^{D-1}
csim(a, b) = â · b̂, the CSIM metric of face-reenactment papers (cosine of identity embeddings).
load_deca and load_arcface load the paper's own two networks instead, fixed (pretrained/).

DECA's orthographic camera and SH light: Feng et al. 2021, §3; flame.py maps the 6 pose numbers
to FLAME's 5 joints (Li et al. 2017). Backbones are pre-activation ResNets
(He et al. 2016, not layers.py's LDM blocks) with GroupNorm (Wu & He 2018) for BatchNorm, so the
statistics do not depend on the batch: small per-GPU batches and DDP need no SyncBatchNorm.

The fit (refine; not in the paper): the estimator's reading refined through the differentiable
renderer, analysis by synthesis. DECA (Feng et al., SIGGRAPH 2021, Eq. 8) trains its encoder
with a photometric loss between the image and its rendering, and classic 3DMM fitting (Blanz &
Vetter 1999) refines a reading of a face by descending the same loss. Here the estimator's
reading ĉ is the starting point and the region encoder's face slot says which pixels are skin,
so no face parser is needed:

    L_pho(c) = Σ_p w_p Σ_ch |I_R(c)(p, ch) − I(p, ch)| / (3 Σ_p w_p),    w = M_R ⊙ M_face

M_R is the render's own mask (the pixels the head covers) and M_face the face slot's mask (soft,
at image size). Their product is used because neither alone will do: the render's mask also
covers skin that the image hides under a fringe, and the face slot also covers skin that the
render misses, where I_R is black and the error is constant (a hard rasterizer gives it no
gradient). The true face region instead of the slot's changed the fitted face's PSNR by 0.1 dB
on 32 held-out pairs (docs/fitting.md), so the slot's mask costs nothing measurable.

The fit descends, with Adam, offsets δ_k measured in each coefficient group's spread s_k in
the data (COEFFICIENT_SCALE), so that one learning rate suits radians, metres and SH
light alike, under a Gaussian prior centred on the reading:

    c_k = ĉ_k + s_k · δ_k,    L(δ) = L_pho(c) + λ · Σ_k mean(δ_k²)

Fitted: shape β, albedo α, the global head rotation, the camera and the SH light. The jaw and
the expression ψ keep the estimator's reading: through this loss they got worse, not better
(expression 0.63 → 1.2–1.5 mm of mesh, jaw 1.3° → 2.1–3.1° in 30 steps; docs/fitting.md). At
64 px the mouth and the eyes are a few pixels across, and many expression directions move no
pixel of the face at all, so the photometric loss alone does not pin them down; DECA adds
landmarks for that.

Shape letters: B batch, C channels, S input side, H/W feature height/width, P coefficient count,
D embedding size, N classes, K = 9 SH coefficients.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import check_network, require, zero_init
from render import SH_C0

COEFFICIENT_KEYS = ("shape", "albedo", "expression", "pose", "cam", "light")
N_POSE = 6  # DECA: global rotation 3 + jaw 3, axis-angle
N_CAM = 3  # DECA orthographic camera [s, tx, ty]
N_SH = 9  # second-order spherical harmonics (Ramamoorthi & Hanrahan 2001)
N_RGB = 3
N_LIGHT = N_SH * N_RGB  # DECA: 27
# Shading is Σ c_k·l_k·basis_k; with l_0 = 1/c_0 = √(4π) the DC term alone gives shading 1, so
# the first render shows the albedo unchanged: neither black (no gradient) nor saturated.
DEFAULT_LIGHT_DC = 1.0 / SH_C0
# DECA's camera maps metric FLAME coordinates to NDC with X_ndc = s·(X + t). A FLAME head is about
# 0.2 m tall and DECA's crop is 1.25× the face, so s ≈ 2 / (1.25 · 0.2 m) = 8 fills the frame
# (our estimate; override it for a head of another size).
DEFAULT_CAM_SCALE = 8.0
# Spread of each coefficient group in the synthetic data (assets/synthetic.py): the units in
# which the estimator's regression weighs its errors and the fit (refine) moves its reading.
COEFFICIENT_SCALE = {"shape": 1.0, "albedo": 0.9, "expression": 0.45, "pose": 0.3,
                     "cam": (0.23, 0.009, 0.009), "light": 0.5}
ESTIMATOR_STEM = (7, 2)  # kernel, stride: ResNet's ImageNet stem (He et al. 2016, Table 1)
# 3×3 stride 1 for 112-px faces, ArcFace's input setting "L" (Deng et al. 2019, §4.1)
IDENTITY_STEM = (3, 1)


@dataclass
class EstimatorConfig:
    """Coefficient estimator: DECA's sizes (Feng et al. 2021) on a ResNet-18-like trunk."""

    image_size: int = 224  # DECA's encoder input (1.25× face crop)
    in_channels: int = 3
    base_channels: int = 64
    channel_mult: tuple = (1, 2, 4, 8)
    blocks_per_stage: int = 2
    norm_groups: int = 32  # GroupNorm default (Wu & He 2018)
    n_shape: int = 100
    n_albedo: int = 50  # DECA's "tex"
    n_exp: int = 50
    init_cam_scale: float = DEFAULT_CAM_SCALE
    init_light_dc: float = DEFAULT_LIGHT_DC

    def __post_init__(self):
        check_network(self, "image_size", "in_channels", "blocks_per_stage", "n_shape", "n_albedo",
                      "n_exp")
        for name in ("init_cam_scale", "init_light_dc"):  # a visible, unmirrored, lit first render
            value = getattr(self, name)
            require(value > 0, f"EstimatorConfig.{name}={value}: need > 0")

    @property
    def coefficient_sizes(self):
        """Flat sizes in DECA's order, keyed like COEFFICIENT_KEYS."""
        return {"shape": self.n_shape, "albedo": self.n_albedo, "expression": self.n_exp,
                "pose": N_POSE, "cam": N_CAM, "light": N_LIGHT}

    @property
    def n_params(self):
        """Total coefficient count P (236 for DECA's sizes)."""
        return sum(self.coefficient_sizes.values())


@dataclass
class IdentityConfig:
    """Identity encoder; defaults follow ArcFace's 112-px input and 512-d embedding."""

    image_size: int = 112
    in_channels: int = 3
    base_channels: int = 64
    channel_mult: tuple = (1, 2, 4, 8)
    blocks_per_stage: int = 2
    norm_groups: int = 32
    embedding_dim: int = 512

    def __post_init__(self):
        check_network(self, "image_size", "in_channels", "blocks_per_stage", "embedding_dim")


class ResidualBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity mappings"), GroupNorm for BatchNorm.

    (B, C_in, H, W) -> (B, C_out, ⌈H/stride⌉, ⌈W/stride⌉); a 1×1 projection shortcut where the
    shape changes.
    """

    def __init__(self, in_channels, out_channels, stride, norm_groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x):
        h = self.conv1(F.relu(self.norm1(x)))
        h = self.conv2(F.relu(self.norm2(h)))
        return self.shortcut(x) + h


class ResNetTrunk(nn.Module):
    """Stem conv, then one stage per channel_mult entry, each starting with a stride-2 block.

    Input (B, C_in, S, S); output (B, C_last, H, W) after a final GroupNorm + ReLU, with
    H = W = ⌈S / (s · 2^len(channel_mult))⌉, s the stem's stride (convs with padding k // 2 round
    up). The widths, depth and groups come from cfg (an EstimatorConfig or IdentityConfig).
    """

    def __init__(self, cfg, stem):
        super().__init__()
        kernel, stride = stem
        self.stem = nn.Conv2d(cfg.in_channels, cfg.base_channels, kernel, stride=stride,
                              padding=kernel // 2, bias=False)
        blocks = []
        width = cfg.base_channels
        for k in cfg.channel_mult:
            for i in range(cfg.blocks_per_stage):
                blocks.append(ResidualBlock(width, cfg.base_channels * k, 2 if i == 0 else 1,
                                            cfg.norm_groups))
                width = cfg.base_channels * k
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, width)
        self.out_channels = width
        self.out_side = math.ceil(cfg.image_size / (stride * 2 ** len(cfg.channel_mult)))

    def forward(self, x):
        return F.relu(self.norm_out(self.blocks(self.stem(x))))


def _check_image(image, cfg):
    expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
    assert image.dim() == 4 and image.shape[1:] == expected, f"image {tuple(image.shape)}"


class CoefficientEstimator(nn.Module):
    """Image -> FLAME/DECA coefficients (DECA's role in DiffFAE).

    forward(image (B, C, S, S) in [-1, 1]) returns a dict: shape (B, n_shape), albedo (B, n_albedo),
    expression (B, n_exp), pose (B, 6) [global 3, jaw 3], cam (B, 3) [s, tx, ty], light (B, 9, 3).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.trunk = ResNetTrunk(cfg, ESTIMATOR_STEM)
        # Zero head: every image starts at the prior v_0 (a plausible render); the head's weight
        # still gets gradient W-grad = features ⊗ upstream, and the trunk from the second step on.
        self.head = zero_init(nn.Linear(self.trunk.out_channels, cfg.n_params))
        self.register_buffer("prior", self._prior_vector(), persistent=True)  # (P,)

    def _prior_vector(self):
        prior = {key: torch.zeros(1, size) for key, size in self.cfg.coefficient_sizes.items()}
        prior["cam"][0, 0] = self.cfg.init_cam_scale
        prior["light"] = torch.zeros(1, N_SH, N_RGB)
        prior["light"][0, 0, :] = self.cfg.init_light_dc
        return self.encode(prior)[0]  # (P,)

    def decode(self, vector):
        """Split a flat vector (B, P) into the coefficient dict, in DECA's order.

        light is reshaped row-major: light[b, k, ch] = vector[b, offset + 3k + ch].
        """
        assert vector.dim() == 2 and vector.shape[1] == self.cfg.n_params, f"{tuple(vector.shape)}"
        sizes = self.cfg.coefficient_sizes
        parts = torch.split(vector, [sizes[key] for key in COEFFICIENT_KEYS], dim=1)
        coeffs = dict(zip(COEFFICIENT_KEYS, parts))
        coeffs["light"] = coeffs["light"].reshape(vector.shape[0], N_SH, N_RGB)  # (B, K, 3)
        return coeffs

    def encode(self, coeffs):
        """Inverse of decode: the coefficient dict -> flat vector (B, P)."""
        assert set(coeffs) == set(COEFFICIENT_KEYS), f"coefficients {tuple(coeffs)}"
        assert coeffs["light"].shape[1:] == (N_SH, N_RGB), f"light {tuple(coeffs['light'].shape)}"
        batch = coeffs["shape"].shape[0]
        vector = torch.cat([coeffs[key].reshape(batch, -1) for key in COEFFICIENT_KEYS], dim=1)
        assert vector.shape[1] == self.cfg.n_params, f"{tuple(vector.shape)}"
        return vector  # (B, P)

    def forward(self, image):
        _check_image(image, self.cfg)
        features = self.trunk(image).mean(dim=(2, 3))  # (B, C) global average pooling
        vector = self.head(features) + self.prior  # (B, P)
        return self.decode(vector)


class IdentityEncoder(nn.Module):
    """Image -> unit identity embedding f_id (B, D) (ArcFace's role in DiffFAE).

    The feature map is flattened, not pooled, as in ArcFace's output block (face layout matters);
    its BatchNorm-Dropout-FC-BatchNorm becomes GroupNorm (in the trunk)-FC, and the final BatchNorm
    is dropped because the L2 normalisation follows.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.trunk = ResNetTrunk(cfg, IDENTITY_STEM)
        side = self.trunk.out_side
        self.fc = nn.Linear(self.trunk.out_channels * side * side, cfg.embedding_dim)

    def forward(self, image):
        """image (B, C, S, S) in [-1, 1] -> (B, D) with unit L2 norm."""
        _check_image(image, self.cfg)
        features = self.trunk(image).flatten(1)  # (B, C·H·W)
        return F.normalize(self.fc(features), dim=1)  # (B, D)


def csim(a, b):
    """Cosine similarity per pair: (B, D), (B, D) -> (B,) — the CSIM identity metric."""
    assert a.dim() == 2 and a.shape == b.shape, f"{tuple(a.shape)} vs {tuple(b.shape)}"
    a_hat = F.normalize(a, dim=1)  # (B, D)
    b_hat = F.normalize(b, dim=1)  # (B, D)
    return (a_hat * b_hat).sum(dim=1)  # (B,)


def load_deca(path):
    """DECA's own coarse encoder from deca_model.tar: a fixed estimator (pretrained/deca.py)."""
    from pretrained.deca import load_deca as load  # imported here: it imports this file
    return load(path)


def load_arcface(path):
    """ArcFace's iResNet-100 from backbone.pth: a fixed identity encoder (pretrained/arcface.py)."""
    from pretrained.arcface import load_arcface as load
    return load(path)


# -- The fit: the reading refined through the renderer (not in the paper) --------------------

FITTED = ("shape", "albedo", "pose", "cam", "light")  # the pose's jaw columns are kept (above)
GLOBAL_ROTATION = slice(0, 3)  # pose6 = [global rotation 3, jaw 3]
FIT_LR = 0.05     # Adam's step, in units of each group's spread s_k (chosen in docs/fitting.md)
FIT_PRIOR = 0.01  # λ: the pull towards the estimator's reading


def photometric_loss(rendered, render_mask, images, face, per_image=False):
    """L_pho of the module docstring: the mean |I_R − I| over the pixels of weight
    w = render_mask · face (both (B, 1, H, W), in [0, 1]) and the 3 colours; rendered and
    images (B, 3, H, W). A scalar over the whole batch, or with per_image one per image (B,);
    0 where no pixel has weight."""
    assert rendered.shape == images.shape, f"{tuple(rendered.shape)} vs {tuple(images.shape)}"
    weight = render_mask * face  # (B, 1, H, W)
    error = (rendered - images).abs() * weight
    dims = (1, 2, 3) if per_image else (0, 1, 2, 3)
    return error.sum(dims) / (3 * weight.sum(dims)).clamp(min=1e-8)


def fittable(coefficients):
    """The coefficients with the jaw and the expression detached, so that a photometric loss
    through them moves only what the fit moves (FITTED; the module docstring says why). The
    estimator stage's loss on frames without coefficients goes through it."""
    pose = coefficients["pose"]  # (B, 6)
    pose = torch.cat([pose[:, GLOBAL_ROTATION], pose[:, GLOBAL_ROTATION.stop:].detach()], dim=1)
    kept = {k: v.detach() for k, v in coefficients.items() if k not in FITTED}
    return {**coefficients, **kept, "pose": pose}


def refine(estimates, images, face, render, steps, lr=FIT_LR, prior=FIT_PRIOR, losses=None):
    """The reading `estimates` (the estimator's dict) refined by `steps` Adam steps on L(δ) for
    `images` (B, 3, H, W) with face masks `face` (B, 1, H, W); `render(coefficients)` returns
    (I_R, M_R) as difffae.render_face does. steps = 0 returns the reading unchanged. The
    result has the estimator's keys and shapes, detached. Each image has its own L(δ), summed
    over the batch, so that its fit does not depend on the images fitted beside it. `losses`,
    a list, receives L_pho (the mean over the images) before each step and after the last."""
    scale = {k: torch.as_tensor(v, dtype=images.dtype, device=images.device)
             for k, v in COEFFICIENT_SCALE.items()}
    reading = {k: v.detach() for k, v in estimates.items()}
    delta = {k: torch.zeros_like(reading[k], requires_grad=True) for k in FITTED}
    keep = torch.zeros_like(reading["pose"])
    keep[:, GLOBAL_ROTATION] = 1  # the jaw's offset stays 0

    def coefficients():
        moved = {k: reading[k] + scale[k] * d for k, d in delta.items()}
        moved["pose"] = reading["pose"] + scale["pose"] * delta["pose"] * keep
        return {**reading, **moved}

    optimizer = torch.optim.Adam(delta.values(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = photometric_loss(*render(coefficients()), images, face, per_image=True)
            if losses is not None:
                losses.append(float(loss.detach().mean()))
            total = loss.sum() + prior * sum(d.pow(2).flatten(1).mean(1).sum()
                                             for d in delta.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
    with torch.no_grad():
        fitted = coefficients()
        if losses is not None:
            losses.append(float(photometric_loss(*render(fitted), images, face,
                                                 per_image=True).mean()))
    return fitted

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

The landmark detector (EstimatorConfig.n_landmarks > 0; fitting/landmarks.py) finds chosen FLAME
vertices in the image, for the fit of fitting/fit.py that refines the reading (not in the paper).

Shape letters: B batch, C channels, S input side, H/W feature height/width, P coefficient count,
D embedding size, N classes, K = 9 SH coefficients.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fitting.landmarks import LandmarkDetector
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
    # a landmark detector beside the regressor (fitting/landmarks.py; not in DECA's encoder)
    n_landmarks: int = 0  # 0: none
    landmark_channels: int = 32
    landmark_mult: tuple = (1, 2, 4, 4)

    def __post_init__(self):
        check_network(self, "image_size", "in_channels", "blocks_per_stage", "n_shape", "n_albedo",
                      "n_exp")
        require(isinstance(self.n_landmarks, int) and self.n_landmarks >= 0,
                f"EstimatorConfig.n_landmarks={self.n_landmarks!r}: expected an int >= 0")
        if self.n_landmarks:
            check_network(self, base="landmark_channels", mult="landmark_mult")
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
    With cfg.n_landmarks > 0, `landmarks` is a LandmarkDetector beside it (image -> (B, K, 2)
    pixels), which the fit calls; else None.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.trunk = ResNetTrunk(cfg, ESTIMATOR_STEM)
        # Zero head: every image starts at the prior v_0 (a plausible render); the head's weight
        # still gets gradient W-grad = features ⊗ upstream, and the trunk from the second step on.
        self.head = zero_init(nn.Linear(self.trunk.out_channels, cfg.n_params))
        self.register_buffer("prior", self._prior_vector(), persistent=True)  # (P,)
        self.landmarks = LandmarkDetector(cfg) if cfg.n_landmarks else None

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

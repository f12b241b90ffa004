"""Trainable stand-ins for DECA's coefficient regressor and ArcFace's identity network.

DiffFAE (Wang et al., ECCV 2024, arXiv 2403.17664, §3.2 and Eq. 3) reads FLAME coefficients off
a portrait with DECA (Feng et al., SIGGRAPH 2021) and an identity token off it with ArcFace
(Deng et al., CVPR 2019). Both sets of weights are licensed, so this file holds small networks
with the same roles and the same outputs, trained elsewhere on synthetic portraits with exact
ground-truth coefficients.

CoefficientEstimator (DECA's coarse encoder E_c):
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
ArcMarginHead (additive angular margin, Deng et al. Eq. 3):
    cos θ_j = ŵ_j · x̂,   logit_j = s · cos θ_j (j ≠ y),   logit_y = s · cos(θ_y + m)
    cos(θ + m) = cos θ cos m − sin θ sin m,   sin θ = √max(1 − cos²θ, 0)
    for θ_y + m > π (cos θ_y < cos(π − m)) we use cos θ_y − m·sin m instead ("easy_margin=False"
    in the authors' code, deepinsight/insightface recognition/arcface_torch/losses.py): cos(θ + m)
    would rise again on (π − m, π], rewarding a larger angle; the fallback keeps the target logit
    strictly decreasing in θ over [0, π].
csim(a, b) = â · b̂, the CSIM metric of face-reenactment papers (cosine of identity embeddings).

References checked: DECA's coefficient sizes/order, orthographic camera and SH light layout
(REFERENCE.md, yfeng95/DECA); FLAME's 5-joint pose order [global, neck, jaw, left eye, right eye]
(Li et al. 2017); ArcFace s = 64, m = 0.5 (Deng et al. 2019, §4.1 "Implementation Details").
Backbones are ResNets (He et al. 2016) with GroupNorm (Wu & He 2018) instead of BatchNorm, so the
statistics do not depend on the batch: small per-GPU batches and DDP need no SyncBatchNorm.

Shape letters: B batch, C channels, S input side, H/W feature height/width, P coefficient count,
D embedding size, N classes, K = 9 SH coefficients.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from flame import flame15_to_pose6, pose6_to_flame15  # noqa: F401  (re-exported)
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
ESTIMATOR_STEM = (7, 2)  # kernel, stride: ResNet's ImageNet stem (He et al. 2016, Table 1)
# 3×3 stride 1 for 112-px faces, ArcFace's input setting "L" (Deng et al. 2019, §4.1)
IDENTITY_STEM = (3, 1)
ARCFACE_SCALE = 64.0  # Deng et al. 2019 §4.1
ARCFACE_MARGIN = 0.5  # Deng et al. 2019 §4.1, radians
NORM_EPS = 1e-12  # guards L2 normalisation of a zero vector


def _check_backbone(name, image_size, in_channels, base_channels, channel_mult, blocks_per_stage,
                    norm_groups):
    """Shared __post_init__ checks of the ResNet fields; returns channel_mult as a tuple."""
    for field, value in (("image_size", image_size), ("in_channels", in_channels),
                         ("base_channels", base_channels), ("blocks_per_stage", blocks_per_stage),
                         ("norm_groups", norm_groups)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}.{field} must be a positive int, got {value!r}")
    mult = tuple(channel_mult)
    if len(mult) == 0 or any(not isinstance(k, int) or k < 1 for k in mult):
        raise ValueError(f"{name}.channel_mult must be non-empty positive ints, "
                         f"got {channel_mult!r}")
    for k in mult:
        if (base_channels * k) % norm_groups != 0:
            raise ValueError(f"{name}: stage width {base_channels * k} is not divisible by "
                             f"norm_groups={norm_groups}; choose a divisor of every stage width")
    return mult


@dataclass
class EstimatorConfig:
    """Coefficient estimator; defaults are DECA's sizes (REFERENCE.md) on a ResNet-18-like trunk."""

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
        self.channel_mult = _check_backbone(
            "EstimatorConfig", self.image_size, self.in_channels, self.base_channels,
            self.channel_mult, self.blocks_per_stage, self.norm_groups)
        for field in ("n_shape", "n_albedo", "n_exp"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EstimatorConfig.{field} must be a positive int, got {value!r}")
        if not self.init_cam_scale > 0:
            raise ValueError(f"EstimatorConfig.init_cam_scale must be > 0 (a visible, unmirrored "
                             f"render), got {self.init_cam_scale!r}")
        if not self.init_light_dc > 0:
            raise ValueError(f"EstimatorConfig.init_light_dc must be > 0 (a lit render), "
                             f"got {self.init_light_dc!r}")

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
        self.channel_mult = _check_backbone(
            "IdentityConfig", self.image_size, self.in_channels, self.base_channels,
            self.channel_mult, self.blocks_per_stage, self.norm_groups)
        if not isinstance(self.embedding_dim, int) or self.embedding_dim < 1:
            raise ValueError(f"IdentityConfig.embedding_dim must be a positive int, "
                             f"got {self.embedding_dim!r}")


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
    H = W = ⌈S / (stem_stride · 2^len(channel_mult))⌉ (3×3 stride-2 convs with padding 1 round up).
    """

    def __init__(self, in_channels, base_channels, channel_mult, blocks_per_stage, norm_groups,
                 stem):
        super().__init__()
        kernel, stride = stem
        self.stem_stride = stride
        self.stem = nn.Conv2d(in_channels, base_channels, kernel, stride=stride,
                              padding=kernel // 2, bias=False)
        blocks = []
        width = base_channels
        for k in channel_mult:
            for i in range(blocks_per_stage):
                blocks.append(ResidualBlock(width, base_channels * k, 2 if i == 0 else 1,
                                            norm_groups))
                width = base_channels * k
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(norm_groups, width)
        self.out_channels = width
        self.n_stages = len(channel_mult)

    def output_side(self, image_size):
        """Spatial side H of the output for an input of side image_size."""
        side = math.ceil(image_size / self.stem_stride)
        for _ in range(self.n_stages):
            side = math.ceil(side / 2)
        return side

    def forward(self, x):
        return F.relu(self.norm_out(self.blocks(self.stem(x))))


def _check_image(image, in_channels, image_size, who):
    if image.dim() != 4:
        raise ValueError(f"{who}: image must be (B, C, S, S), got shape {tuple(image.shape)}")
    if image.shape[1] != in_channels:
        raise ValueError(f"{who}: image has {image.shape[1]} channels, expected {in_channels}")
    if image.shape[2] != image_size or image.shape[3] != image_size:
        raise ValueError(f"{who}: image is {image.shape[2]}x{image.shape[3]}, expected "
                         f"{image_size}x{image_size}")


class CoefficientEstimator(nn.Module):
    """Image -> FLAME/DECA coefficients (DECA's role in DiffFAE).

    Parameters
    ----------
    cfg : EstimatorConfig

    forward(image (B, C, S, S) in [-1, 1]) returns a dict: shape (B, n_shape), albedo (B, n_albedo),
    expression (B, n_exp), pose (B, 6) [global 3, jaw 3], cam (B, 3) [s, tx, ty], light (B, 9, 3).
    """

    pose6_to_flame15 = staticmethod(pose6_to_flame15)
    flame15_to_pose6 = staticmethod(flame15_to_pose6)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.trunk = ResNetTrunk(cfg.in_channels, cfg.base_channels, cfg.channel_mult,
                                 cfg.blocks_per_stage, cfg.norm_groups, ESTIMATOR_STEM)
        self.head = nn.Linear(self.trunk.out_channels, cfg.n_params)
        # Zero head: every image starts at the prior v_0 (a plausible render); the head's weight
        # still gets gradient W-grad = features ⊗ upstream, and the trunk from the second step on.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
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
        if vector.dim() != 2 or vector.shape[1] != self.cfg.n_params:
            raise ValueError(f"vector must be (B, {self.cfg.n_params}), "
                             f"got shape {tuple(vector.shape)}")
        sizes = self.cfg.coefficient_sizes
        parts = torch.split(vector, [sizes[key] for key in COEFFICIENT_KEYS], dim=1)
        coeffs = dict(zip(COEFFICIENT_KEYS, parts))
        coeffs["light"] = coeffs["light"].reshape(vector.shape[0], N_SH, N_RGB)  # (B, K, 3)
        return coeffs

    def encode(self, coeffs):
        """Inverse of decode: the coefficient dict -> flat vector (B, P)."""
        if set(coeffs) != set(COEFFICIENT_KEYS):
            raise ValueError(f"coefficient keys must be {COEFFICIENT_KEYS}, got {tuple(coeffs)}")
        batch = coeffs["shape"].shape[0]
        sizes = self.cfg.coefficient_sizes
        flat = []
        for key in COEFFICIENT_KEYS:
            value = coeffs[key]
            expected = (batch, N_SH, N_RGB) if key == "light" else (batch, sizes[key])
            if tuple(value.shape) != expected:
                raise ValueError(f"coefficient '{key}' must be {expected}, "
                                 f"got {tuple(value.shape)}")
            flat.append(value.reshape(batch, -1))  # (B, size)
        return torch.cat(flat, dim=1)  # (B, P)

    def forward(self, image):
        _check_image(image, self.cfg.in_channels, self.cfg.image_size, "CoefficientEstimator")
        features = self.trunk(image).mean(dim=(2, 3))  # (B, C) global average pooling
        vector = self.head(features) + self.prior  # (B, P)
        return self.decode(vector)


class IdentityEncoder(nn.Module):
    """Image -> unit identity embedding f_id (B, D) (ArcFace's role in DiffFAE).

    The feature map is flattened, not pooled, as in ArcFace's output block (face layout matters);
    its BatchNorm-Dropout-FC-BatchNorm becomes GroupNorm (in the trunk)-FC, and the final BatchNorm
    is dropped because the L2 normalisation follows.

    Parameters
    ----------
    cfg : IdentityConfig
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.trunk = ResNetTrunk(cfg.in_channels, cfg.base_channels, cfg.channel_mult,
                                 cfg.blocks_per_stage, cfg.norm_groups, IDENTITY_STEM)
        side = self.trunk.output_side(cfg.image_size)
        self.fc = nn.Linear(self.trunk.out_channels * side * side, cfg.embedding_dim)

    def forward(self, image):
        """image (B, C, S, S) in [-1, 1] -> (B, D) with unit L2 norm."""
        _check_image(image, self.cfg.in_channels, self.cfg.image_size, "IdentityEncoder")
        features = self.trunk(image).flatten(1)  # (B, C·H·W)
        return F.normalize(self.fc(features), dim=1, eps=NORM_EPS)  # (B, D)


def _sqrt_zero_safe(x):
    """√x for x ≥ 0 whose gradient at x = 0 is 0 instead of inf (0·inf would give NaN).

    The inner where keeps sqrt's backward away from 0; the outer one selects the exact value.
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


class ArcMarginHead(nn.Module):
    """ArcFace additive angular margin logits (Deng et al. 2019, Eq. 3).

    Parameters
    ----------
    embedding_dim : int
        D.
    n_classes : int
        N identities.
    s : float
        Feature scale; 64 in the paper (§4.1). With few classes a smaller s (e.g. 16-30) avoids a
        softmax that saturates before the classes separate.
    m : float
        Angular margin in radians, 0.5 in the paper; 0 ≤ m < π/2.

    forward(embeddings (B, D), labels (B,) int) -> logits (B, N) for cross-entropy.
    """

    def __init__(self, embedding_dim, n_classes, s=ARCFACE_SCALE, m=ARCFACE_MARGIN):
        super().__init__()
        if not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        if not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
        if not s > 0:
            raise ValueError(f"scale s must be > 0, got {s!r}")
        if not 0 <= m < math.pi / 2:
            raise ValueError(f"margin m must be in [0, pi/2) radians, got {m!r}")
        self.s = float(s)
        self.m = float(m)
        self.weight = nn.Parameter(torch.empty(n_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.cos_m = math.cos(m)
        self.sin_m = math.sin(m)
        self.cos_threshold = math.cos(math.pi - m)  # cos θ below this means θ + m > π
        self.fallback_margin = m * math.sin(m)  # = m·sin(π − m), the insightface constant

    def forward(self, embeddings, labels):
        n_classes, dim = self.weight.shape
        if embeddings.dim() != 2 or embeddings.shape[1] != dim:
            raise ValueError(f"embeddings must be (B, {dim}), got shape {tuple(embeddings.shape)}")
        integer = not labels.is_floating_point() and not labels.is_complex()
        if labels.shape != embeddings.shape[:1] or not integer or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer (B,) = ({embeddings.shape[0]},), "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        labels = labels.long()  # gather and one_hot index with int64
        if labels.numel() > 0 and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(f"labels must lie in [0, {n_classes}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        x = F.normalize(embeddings, dim=1, eps=NORM_EPS)  # (B, D)
        w = F.normalize(self.weight, dim=1, eps=NORM_EPS)  # (N, D)
        cos = (x @ w.T).clamp(-1.0, 1.0)  # (B, N); rounding can leave |cos| slightly above 1
        cos_y = cos.gather(1, labels[:, None])  # (B, 1)
        sin_y = _sqrt_zero_safe(1.0 - cos_y * cos_y)  # (B, 1); θ ∈ [0, π] so sin θ ≥ 0
        cos_y_margin = cos_y * self.cos_m - sin_y * self.sin_m  # cos(θ_y + m)
        target = torch.where(cos_y >= self.cos_threshold, cos_y_margin,
                             cos_y - self.fallback_margin)  # (B, 1)
        is_target = F.one_hot(labels, n_classes).bool()  # (B, N)
        return self.s * torch.where(is_target, target, cos)  # (B, N)


def csim(a, b):
    """Cosine similarity per pair: (B, D), (B, D) -> (B,) — the CSIM identity metric."""
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"csim needs two (B, D) tensors of one shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    a_hat = F.normalize(a, dim=1, eps=NORM_EPS)  # (B, D)
    b_hat = F.normalize(b, dim=1, eps=NORM_EPS)  # (B, D)
    return (a_hat * b_hat).sum(dim=1)  # (B,)

"""Region-responsive Semantic Composition (RSC): region encoder, slot attention, broadcast decoder.

DiffFAE (Wang et al., ECCV 2024, arXiv 2403.17664) §4.2 and App. B, Table 4: a U-Net-style CNN φ^E
maps the source portrait (256×256) to a 32×32×192 feature map; slot attention (Locatello et al.
2020, "Object-Centric Learning with Slot Attention", Algorithm 1) groups those features into
K = 4 slot tokens of size 192 (3 iterations) that condition the denoising UNet by cross-attention.
Its attention maps M are the region masks the cross-attention is asked to match (Eq. 7).
§4.3 pretrains φ^E + slot attention by reconstruction through a spatial-broadcast decoder ζ
(Watters et al. 2019, "Spatial Broadcast Decoder"), as in Locatello et al.'s object discovery.

Encoder (LDM encoder layout, Rombach et al. 2022): conv in; per level `num_res_blocks` residual
blocks (GroupNorm, SiLU, conv) and a 2× downsampling between levels; middle block res →
multi-head self-attention → res; GroupNorm, SiLU, conv out to `feature_dim`.
Tokens (Locatello et al., App. "soft position embedding"):
    x = MLP(LN(flatten(F + W_pos · [x, y, 1−x, 1−y])))                     (B, N, C)
Slot attention, per iteration, starting from learned initial slots s = μ (+ exp(log σ)·n):
    A = softmax_K( k(LN(x)) · q(LN(s))ᵀ / √D )                             (B, N, K)
    W = (A + ε) / Σ_N (A + ε)                                              weighted mean over inputs
    u = Wᵀ · v(LN(x))                                                      (B, K, D)
    s ← GRU(u, s);   s ← s + MLP(LN(s))
    region masks M = Aᵀ of the last iteration, reshaped to (B, K, h, w)
Broadcast decoder, per slot k: (r_k, a_k) = ζ(broadcast(s_k) + W_pos · grid)
    α = softmax_K(a);   x̂ = Σ_k α_k · r_k                                 (B, C, h, w)

Where implementations differ we follow Locatello et al.'s reference: q/k/v projections without
bias, LayerNorm on inputs and on slots, ε added before the weighted mean, GRU + residual MLP.
We depart in one place on purpose: the initial slots are K LEARNED vectors (not K samples of one
shared Gaussian), so slot k binds to the same region in every image; DiffFAE takes the face token
from one image and the hair / clothes / background tokens from another by index.

Shapes: B batch, C channels (feature_dim for tokens), S image side, h/w feature or target
height/width, N = h·w tokens, K slots, D slot size, E heads, T target channels.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GROUP_NORM_EPS = 1e-6  # LDM's Normalize() uses GroupNorm(eps=1e-6)
GRID_CHANNELS = 4  # [x, y, 1−x, 1−y], Locatello et al. 2020 soft position embedding
# 3×3 stride-1 convs as in Watters et al. 2019; they broadcast to size + 8 and do not pad, we pad
# ("same") and broadcast to the target size directly
DECODER_KERNEL = 3


@dataclass
class SlotsConfig:
    """Region encoder φ^E, slot attention and broadcast decoder ζ (defaults = DiffFAE Table 4).

    mlp_hidden = 2·slot_dim, the ratio of the slot-attention reference (slot 64, MLP 128); the
    paper does not state it. init_noise is the initial value of the learned σ around the learned
    initial slots, used only in training; 0 makes the slots deterministic (paper: unstated).
    target_size is the decoder's output side: the VQ latent side (64 for 256px, f = 4) or
    image_size for pixel reconstruction; target_channels is 3 either way.
    """

    image_size: int = 256
    in_channels: int = 3
    base_channels: int = 64
    channel_mult: tuple = (1, 1, 2, 4)
    num_res_blocks: int = 2
    attn_heads: int = 8
    norm_groups: int = 32  # LDM uses 32 GroupNorm groups
    feature_dim: int = 192
    num_slots: int = 4
    slot_dim: int = 192
    iters: int = 3
    mlp_hidden: int = 384
    decoder_channels: int = 64
    decoder_layers: int = 4
    target_channels: int = 3
    target_size: int = 64
    init_noise: float = 0.0
    eps: float = 1e-8

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        positive = ("image_size", "in_channels", "base_channels", "num_res_blocks", "attn_heads",
                    "norm_groups", "feature_dim", "num_slots", "slot_dim", "iters", "mlp_hidden",
                    "decoder_channels", "decoder_layers", "target_channels", "target_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SlotsConfig.{name} must be a positive int, got {value!r}")
        if not self.channel_mult or any(not isinstance(m, int) or m < 1
                                        for m in self.channel_mult):
            raise ValueError(f"SlotsConfig.channel_mult must be positive ints, "
                             f"got {self.channel_mult!r}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(f"SlotsConfig.image_size={self.image_size} is not divisible by "
                             f"2**(len(channel_mult)-1) = {factor}")
        for mult in self.channel_mult:
            if (self.base_channels * mult) % self.norm_groups:
                raise ValueError(f"SlotsConfig: base_channels*mult = {self.base_channels * mult} "
                                 f"is not divisible by norm_groups={self.norm_groups}")
        middle = self.base_channels * self.channel_mult[-1]
        if middle % self.attn_heads:
            raise ValueError(f"SlotsConfig: middle channels {middle} not divisible by "
                             f"attn_heads={self.attn_heads}")
        if self.init_noise < 0:
            raise ValueError(f"SlotsConfig.init_noise must be >= 0, got {self.init_noise}")
        if self.eps <= 0:
            raise ValueError(f"SlotsConfig.eps must be > 0, got {self.eps}")

    @property
    def feature_size(self) -> int:
        """Side of the encoder's feature map: image_size / 2**(levels−1) (256 → 32)."""
        return self.image_size // 2 ** (len(self.channel_mult) - 1)


def position_grid(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """The 4-channel grid [x, y, 1−x, 1−y], x along width and y along height, both in [0, 1].

    Returns
    -------
    (height, width, 4) tensor.
    """
    y = torch.linspace(0.0, 1.0, height, device=device, dtype=dtype)
    x = torch.linspace(0.0, 1.0, width, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(y, x, indexing="ij")  # (h, w) each
    return torch.stack([xx, yy, 1.0 - xx, 1.0 - yy], dim=-1)  # (h, w, 4)


class SoftPositionEmbed(nn.Module):
    """Add a learned linear projection of `position_grid` to a feature map (B, C, h, w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Linear(GRID_CHANNELS, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = position_grid(x.shape[-2], x.shape[-1], x.device, x.dtype)  # (h, w, 4)
        embedding = self.proj(grid).permute(2, 0, 1)  # (C, h, w)
        return x + embedding


class ResBlock(nn.Module):
    """LDM residual block: (GroupNorm, SiLU, conv) × 2 plus a 1×1 skip when channels change."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=GROUP_NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=GROUP_NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the h·w positions, with a residual (Table 4: 8 heads)."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # (B, E, N, C/E) each
        # softmax(q kᵀ / sqrt(C/E)) v per head
        out = F.scaled_dot_product_attention(q, k, v)  # (B, E, N, C/E)
        out = out.transpose(-1, -2).reshape(b, c, h, w)  # (B, C, h, w)
        return x + self.proj(out)


class RegionEncoder(nn.Module):
    """φ^E: the down half of an LDM-style U-Net, (B, in_channels, S, S) → (B, feature_dim, h, w).

    With the paper config 256×256×3 → 32×32×192 (Table 4).
    """

    def __init__(self, cfg: SlotsConfig):
        super().__init__()
        groups = cfg.norm_groups
        channels = [cfg.base_channels * m for m in cfg.channel_mult]
        layers = [nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)]
        current = channels[0]
        for level, out_channels in enumerate(channels):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(current, out_channels, groups))
                current = out_channels
            if level < len(channels) - 1:
                # stride-2 conv; LDM pads (0, 1, 0, 1) asymmetrically, we use symmetric padding 1
                layers.append(nn.Conv2d(current, current, 3, stride=2, padding=1))
        layers.append(ResBlock(current, current, groups))
        layers.append(SelfAttention(current, cfg.attn_heads, groups))
        layers.append(ResBlock(current, current, groups))
        layers.append(nn.GroupNorm(groups, current, eps=GROUP_NORM_EPS))
        layers.append(nn.SiLU())
        layers.append(nn.Conv2d(current, cfg.feature_dim, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.layers(image)


class SlotAttention(nn.Module):
    """Slot attention (Locatello et al. 2020, Algorithm 1) with learned per-slot initial vectors.

    Parameters
    ----------
    num_slots, dim : K slots of size D.
    iters : attention iterations (3).
    mlp_hidden : hidden width of the residual MLP.
    eps : added to the attention before the weighted mean over inputs.
    input_dim : size of the input tokens (default D).
    init_noise : if > 0, training draws s = μ + exp(log σ)·n, n ~ N(0, I), σ initialised to
        init_noise and learned (reparameterised so μ and log σ both get gradient). If 0 there is no
        log σ parameter at all (an unused parameter would break DDP), and the slots start at μ.

    Forward: inputs (B, N, input_dim) → slots (B, K, D), attention (B, K, N) of the last iteration,
    normalised over slots (each column sums to 1).
    """

    def __init__(self, num_slots: int, dim: int, iters: int = 3, mlp_hidden: int = 384,
                 eps: float = 1e-8, input_dim: int = None, init_noise: float = 0.0):
        super().__init__()
        if iters < 1:
            raise ValueError(f"SlotAttention: iters must be >= 1, got {iters}")
        input_dim = dim if input_dim is None else input_dim
        self.num_slots = num_slots
        self.dim = dim
        self.input_dim = input_dim
        self.iters = iters
        self.eps = eps
        self.mu = nn.Parameter(torch.empty(num_slots, dim))
        nn.init.xavier_uniform_(self.mu)  # the reference's slots_mu initialisation
        self.log_sigma = None
        if init_noise > 0:
            self.log_sigma = nn.Parameter(torch.full((num_slots, dim), math.log(init_noise)))
        self.norm_inputs = nn.LayerNorm(input_dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(input_dim, dim, bias=False)
        self.to_v = nn.Linear(input_dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, dim))

    def initial_slots(self, batch: int) -> torch.Tensor:
        """μ broadcast to (batch, K, D), plus exp(log σ)·noise in training when σ exists."""
        mu = self.mu.expand(batch, -1, -1)  # (B, K, D)
        if self.training and self.log_sigma is not None:
            return mu + self.log_sigma.exp() * torch.randn_like(mu)
        return mu

    def forward(self, inputs: torch.Tensor):
        if inputs.dim() != 3 or inputs.shape[-1] != self.input_dim:
            raise ValueError(f"SlotAttention: inputs must be (B, N, {self.input_dim}), "
                             f"got {tuple(inputs.shape)}")
        b = inputs.shape[0]
        inputs = self.norm_inputs(inputs)
        k = self.to_k(inputs)  # (B, N, D)
        v = self.to_v(inputs)  # (B, N, D)
        slots = self.initial_slots(b)  # (B, K, D)
        scale = self.dim ** -0.5
        for _ in range(self.iters):
            previous = slots
            q = self.to_q(self.norm_slots(slots))  # (B, K, D)
            logits = torch.einsum("bnd,bkd->bkn", k, q) * scale  # (B, K, N)
            attn = logits.softmax(dim=1)  # over slots: slots compete for each input
            weights = attn + self.eps
            weights = weights / weights.sum(dim=-1, keepdim=True)  # weighted mean over inputs
            updates = torch.einsum("bkn,bnd->bkd", weights, v)  # (B, K, D)
            slots = self.gru(updates.reshape(b * self.num_slots, self.dim),
                             previous.reshape(b * self.num_slots, self.dim))  # (B·K, D)
            slots = slots.reshape(b, self.num_slots, self.dim)  # (B, K, D)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attn


class BroadcastDecoder(nn.Module):
    """ζ: spatial broadcast decoder (Watters et al. 2019) with per-slot alpha compositing.

    Each slot is tiled over a size×size grid, a position embedding is added, and a stack of
    `layers` 3×3 convs (ReLU) plus a 1×1 conv gives `out_channels` values and one alpha logit per
    pixel. All slots go through the convs at once (K folded into the batch).

    Forward: slots (B, K, D) → recon (B, T, h, w), alphas (B, K, h, w) (softmax over slots),
    slot_recons (B, K, T, h, w).
    """

    def __init__(self, slot_dim: int, channels: int, layers: int, out_channels: int, size: int):
        super().__init__()
        self.size = size
        self.out_channels = out_channels
        self.position = SoftPositionEmbed(slot_dim)
        convs = []
        current = slot_dim
        for _ in range(layers):
            convs.append(nn.Conv2d(current, channels, DECODER_KERNEL, padding=DECODER_KERNEL // 2))
            convs.append(nn.ReLU())
            current = channels
        convs.append(nn.Conv2d(current, out_channels + 1, 1))
        self.convs = nn.Sequential(*convs)

    def forward(self, slots: torch.Tensor) -> dict:
        b, k, d = slots.shape
        x = slots.reshape(b * k, d, 1, 1).expand(-1, -1, self.size, self.size)  # (B·K, D, h, w)
        x = self.convs(self.position(x))  # (B·K, T+1, h, w)
        x = x.reshape(b, k, self.out_channels + 1, self.size, self.size)  # (B, K, T+1, h, w)
        slot_recons = x[:, :, : self.out_channels]  # (B, K, T, h, w)
        alphas = x[:, :, self.out_channels].softmax(dim=1)  # (B, K, h, w)
        recon = torch.einsum("bkhw,bkthw->bthw", alphas, slot_recons)  # (B, T, h, w)
        return {"recon": recon, "alphas": alphas, "slot_recons": slot_recons}


class RegionSlots(nn.Module):
    """RSC: φ^E + soft position embedding + token MLP + slot attention, and the decoder ζ.

    forward(image (B, in_channels, S, S) in [-1, 1]) → dict
        slots    (B, K, D)        the region tokens (cross-attention context of the UNet)
        masks    (B, K, h, w)     slot-attention masks at feature resolution, sum to 1 over K
        features (B, C, h, w)     the encoder's feature map
    decode(slots (B, K, D)) → dict(recon (B, T, t, t), alphas (B, K, t, t),
        slot_recons (B, K, T, t, t)), t = target_size; used only for pretraining (§4.3).
    """

    def __init__(self, cfg: SlotsConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = RegionEncoder(cfg)
        self.position = SoftPositionEmbed(cfg.feature_dim)
        self.norm = nn.LayerNorm(cfg.feature_dim)
        # Locatello et al.: two dense layers of the feature width after the position embedding
        self.mlp = nn.Sequential(nn.Linear(cfg.feature_dim, cfg.feature_dim), nn.ReLU(),
                                 nn.Linear(cfg.feature_dim, cfg.feature_dim))
        self.slot_attention = SlotAttention(cfg.num_slots, cfg.slot_dim, cfg.iters,
                                            cfg.mlp_hidden, cfg.eps, input_dim=cfg.feature_dim,
                                            init_noise=cfg.init_noise)
        self.decoder = BroadcastDecoder(cfg.slot_dim, cfg.decoder_channels, cfg.decoder_layers,
                                        cfg.target_channels, cfg.target_size)

    def forward(self, image: torch.Tensor) -> dict:
        cfg = self.cfg
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if image.dim() != 4 or tuple(image.shape[1:]) != expected:
            raise ValueError(f"RegionSlots: image must be (B, {cfg.in_channels}, {cfg.image_size}, "
                             f"{cfg.image_size}), got {tuple(image.shape)}")
        features = self.encoder(image)  # (B, C, h, w)
        b, c, h, w = features.shape
        tokens = self.position(features).flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = self.mlp(self.norm(tokens))  # (B, N, C)
        slots, attn = self.slot_attention(tokens)  # (B, K, D), (B, K, N)
        masks = attn.reshape(b, cfg.num_slots, h, w)  # (B, K, h, w)
        return {"slots": slots, "masks": masks, "features": features}

    def decode(self, slots: torch.Tensor) -> dict:
        cfg = self.cfg
        if slots.dim() != 3 or tuple(slots.shape[1:]) != (cfg.num_slots, cfg.slot_dim):
            raise ValueError(f"RegionSlots.decode: slots must be (B, {cfg.num_slots}, "
                             f"{cfg.slot_dim}), got {tuple(slots.shape)}")
        return self.decoder(slots)


def reconstruction_loss(out: dict, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between decode()'s recon (B, T, t, t) and the target of the same shape
    (the VQ latent of the image, or the image itself): the slot pretraining loss (§4.3)."""
    recon = out["recon"]
    if recon.shape != target.shape:
        raise ValueError(f"reconstruction_loss: target shape {tuple(target.shape)} does not match "
                         f"recon shape {tuple(recon.shape)}")
    return F.mse_loss(recon, target)


def masks_at(masks: torch.Tensor, size) -> torch.Tensor:
    """Resize masks (B, K, h, w) to size (int or (H, W)) bilinearly, renormalised over slots.

    Bilinear weights are convex, so the sum over K stays 1 up to rounding; the renormalisation
    removes that rounding. Returns (B, K, H, W).
    """
    if masks.dim() != 4:
        raise ValueError(f"masks_at: masks must be (B, K, h, w), got {tuple(masks.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    resized = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)  # (B, K, H, W)
    resized = resized.clamp_min(0.0)
    return resized / resized.sum(dim=1, keepdim=True).clamp_min(torch.finfo(masks.dtype).tiny)

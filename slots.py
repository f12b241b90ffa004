"""Region-responsive Semantic Composition (RSC): region encoder, slot attention, broadcast decoder.

DiffFAE (Wang et al., ECCV 2024, arXiv 2403.17664) §4.2 and App. B, Table 4: a U-Net-style CNN φ^E
maps the source portrait (256×256) to a 32×32×192 feature map; slot attention (Locatello et al.
2020, "Object-Centric Learning with Slot Attention", Algorithm 1) groups those features into
K = 4 slot tokens of size 192 (3 iterations) that condition the denoising UNet by cross-attention.
Its attention maps M are the region masks the cross-attention is asked to match (Eq. 7).
§4.3 pretrains φ^E + slot attention by reconstruction through a spatial-broadcast decoder ζ
(Watters et al. 2019, "Spatial Broadcast Decoder"), as in Locatello et al.'s object discovery.

Encoder φ^E (App. B: "a U-Net ... skip connections", output 32×32 from a 256×256 input with channel
multipliers 1, 1, 2, 4): LDM's encoder levels (Rombach et al. 2022; layers.py), each level but the
last followed by a halving, down to the output side S/f, f = 2**(len(channel_mult) − 1); one more
halving to the middle block (ResBlock, `attn_heads`-head self-attention, ResBlock) at S/2f; back up
to S/f, where the skip connection concatenates the output level's features before
`num_res_blocks` ResBlocks and a conv out to `feature_dim` channels. Table 4 gives the input and
output sides but not the depth of the U; this reading puts its middle block one level below the
output, so the output mixes the bottleneck's context with the level's own detail.
Tokens (Locatello et al., App. "soft position embedding"):
    x = MLP(LN(flatten(F + W_pos · [x, y, 1−x, 1−y])))                     (B, N, C)
Slot attention, per iteration, starting from the learned initial slots s = μ:
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
height/width, N = h·w tokens, K slots, D slot size, T target channels.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layers import (NORM_EPS, ResBlock, check_network, downsample, levels, mid_block,
                    require)

MASK_EPS = 1e-6  # floor of mask probabilities before the log of the region term
GRID_CHANNELS = 4  # [x, y, 1−x, 1−y], Locatello et al. 2020 soft position embedding
# 3×3 stride-1 convs as in Watters et al. 2019; they broadcast to size + 8 and do not pad, we pad
# ("same") and broadcast to the target size directly
DECODER_KERNEL = 3


@dataclass
class SlotsConfig:
    """Region encoder φ^E, slot attention and broadcast decoder ζ (defaults = DiffFAE Table 4).

    mlp_hidden = 2·slot_dim, the ratio of the slot-attention reference (slot 64, MLP 128); the
    paper does not state it. target_size is the decoder's output side: the VQ latent side (64 for
    256px, f = 4) or image_size for pixel reconstruction; target_channels is 3 either way.
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
    eps: float = 1e-8

    def __post_init__(self):
        check_network(self, "image_size", "in_channels", "num_res_blocks", "attn_heads",
                      "feature_dim", "num_slots", "slot_dim", "iters", "mlp_hidden",
                      "decoder_channels", "decoder_layers", "target_channels", "target_size")
        factor = 2 ** len(self.channel_mult)  # the middle block's side is image_size / factor
        require(self.image_size % factor == 0, f"SlotsConfig.image_size={self.image_size}: "
                f"not divisible by {factor}, the region encoder's deepest downsampling")
        middle = self.base_channels * self.channel_mult[-1]
        require(middle % self.attn_heads == 0, f"SlotsConfig.attn_heads={self.attn_heads}: "
                f"does not divide the {middle} channels of the middle attention")
        require(self.eps > 0, f"SlotsConfig.eps={self.eps}: need > 0")


class RegionEncoder(nn.Module):
    """φ^E, a U-Net (module docstring): (B, C_in, S, S) → (B, feature_dim, S/f, S/f)."""

    def __init__(self, cfg):
        super().__init__()
        widths, groups = [cfg.base_channels * m for m in cfg.channel_mult], cfg.norm_groups
        width = widths[-1]
        self.down = nn.Sequential(nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1),
                                  *levels(widths[0], widths, cfg.num_res_blocks, groups,
                                         downsample))
        self.bottom = nn.Sequential(*downsample(width), mid_block(width, groups, cfg.attn_heads),
                                    nn.Upsample(scale_factor=2.0, mode="nearest"),
                                    nn.Conv2d(width, width, 3, padding=1))
        self.up = nn.Sequential(
            ResBlock(2 * width, width, groups),
            *(ResBlock(width, width, groups) for _ in range(cfg.num_res_blocks - 1)),
            nn.GroupNorm(groups, width, eps=NORM_EPS), nn.SiLU(),
            nn.Conv2d(width, cfg.feature_dim, 3, padding=1))

    def forward(self, image):
        skip = self.down(image)  # (B, W, S/f, S/f), the output level's features
        return self.up(torch.cat([self.bottom(skip), skip], dim=1))  # skip connection


def position_grid(height, width, device=None, dtype=None):
    """The 4-channel grid (height, width, 4) [x, y, 1−x, 1−y]: x along width and y along
    height, both in [0, 1]."""
    y = torch.linspace(0.0, 1.0, height, device=device, dtype=dtype)
    x = torch.linspace(0.0, 1.0, width, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(y, x, indexing="ij")  # (h, w) each
    return torch.stack([xx, yy, 1.0 - xx, 1.0 - yy], dim=-1)  # (h, w, 4)


class SoftPositionEmbed(nn.Module):
    """Add a learned linear projection of `position_grid` to a feature map (B, C, h, w)."""

    def __init__(self, channels):
        super().__init__()
        self.proj = nn.Linear(GRID_CHANNELS, channels)

    def forward(self, x):
        grid = position_grid(x.shape[-2], x.shape[-1], x.device, x.dtype)  # (h, w, 4)
        embedding = self.proj(grid).permute(2, 0, 1)  # (C, h, w)
        return x + embedding


class SlotAttention(nn.Module):
    """Slot attention (Locatello et al. 2020, Algorithm 1) with learned per-slot initial vectors.

    K = num_slots slots of size D = dim, `iters` iterations, `mlp_hidden` the hidden width of the
    residual MLP, `eps` added to the attention before the weighted mean over inputs, `input_dim`
    the size of the input tokens (default D).

    Forward: inputs (B, N, input_dim) → slots (B, K, D), attention (B, K, N) of the last iteration,
    normalised over slots (each column sums to 1).
    """

    def __init__(self, num_slots, dim, iters=3, mlp_hidden=384, eps=1e-8, input_dim=None):
        super().__init__()
        input_dim = dim if input_dim is None else input_dim
        self.num_slots = num_slots
        self.dim = dim
        self.input_dim = input_dim
        self.iters = iters
        self.eps = eps
        self.mu = nn.Parameter(torch.empty(num_slots, dim))
        nn.init.xavier_uniform_(self.mu)  # the reference's slots_mu initialisation
        self.norm_inputs = nn.LayerNorm(input_dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(input_dim, dim, bias=False)
        self.to_v = nn.Linear(input_dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, dim))

    def forward(self, inputs):
        assert inputs.dim() == 3 and inputs.shape[-1] == self.input_dim, f"{tuple(inputs.shape)}"
        b = inputs.shape[0]
        inputs = self.norm_inputs(inputs)
        k = self.to_k(inputs)  # (B, N, D)
        v = self.to_v(inputs)  # (B, N, D)
        slots = self.mu.expand(b, -1, -1)  # (B, K, D)
        scale = self.dim ** -0.5
        for _ in range(self.iters):
            previous = slots
            q = self.to_q(self.norm_slots(slots))  # (B, K, D)
            logits = torch.einsum("bnd,bkd->bkn", k, q) * scale  # (B, K, N)
            # over slots: slots compete for each input; in the weights' precision (float32
            # under bf16 autocast), since these are the region masks M_Q of Eq. 7
            attn = logits.to(self.mu.dtype).softmax(dim=1)
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

    def __init__(self, slot_dim, channels, layers, out_channels, size):
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

    def forward(self, slots):
        b, k, d = slots.shape
        x = slots.reshape(b * k, d, 1, 1).expand(-1, -1, self.size, self.size)  # (B·K, D, h, w)
        x = self.convs(self.position(x))  # (B·K, T+1, h, w)
        x = x.reshape(b, k, self.out_channels + 1, self.size, self.size)  # (B, K, T+1, h, w)
        slot_recons = x[:, :, : self.out_channels]  # (B, K, T, h, w)
        alpha_logits = x[:, :, self.out_channels].to(self.position.proj.weight.dtype)
        alphas = alpha_logits.softmax(dim=1)  # (B, K, h, w), float32 under bf16 autocast
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

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = RegionEncoder(cfg)
        self.position = SoftPositionEmbed(cfg.feature_dim)
        self.norm = nn.LayerNorm(cfg.feature_dim)
        # Locatello et al.: two dense layers of the feature width after the position embedding
        self.mlp = nn.Sequential(nn.Linear(cfg.feature_dim, cfg.feature_dim), nn.ReLU(),
                                 nn.Linear(cfg.feature_dim, cfg.feature_dim))
        self.slot_attention = SlotAttention(cfg.num_slots, cfg.slot_dim, cfg.iters,
                                            cfg.mlp_hidden, cfg.eps, input_dim=cfg.feature_dim)
        self.decoder = BroadcastDecoder(cfg.slot_dim, cfg.decoder_channels, cfg.decoder_layers,
                                        cfg.target_channels, cfg.target_size)

    def forward(self, image):
        cfg = self.cfg
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        assert image.dim() == 4 and image.shape[1:] == expected, f"image {tuple(image.shape)}"
        features = self.encoder(image)  # (B, C, h, w)
        b, c, h, w = features.shape
        tokens = self.position(features).flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = self.mlp(self.norm(tokens))  # (B, N, C)
        slots, attn = self.slot_attention(tokens)  # (B, K, D), (B, K, N)
        masks = attn.reshape(b, cfg.num_slots, h, w)  # (B, K, h, w)
        return {"slots": slots, "masks": masks, "features": features}

    def decode(self, slots):
        assert slots.shape[1:] == (self.cfg.num_slots, self.cfg.slot_dim), f"{tuple(slots.shape)}"
        return self.decoder(slots)


def masks_at(masks, size):
    """Resize masks (B, K, h, w) to size (int or (H, W)) bilinearly, renormalised over slots.

    Bilinear weights are convex, so the sum over K stays 1 up to rounding; the renormalisation
    removes that rounding. Returns (B, K, H, W).
    """
    assert masks.dim() == 4, f"masks {tuple(masks.shape)}"
    size = (size, size) if isinstance(size, int) else tuple(size)
    resized = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)  # (B, K, H, W)
    resized = resized.clamp_min(0.0)
    return resized / resized.sum(dim=1, keepdim=True).clamp_min(torch.finfo(masks.dtype).tiny)


def pretraining_loss(slots, images, target, regions=None, supervision=0.0, out=None):
    """The loss of RSC's pretraining (§4.3): ζ's reconstruction of `target` (B, T, t, t), the
    frozen VQ latent of `images`, by MSE; with supervision > 0 (not in the paper) plus the mask
    loss −log M_k at the pixels of region k, regions (B, H, W). out: slots(images) when the
    caller has it already. Returns {"loss", and its terms, detached}."""
    out = slots(images) if out is None else out
    reconstruction = F.mse_loss(slots.decode(out["slots"])["recon"], target)
    if not supervision:
        return {"loss": reconstruction}
    masks = masks_at(out["masks"], images.shape[-1])  # (B, K, H, W)
    region_loss = F.nll_loss(masks.clamp(min=MASK_EPS).log(), regions)
    return {"loss": reconstruction + supervision * region_loss,
            "reconstruction_loss": reconstruction.detach(), "region_loss": region_loss.detach()}

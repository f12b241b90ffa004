"""The denoiser ε_θ of DiffFAE: a latent-diffusion UNet with AdaIN identity injection and
cross-attention to slot tokens, whose cross-attention probabilities are returned functionally.

Paper: Wang et al., "DiffFAE", ECCV 2024 (arXiv 2403.17664), §4. The noisy latent z_t is
concatenated along channels with f_r (VQ latent of the rendered face I_R); the source's slot
tokens S (face, hair, clothes, background) enter by cross-attention; the identity embedding f_id
enters by AdaIN in every residual block; the cross-attention maps A_cross are supervised by the
query's slot masks M_Q (attention-consistency loss, Eq. 7):

    ε̂ = ε_θ([z_t ; f_r], t, S, f_id)
    temb(t) = MLP([sin(t·ω_0..ω_{h-1}), cos(t·ω_0..ω_{h-1})]),  ω_i = 10000^(−i/h),  h = dim/2
    AdaIN(h, f_id) = h_s·IN(h) + h_b,  [h_s, h_b] = W·SiLU(f_id) + b   (Eq. 4-5, IN without affine)
    A = softmax(Q·Kᵀ/√d) over the K tokens,  Q = W_q·x,  K = W_k·S,  V = W_v·S
    A_cross = mean_layers resize(mean_heads A_l)                              (Eq. 7)

Backbone: LDM (Rombach et al., CVPR 2022), LDM-4 CelebA-HQ scale (base 224, multipliers 1,2,3,4,
2 res blocks, attention at 32/16/8 of a 64×64 latent, 32 channels per head). Structure checked
against the public latent-diffusion UNet (openaimodel.py, attention.py), which we follow in: block
order (skips after every input block, num_res_blocks+1 blocks per up level, middle Res-Attn-Res),
zero-initialised second res conv, transformer proj_out and output conv; time MLP of width
4·base; GEGLU feed-forward (Shazeer 2020) of inner width 4·C; q/k/v without bias, output
projection with bias; a 1×1 conv as proj_in/proj_out; no positional embedding on context tokens.
Where we differ: LDM's transformer GroupNorm uses eps 1e-6, we use PyTorch's default 1e-5
everywhere; LDM-4 CelebA-HQ has self-attention only, we use LDM's SpatialTransformer
(self-attention, cross-attention, feed-forward) to take the slot tokens; LDM's res block adds
the time embedding before its second GroupNorm, ours normalises by AdaIN from f_id and adds it
after, as LDM's scale-shift variant does (instance statistics would cancel a shift made before).
Other references: sinusoidal embedding, Vaswani et al. 2017 §3.5 as used by DDPM (Ho et al.
2020, App. B) — frequencies as LDM (ω_i = 10000^(−i/h)), order [sin, cos] as DDPM (the order is
irrelevant because a linear layer follows); AdaIN, Huang & Belongie 2017 Eq. 8, as DiffFAE
Eq. 4-5 writes it (instance statistics); explicit softmax probabilities because Eq. 7 needs them.

Shapes: B batch, C channels, H/W height/width, N = H·W tokens, K context (slot) tokens,
Dc context dim, Di identity dim, heads attention heads, d channels per head.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layers import UNET_NORM_EPS, check_network, require, zero_init

MAX_PERIOD = 10000.0  # Vaswani et al. 2017 §3.5; DDPM and LDM timestep embeddings
TIME_EMBED_MULT = 4  # time-MLP width = 4·base_channels (DDPM, LDM)
FF_MULT = 4  # GEGLU inner width = 4·C (LDM FeedForward, Vaswani et al. 2017 d_ff = 4·d_model)


@dataclass
class UNetConfig:
    """UNet hyper-parameters; defaults are the paper scale (LDM-4 CelebA-HQ, 64×64×3 latent).

    attention_resolutions are downsampling factors: level i has factor 2**i, so (2, 4, 8) with
    four levels attends at 32, 16 and 8 for a 64×64 latent. The middle block always attends.
    """

    in_channels: int = 6  # z_t (3) + f_r (3)
    out_channels: int = 3
    base_channels: int = 224
    channel_mult: tuple = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (2, 4, 8)
    head_channels: int = 32  # channels per attention head (LDM num_head_channels)
    context_dim: int = 192  # slot size, DiffFAE App. B
    id_dim: int = 512  # ArcFace embedding size
    norm_groups: int = 32  # GroupNorm groups (Wu & He 2018; LDM)

    def __post_init__(self):
        self.attention_resolutions = tuple(self.attention_resolutions)
        check_network(self, "in_channels", "out_channels", "num_res_blocks", "head_channels",
                      "context_dim", "id_dim")
        require(self.base_channels % self.norm_groups == 0, f"UNetConfig.norm_groups="
                f"{self.norm_groups} does not divide base_channels={self.base_channels}")
        factors = [2 ** level for level in range(len(self.channel_mult))]
        for factor in self.attention_resolutions:
            require(factor in factors, f"UNetConfig.attention_resolutions: factor {factor!r} is "
                    f"not one of the level factors {factors}")
        attended = [self.level_channels()[level] for level in self.attention_levels()]
        for channels in attended + [self.level_channels()[-1]]:
            require(channels % self.head_channels == 0, f"UNetConfig.head_channels="
                    f"{self.head_channels} does not divide the {channels} attended channels")

    def level_channels(self):
        """Channels of each resolution level: base_channels·mult."""
        return [self.base_channels * mult for mult in self.channel_mult]

    def attention_levels(self):
        """Indices of the levels whose factor 2**level is in attention_resolutions."""
        return [level for level in range(len(self.channel_mult))
                if 2 ** level in self.attention_resolutions]


def timestep_embedding(t, dim, max_period=MAX_PERIOD):
    """Sinusoidal embedding (B, dim) of timesteps t (B,), integer or real:
    [sin(t·ω_i), cos(t·ω_i)], ω_i = max_period^(−i/half), i < half = dim // 2; an odd dim gets a
    zero last column. Computed in t's dtype if floating, else in float32."""
    dtype = t.dtype if t.is_floating_point() else torch.float32
    half = dim // 2
    index = torch.arange(half, device=t.device, dtype=dtype)
    omega = torch.exp(-math.log(max_period) * index / half)  # (half,)
    angle = t.to(dtype)[:, None] * omega[None, :]  # (B, half)
    embedding = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)  # (B, 2·half)
    return F.pad(embedding, (0, dim - 2 * half))  # (B, dim)


class AdaIN(nn.Module):
    """AdaIN(h, f_id) = h_s·IN(h) + h_b with [h_s, h_b] = MLP¹(f_id) (DiffFAE Eq. 4-5).

    IN is instance normalisation without affine (per image and channel, over the pixels); MLP¹
    is the paper's single-layer MLP with SiLU, read as LDM's conditioning projections are
    built: SiLU, then one linear layer. Its weight starts at zero and its bias at h_s = 1,
    h_b = 0, so AdaIN starts as plain IN and learns the identity's influence from there (a
    stable start, like LDM's zero-initialised residual branches).

    Input h (B, C, H, W), f_id (B, Di); output (B, C, H, W).
    """

    def __init__(self, channels, id_dim):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, eps=UNET_NORM_EPS, affine=False)
        self.to_scale_shift = nn.Linear(id_dim, 2 * channels)
        nn.init.zeros_(self.to_scale_shift.weight)
        with torch.no_grad():
            self.to_scale_shift.bias.copy_(torch.cat([torch.ones(channels),
                                                      torch.zeros(channels)]))

    def forward(self, h, id_embed):
        scale, shift = self.to_scale_shift(F.silu(id_embed)).chunk(2, dim=1)  # (B, C) each
        return self.norm(h) * scale[:, :, None, None] + shift[:, :, None, None]


class AdaINResBlock(nn.Module):
    """GN+SiLU+conv, AdaIN(f_id) + time projection, SiLU+conv (zero-init), + skip.

    Input x (B, C_in, H, W), temb (B, 4·base), f_id (B, Di); output (B, C_out, H, W).
    """

    def __init__(self, in_channels, out_channels, temb_dim, id_dim, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=UNET_NORM_EPS)
        # no bias: AdaIN's instance normalisation, next, would cancel it
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.time_proj = nn.Linear(temb_dim, out_channels)
        self.adain = AdaIN(out_channels, id_dim)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x, temb, id_embed):
        h = self.conv1(F.silu(self.norm1(x)))
        # the time embedding, one shift per channel, goes in after AdaIN: IN would remove it
        h = self.adain(h, id_embed) + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class CrossAttention(nn.Module):
    """Multi-head attention from pixels to context tokens with explicit probabilities.

    Input x (B, N, C), context (B, K, Dc); returns (out (B, N, C), probs (B, heads, N, K)) where
    probs = softmax(Q·Kᵀ/√d) over the K tokens (the maps of DiffFAE Eq. 7). q/k/v without bias,
    output with bias (as LDM).
    """

    def __init__(self, channels, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_dim, channels, bias=False)
        self.to_v = nn.Linear(context_dim, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)

    def project(self, x, context):
        """q (B, heads, N, d) from x; k, v (B, heads, K, d) from the context."""
        return [linear(tokens).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, ·, d)
                for linear, tokens in ((self.to_q, x), (self.to_k, context), (self.to_v, context))]

    def forward(self, x, context):
        q, k, v = self.project(x, context)
        # b batch, h head, n pixel, k token, d channel within the head
        logits = torch.einsum("bhnd,bhkd->bhnk", q, k) / math.sqrt(q.shape[-1])  # (B,heads,N,K)
        # each pixel's distribution over the K tokens, in the weights' precision (float32 under
        # bf16 autocast): these are the maps A_cross that Eq. 7 compares with M_Q
        probs = logits.to(self.to_q.weight.dtype).softmax(dim=-1)
        out = torch.einsum("bhnk,bhkd->bhnd", probs, v)  # (B, heads, N, d)
        return self.to_out(out.transpose(1, 2).flatten(2)), probs  # heads merged: (B, N, C)


class SelfAttention(CrossAttention):
    """Multi-head self-attention over pixels, (B, N, C) → (B, N, C). No map is needed here, so
    F.scaled_dot_product_attention computes softmax(Q·Kᵀ/√d)·V."""

    def __init__(self, channels, heads):
        super().__init__(channels, channels, heads)

    def forward(self, x):
        q, k, v = self.project(x, x)  # (B, heads, N, d) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return self.to_out(out.transpose(1, 2).flatten(2))  # heads merged: (B, N, C)


class GEGLUFeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): W_2·(a ⊙ GELU(g)), [a, g] = W_1·x; inner 4·C (LDM)."""

    def __init__(self, channels):
        super().__init__()
        self.proj_in = nn.Linear(channels, 2 * FF_MULT * channels)
        self.proj_out = nn.Linear(FF_MULT * channels, channels)

    def forward(self, x):
        value, gate = self.proj_in(x).chunk(2, dim=-1)  # (B, N, inner) each
        return self.proj_out(value * F.gelu(gate))


class SpatialTransformer(nn.Module):
    """LDM's SpatialTransformer with one pre-norm block: GN, proj_in, [LN→self-attn, LN→cross-attn,
    LN→GEGLU FF] with residuals, proj_out (zero-init), outer residual.

    Input x (B, C, H, W), context (B, K, Dc); returns (x' (B, C, H, W), probs (B, heads, H, W, K)).
    """

    def __init__(self, channels, heads, context_dim, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=UNET_NORM_EPS)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.norm_self = nn.LayerNorm(channels)
        self.self_attn = SelfAttention(channels, heads)
        self.norm_cross = nn.LayerNorm(channels)
        self.cross_attn = CrossAttention(channels, context_dim, heads)
        self.norm_ff = nn.LayerNorm(channels)
        self.ff = GEGLUFeedForward(channels)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x, context):
        batch, channels, height, width = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, N, C)
        h = h + self.self_attn(self.norm_self(h))
        attended, probs = self.cross_attn(self.norm_cross(h), context)  # probs (B, heads, N, K)
        h = h + attended
        h = h + self.ff(self.norm_ff(h))
        h = h.transpose(1, 2).reshape(batch, channels, height, width)  # (B, C, H, W)
        return x + self.proj_out(h), probs.unflatten(2, (height, width))  # (B,heads,H,W,K)


class UNetStage(nn.Module):
    """One AdaINResBlock, then a SpatialTransformer if this resolution attends.

    Returns (h, maps): maps is [probs (B, heads, H, W, K)] or [] — threaded up functionally.
    """

    def __init__(self, in_channels, out_channels, temb_dim, config, attend):
        super().__init__()
        self.res = AdaINResBlock(in_channels, out_channels, temb_dim, config.id_dim,
                            config.norm_groups)
        self.transformer = None
        if attend:
            self.transformer = SpatialTransformer(out_channels,
                                                  out_channels // config.head_channels,
                                                  config.context_dim, config.norm_groups)

    def forward(self, h, temb, id_embed, context):
        h = self.res(h, temb, id_embed)
        if self.transformer is None:
            return h, []
        h, probs = self.transformer(h, context)
        return h, [probs]


class UNet(nn.Module):
    """ε_θ([z_t ; f_r], t, slots, f_id) of DiffFAE §4.

    forward(x, t, context, id_embed, return_attn=False)
        x (B, in_channels, H, W) with H, W divisible by 2**(levels−1); t (B,) or a scalar;
        context (B, K, context_dim); id_embed (B, id_dim).
        Returns eps (B, out_channels, H, W), or (eps, attn) with return_attn, where attn is a list
        with one (B, heads_l, H_l, W_l, K) tensor per cross-attention layer (down path, middle,
        up path, in execution order); heads_l and H_l, W_l differ between layers.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        temb_dim = TIME_EMBED_MULT * config.base_channels
        self.time_mlp = nn.Sequential(nn.Linear(config.base_channels, temb_dim), nn.SiLU(),
                                      nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1)
        levels = config.level_channels()
        attend = set(config.attention_levels())
        channels = config.base_channels
        skip_channels = [channels]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for level, level_channels in enumerate(levels):
            stages = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                stages.append(UNetStage(channels, level_channels, temb_dim, config,
                                        level in attend))
                channels = level_channels
                skip_channels.append(channels)
            self.down.append(stages)
            if level < len(levels) - 1:
                # LDM's conv_resample: a 3×3 conv of stride 2, (B, C, H, W) → (B, C, H/2, W/2)
                self.downsample.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
                skip_channels.append(channels)
        self.mid_stage = UNetStage(channels, channels, temb_dim, config, attend=True)
        self.mid_res = AdaINResBlock(channels, channels, temb_dim, config.id_dim,
                                     config.norm_groups)
        self.up = nn.ModuleList([nn.ModuleList() for _ in levels])  # indexed by level
        self.upsample = nn.ModuleList(  # level l → l−1: nearest ×2, then a 3×3 conv (LDM)
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                          nn.Conv2d(c, c, 3, padding=1)) for c in levels[1:])
        for level in reversed(range(len(levels))):
            for _ in range(config.num_res_blocks + 1):
                self.up[level].append(UNetStage(channels + skip_channels.pop(), levels[level],
                                                temb_dim, config, level in attend))
                channels = levels[level]
        self.norm_out = nn.GroupNorm(config.norm_groups, channels, eps=UNET_NORM_EPS)
        self.conv_out = zero_init(nn.Conv2d(channels, config.out_channels, 3, padding=1))

    def forward(self, x, t, context, id_embed, return_attn=False):
        config, batch = self.config, x.shape[0]
        factor = 2 ** (len(config.channel_mult) - 1)
        assert x.dim() == 4 and x.shape[1] == config.in_channels, f"x {tuple(x.shape)}"
        assert x.shape[2] % factor == 0 and x.shape[3] % factor == 0, f"x not divisible by {factor}"
        assert context.dim() == 3 and context.shape[::2] == (batch, config.context_dim), \
            f"context {tuple(context.shape)}"
        assert id_embed.shape == (batch, config.id_dim), f"id_embed {tuple(id_embed.shape)}"
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(batch) if t.dim() == 0 else t  # a scalar t: one timestep for the batch
        assert t.shape == (batch,), f"t {tuple(t.shape)}"
        temb = self.time_mlp(timestep_embedding(t.to(x.dtype), config.base_channels))
        attn = []
        h = self.conv_in(x)  # (B, base, H, W)
        skips = [h]
        for level, stages in enumerate(self.down):
            for stage in stages:
                h, maps = stage(h, temb, id_embed, context)
                attn.extend(maps)
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)  # (B, C_l, H_l/2, W_l/2)
                skips.append(h)
        h, maps = self.mid_stage(h, temb, id_embed, context)
        attn.extend(maps)
        h = self.mid_res(h, temb, id_embed)
        for level in reversed(range(len(self.up))):
            for stage in self.up[level]:
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H_l, W_l)
                h, maps = stage(h, temb, id_embed, context)
                attn.extend(maps)
            if level > 0:
                h = self.upsample[level - 1](h)  # (B, C_l, 2·H_l, 2·W_l)
        eps = self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H, W)
        if return_attn:
            return eps, attn
        return eps


def average_cross_attention(attn_list, size):
    """A_cross of DiffFAE Eq. 7: attn_list, the (B, heads_l, H_l, W_l, K) maps of UNet.forward
    with return_attn, averaged over heads, resized bilinearly to size (int or (height, width)) and
    averaged over layers: (B, K, height, width).

    Each map is a softmax over the K tokens, so it sums to 1 over K at every pixel; the means and
    bilinear resizing (every output pixel a convex combination of input pixels with the same
    weights for every token) are convex combinations, so the result still sums to 1 over K.
    """
    assert attn_list, "no cross-attention maps"
    size = (size, size) if isinstance(size, int) else tuple(size)
    resized = []
    for probs in attn_list:  # a loop over layers (a handful), not pixels
        maps = probs.mean(dim=1).permute(0, 3, 1, 2)  # (B, K, H_l, W_l)
        resized.append(F.interpolate(maps, size=size, mode="bilinear", align_corners=False))
    return torch.stack(resized).mean(dim=0)  # (B, K, height, width)


def count_parameters(model):
    """Number of trainable parameters (works on the meta device, no memory needed)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

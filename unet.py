"""The denoiser ε_θ of DiffFAE: a latent-diffusion UNet with AdaIN identity injection and
cross-attention to slot tokens, whose cross-attention probabilities are returned functionally.

Paper: Wang et al., "DiffFAE", ECCV 2024 (arXiv 2403.17664), §4. The noisy latent z_t is
concatenated along channels with f_r (VQ latent of the rendered face I_R); the source's slot
tokens S (face, hair, clothes, background) enter by cross-attention; the identity embedding f_id
enters by AdaIN in every residual block; the cross-attention maps A_cross are supervised by the
query's slot masks M_Q (attention-consistency loss, Eq. 7):

    ε̂ = ε_θ([z_t ; f_r], t, S, f_id)
    temb(t) = MLP([sin(t·ω_0..ω_{h-1}), cos(t·ω_0..ω_{h-1})]),  ω_i = 10000^(−i/h),  h = dim/2
    AdaIN(h, f_id) = GN(h)·(1 + γ(f_id)) + β(f_id),  [γ, β] = W·f_id + b   (GN without affine)
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
(self-attention, cross-attention, feed-forward) to take the slot tokens; LDM's res block has
GroupNorm with affine (or scale-shift from the time embedding), ours has AdaIN from f_id.
Other references: sinusoidal embedding, Vaswani et al. 2017 §3.5 as used by DDPM (Ho et al.
2020, App. B) — frequencies as LDM (ω_i = 10000^(−i/h)), order [sin, cos] as DDPM (the order is
irrelevant because a linear layer follows); AdaIN, Huang & Belongie 2017 Eq. 8, with group
statistics (GroupNorm, Wu & He 2018) in place of per-channel ones as in DiffusionRig's global
latent injection; explicit softmax probabilities because Eq. 7 needs them.

Shapes: B batch, C channels, H/W height/width, N = H·W tokens, K context (slot) tokens,
Dc context dim, Di identity dim, heads attention heads, d channels per head.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MAX_PERIOD = 10000.0  # Vaswani et al. 2017 §3.5; DDPM and LDM timestep embeddings
TIME_EMBED_MULT = 4  # time-MLP width = 4·base_channels (DDPM, LDM)
FF_MULT = 4  # GEGLU inner width = 4·C (LDM FeedForward, Vaswani et al. 2017 d_ff = 4·d_model)
GROUPNORM_EPS = 1e-5  # PyTorch's default; LDM res blocks use it too


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
    dropout: float = 0.0

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        for name in ("in_channels", "out_channels", "base_channels", "num_res_blocks",
                     "head_channels", "context_dim", "id_dim", "norm_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive int, got {value!r}")
        if not self.channel_mult or any(not isinstance(m, int) or m < 1
                                        for m in self.channel_mult):
            raise ValueError(f"UNetConfig.channel_mult must be positive ints, "
                             f"got {self.channel_mult!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")
        factors = [2 ** level for level in range(len(self.channel_mult))]
        for factor in self.attention_resolutions:
            if factor not in factors:
                raise ValueError(f"UNetConfig.attention_resolutions: factor {factor!r} is not "
                                 f"one of the level factors {factors}")
        for channels in (self.base_channels, *self.level_channels()):
            if channels % self.norm_groups:
                raise ValueError(f"UNetConfig: {channels} channels not divisible by "
                                 f"norm_groups={self.norm_groups}")
        attended = [self.level_channels()[level] for level in self.attention_levels()]
        for channels in attended + [self.level_channels()[-1]]:
            if channels % self.head_channels:
                raise ValueError(f"UNetConfig: attention over {channels} channels not "
                                 f"divisible by head_channels={self.head_channels}")

    def level_channels(self):
        """Channels of each resolution level: base_channels·mult."""
        return [self.base_channels * mult for mult in self.channel_mult]

    def attention_levels(self):
        """Indices of the levels whose factor 2**level is in attention_resolutions."""
        return [level for level in range(len(self.channel_mult))
                if 2 ** level in self.attention_resolutions]


def timestep_embedding(t, dim, max_period=MAX_PERIOD):
    """Sinusoidal embedding [sin(t·ω_i), cos(t·ω_i)], ω_i = max_period^(−i/half), i < half.

    Parameters
    ----------
    t : (B,) tensor of timesteps (integer or real); computed in t's dtype if floating, else
        float32.
    dim : embedding size; an odd dim gets one zero column at the end.

    Returns
    -------
    (B, dim) tensor.
    """
    dtype = t.dtype if t.is_floating_point() else torch.float32
    half = dim // 2
    index = torch.arange(half, device=t.device, dtype=dtype)
    omega = torch.exp(-math.log(max_period) * index / half)  # (half,)
    angle = t.to(dtype)[:, None] * omega[None, :]  # (B, half)
    embedding = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)  # (B, 2·half)
    return F.pad(embedding, (0, dim - 2 * half))  # (B, dim)


def zero_init(module):
    """Zero a layer's weight and bias so its branch starts as the identity (LDM zero_module)."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class AdaIN(nn.Module):
    """AdaIN(h, f_id) = GroupNorm_noaffine(h)·(1 + γ) + β with [γ, β] = Linear(f_id).

    The linear layer is zero-initialised, so at the start γ = β = 0 and AdaIN is plain GroupNorm
    without affine; the identity's influence is learned from there (stable start, like LDM's
    zero-initialised residual branches). The "1 +" keeps a zero γ meaning "unit scale".

    Input h (B, C, H, W), f_id (B, Di); output (B, C, H, W).
    """

    def __init__(self, channels, id_dim, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=GROUPNORM_EPS, affine=False)
        self.to_scale_shift = zero_init(nn.Linear(id_dim, 2 * channels))

    def forward(self, h, id_embed):
        gamma, beta = self.to_scale_shift(id_embed).chunk(2, dim=1)  # (B, C) each
        return self.norm(h) * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]


class ResBlock(nn.Module):
    """GN+SiLU+conv, + time projection, AdaIN(f_id)+SiLU+dropout+conv (zero-init), + skip.

    Input x (B, C_in, H, W), temb (B, 4·base), f_id (B, Di); output (B, C_out, H, W).
    """

    def __init__(self, in_channels, out_channels, temb_dim, id_dim, groups, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=GROUPNORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(temb_dim, out_channels)
        self.adain = AdaIN(out_channels, id_dim, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x, temb, id_embed):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]  # (B, C_out, 1, 1) over pixels
        h = self.conv2(self.dropout(F.silu(self.adain(h, id_embed))))
        return self.skip(x) + h


def split_heads(x, heads):
    """(B, N, heads·d) -> (B, heads, N, d)."""
    batch, tokens, _ = x.shape
    return x.view(batch, tokens, heads, -1).transpose(1, 2)  # (B, heads, N, d)


def merge_heads(x):
    """(B, heads, N, d) -> (B, N, heads·d)."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)  # (B, N, heads·d)


class SelfAttention(nn.Module):
    """Multi-head self-attention over pixels; F.scaled_dot_product_attention (scale 1/√d).

    Input (B, N, C); output (B, N, C). q/k/v without bias, output with bias (as LDM).
    """

    def __init__(self, channels, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x):
        q = split_heads(self.to_q(x), self.heads)  # (B, heads, N, d)
        k = split_heads(self.to_k(x), self.heads)  # (B, heads, N, d)
        v = split_heads(self.to_v(x), self.heads)  # (B, heads, N, d)
        return self.to_out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Multi-head attention from pixels to context tokens with explicit probabilities.

    Input x (B, N, C), context (B, K, Dc); returns (out (B, N, C), probs (B, heads, N, K)) where
    probs = softmax(Q·Kᵀ/√d) over the K tokens (the maps of DiffFAE Eq. 7).
    """

    def __init__(self, channels, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_dim, channels, bias=False)
        self.to_v = nn.Linear(context_dim, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x, context):
        q = split_heads(self.to_q(x), self.heads)  # (B, heads, N, d)
        k = split_heads(self.to_k(context), self.heads)  # (B, heads, K, d)
        v = split_heads(self.to_v(context), self.heads)  # (B, heads, K, d)
        # b batch, h head, n pixel, k token, d channel within the head
        logits = torch.einsum("bhnd,bhkd->bhnk", q, k) / math.sqrt(q.shape[-1])  # (B,heads,N,K)
        probs = logits.softmax(dim=-1)  # each pixel's distribution over the K tokens
        out = torch.einsum("bhnk,bhkd->bhnd", probs, v)  # (B, heads, N, d)
        return self.to_out(merge_heads(out)), probs


class GEGLUFeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): W_2·(a ⊙ GELU(g)), [a, g] = W_1·x; inner 4·C (LDM)."""

    def __init__(self, channels, dropout):
        super().__init__()
        inner = FF_MULT * channels
        self.proj_in = nn.Linear(channels, 2 * inner)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x):
        value, gate = self.proj_in(x).chunk(2, dim=-1)  # (B, N, inner) each
        return self.proj_out(self.dropout(value * F.gelu(gate)))


class SpatialTransformer(nn.Module):
    """LDM's SpatialTransformer with one pre-norm block: GN, proj_in, [LN→self-attn, LN→cross-attn,
    LN→GEGLU FF] with residuals, proj_out (zero-init), outer residual.

    Input x (B, C, H, W), context (B, K, Dc); returns (x' (B, C, H, W), probs (B, heads, H, W, K)).
    """

    def __init__(self, channels, heads, context_dim, groups, dropout):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=GROUPNORM_EPS)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.norm_self = nn.LayerNorm(channels)
        self.self_attn = SelfAttention(channels, heads)
        self.norm_cross = nn.LayerNorm(channels)
        self.cross_attn = CrossAttention(channels, context_dim, heads)
        self.norm_ff = nn.LayerNorm(channels)
        self.ff = GEGLUFeedForward(channels, dropout)
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
    """One ResBlock, then a SpatialTransformer if this resolution attends.

    Returns (h, maps): maps is [probs (B, heads, H, W, K)] or [] — threaded up functionally.
    """

    def __init__(self, in_channels, out_channels, temb_dim, config, attend):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, temb_dim, config.id_dim,
                            config.norm_groups, config.dropout)
        self.transformer = None
        if attend:
            self.transformer = SpatialTransformer(out_channels,
                                                  out_channels // config.head_channels,
                                                  config.context_dim, config.norm_groups,
                                                  config.dropout)

    def forward(self, h, temb, id_embed, context):
        h = self.res(h, temb, id_embed)
        if self.transformer is None:
            return h, []
        h, probs = self.transformer(h, context)
        return h, [probs]


class Downsample(nn.Module):
    """3×3 conv with stride 2 (LDM conv_resample): (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest ×2 then 3×3 conv (LDM): (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


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
                self.downsample.append(Downsample(channels))
                skip_channels.append(channels)
        self.mid_stage = UNetStage(channels, channels, temb_dim, config, attend=True)
        self.mid_res = ResBlock(channels, channels, temb_dim, config.id_dim,
                                config.norm_groups, config.dropout)
        self.up = nn.ModuleList([nn.ModuleList() for _ in levels])  # indexed by level
        self.upsample = nn.ModuleList([Upsample(c) for c in levels[1:]])  # level l -> l−1
        for level in reversed(range(len(levels))):
            for _ in range(config.num_res_blocks + 1):
                self.up[level].append(UNetStage(channels + skip_channels.pop(), levels[level],
                                                temb_dim, config, level in attend))
                channels = levels[level]
        self.norm_out = nn.GroupNorm(config.norm_groups, channels, eps=GROUPNORM_EPS)
        self.conv_out = zero_init(nn.Conv2d(channels, config.out_channels, 3, padding=1))

    def _check_inputs(self, x, t, context, id_embed):
        """Raise ValueError on inconsistent inputs; return t as a (B,) tensor."""
        config = self.config
        if x.dim() != 4 or x.shape[1] != config.in_channels:
            raise ValueError(f"UNet: x must be (B, {config.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        batch, _, height, width = x.shape
        multiple = 2 ** (len(config.channel_mult) - 1)
        if height % multiple or width % multiple:
            raise ValueError(f"UNet: spatial size {height}×{width} not divisible by {multiple}")
        if context.dim() != 3 or context.shape[0] != batch or context.shape[1] < 1 \
                or context.shape[2] != config.context_dim:
            raise ValueError(f"UNet: context must be ({batch}, K, {config.context_dim}), "
                             f"got {tuple(context.shape)}")
        if tuple(id_embed.shape) != (batch, config.id_dim):
            raise ValueError(f"UNet: id_embed must be ({batch}, {config.id_dim}), "
                             f"got {tuple(id_embed.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if tuple(t.shape) != (batch,):
            raise ValueError(f"UNet: t must be ({batch},) or a scalar, got {tuple(t.shape)}")
        return t

    def forward(self, x, t, context, id_embed, return_attn=False):
        t = self._check_inputs(x, t, context, id_embed)
        temb = self.time_mlp(timestep_embedding(t.to(x.dtype), self.config.base_channels))
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
    """A_cross of DiffFAE Eq. 7: mean over heads, bilinear resize to size, mean over layers.

    Each input map is a softmax over the K tokens, so it sums to 1 over K at every pixel. The head
    mean, the layer mean and bilinear resizing (every output pixel is a convex combination of input
    pixels with the same weights for every token) are all convex combinations, so the result
    still sums to 1 over K.

    Parameters
    ----------
    attn_list : list of (B, heads_l, H_l, W_l, K) tensors (UNet.forward with return_attn).
    size : int or (height, width) of the output maps.

    Returns
    -------
    (B, K, height, width) tensor.
    """
    if not attn_list:
        raise ValueError("average_cross_attention: attn_list is empty")
    size = (size, size) if isinstance(size, int) else tuple(size)
    batch, tokens = attn_list[0].shape[0], attn_list[0].shape[-1]
    resized = []
    for index, probs in enumerate(attn_list):  # a loop over layers (a handful), not pixels
        if probs.dim() != 5 or probs.shape[0] != batch or probs.shape[-1] != tokens:
            raise ValueError(f"average_cross_attention: layer {index} must be ({batch}, heads, "
                             f"H, W, {tokens}), got {tuple(probs.shape)}")
        maps = probs.mean(dim=1).permute(0, 3, 1, 2)  # (B, K, H_l, W_l)
        resized.append(F.interpolate(maps, size=size, mode="bilinear", align_corners=False))
    return torch.stack(resized).mean(dim=0)  # (B, K, height, width)


def count_parameters(model):
    """Number of trainable parameters (works on the meta device, no memory needed)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

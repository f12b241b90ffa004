"""Building blocks shared by the networks, the config checks, and the one order of regions.

Regions: every pixel of a portrait belongs to one of four regions, and slot k of the region
encoder is the token of region k (DiffFAE §4.2: face, hair, clothes and background tokens).
The synthetic data labels pixels with the same indices, so slot k, region k, mask k and colour k
always mean the same thing.

Blocks of LDM's autoencoder (Rombach et al., CVPR 2022; latent-diffusion's model.py), used by the
VQ-VAE (vqvae.py) and the region encoder φ^E (slots.py):
    ResBlock(x)       = skip(x) + conv(SiLU(GN(conv(SiLU(GN(x))))))      skip: 1×1 conv or identity
    AttentionBlock(x) = x + W_o·concat_heads(softmax(q kᵀ / √d) v),  [q, k, v] = W_qkv·GN(x)
    Encoder           = conv in; per level `num_res_blocks` ResBlocks, a stride-2 conv between
                        levels; middle ResBlock → AttentionBlock → ResBlock; GN, SiLU, conv out
LDM's AttnBlock has one head; φ^E uses eight (DiffFAE Table 4). φ^E builds its U-Net from the
same levels and middle block (slots.RegionEncoder).

Shapes: B batch, C channels, h/w height/width, N = h·w positions, E heads, d = C/E per head.
"""
import torch
import torch.nn.functional as F
from torch import nn

REGION_NAMES = ("face", "hair", "clothes", "background")
FACE, HAIR, CLOTHES, BACKGROUND = range(len(REGION_NAMES))
# One colour per region, used by every picture.
REGION_COLOURS = torch.tensor([[0.95, 0.3, 0.3], [0.95, 0.75, 0.1], [0.1, 0.35, 0.95],
                               [0.2, 0.8, 0.3]])

# GroupNorm eps. LDM's autoencoder uses 1e-6 (its `Normalize`), and so do the VQ-VAE and φ^E
# built from it here. The denoiser (unet.py) keeps PyTorch's default 1e-5, as LDM's UNet res blocks
# do (LDM's transformer blocks use 1e-6). Each network was trained with its value.
NORM_EPS = 1e-6
UNET_NORM_EPS = 1e-5


LAPLACIAN = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])  # the 5-point stencil


def laplacian(images):
    """The 3×3 Laplacian of each channel of (B, C, H, W) images, edges replicated."""
    channels = images.shape[1]
    kernel = LAPLACIAN.to(images).expand(channels, 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=channels)


def require(ok, message):
    """Raise ValueError(message) unless ok: the checks of configs and of inputs."""
    if not ok:
        raise ValueError(message)


def check_network(cfg, *positive, base="base_channels", mult="channel_mult"):
    """Checks shared by the network configs: the named fields and `base`, norm_groups are
    positive ints; `mult` (made a tuple) is non-empty positive ints; norm_groups divides
    every level's width base·mult."""
    name = type(cfg).__name__
    for field in positive + (base, "norm_groups"):
        value = getattr(cfg, field)
        require(isinstance(value, int) and value >= 1,
                f"{name}.{field}={value!r}: expected a positive int")
    multipliers = tuple(getattr(cfg, mult))
    setattr(cfg, mult, multipliers)
    require(multipliers and all(isinstance(m, int) and m >= 1 for m in multipliers),
            f"{name}.{mult}={multipliers!r}: expected positive ints")
    for width in (getattr(cfg, base) * m for m in multipliers):
        require(width % cfg.norm_groups == 0,
                f"{name}.norm_groups={cfg.norm_groups} does not divide the level width {width}")


def zero_init(module):
    """Zero a layer's weight and bias, so that its branch starts as the identity or its output at
    a fixed value (LDM's zero_module)."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """(GroupNorm, SiLU, conv 3×3) twice, plus a skip: (B, C_in, h, w) → (B, C_out, h, w)."""

    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the h·w positions, with a residual: (B, C, h, w) → (B, C, h, w).

    heads=None is LDM's AttnBlock: one head, on (B, N, C) tensors, which PyTorch multiplies as
    plain batched matrices; E heads on (B, E, N, d) go to its fused kernel, which rounds
    differently. The VQ-VAE was trained with the first, φ^E with the second.
    """

    def __init__(self, channels, groups, heads=None):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        per_head = (c,) if self.heads is None else (self.heads, c // self.heads)
        qkv = self.qkv(self.norm(x)).reshape(b, 3, *per_head, h * w)  # (B, 3, [E,] d, N)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # (B, E, N, d) each, or (B, N, C)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √d) v, per head
        out = out.transpose(-1, -2).reshape(b, c, h, w)  # (B, C, h, w)
        return x + self.proj(out)


def mid_block(channels, groups, heads=None):
    """LDM's middle block ResBlock → AttentionBlock → ResBlock."""
    return nn.Sequential(ResBlock(channels, channels, groups),
                         AttentionBlock(channels, groups, heads),
                         ResBlock(channels, channels, groups))


def levels(channels, widths, num_res_blocks, groups, resample):
    """`num_res_blocks` ResBlocks per width, the layers `resample(channels)` between two widths:
    the body of LDM's encoder (resampling halves the side) and decoder (it doubles it)."""
    layers = []
    for level, width in enumerate(widths):
        for _ in range(num_res_blocks):
            layers.append(ResBlock(channels, width, groups))
            channels = width
        if level < len(widths) - 1:
            layers += resample(channels)
    return layers


def downsample(channels):
    """S → S/2: a stride-2 3×3 conv (LDM pads (0, 1, 0, 1) asymmetrically, we pad 1 all round)."""
    return [nn.Conv2d(channels, channels, 3, stride=2, padding=1)]


class Encoder(nn.Module):
    """LDM's encoder: (B, C_in, S, S) → (B, C_out, S/f, S/f), f = 2**(len(channel_mult) − 1).

    cfg gives in_channels, base_channels, channel_mult, num_res_blocks and norm_groups (a
    VQConfig).
    """

    def __init__(self, cfg, out_channels):
        super().__init__()
        widths, groups = [cfg.base_channels * m for m in cfg.channel_mult], cfg.norm_groups

        self.net = nn.Sequential(
            nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1),
            *levels(widths[0], widths, cfg.num_res_blocks, groups, downsample),
            mid_block(widths[-1], groups),
            nn.GroupNorm(groups, widths[-1], eps=NORM_EPS), nn.SiLU(),
            nn.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, x):
        return self.net(x)

"""VQ-VAE for faces: the latent space DiffFAE's diffusion model runs in.

DiffFAE retrains a VQ-VAE on faces because the generic LDM autoencoder gave entangled slots
(Wang et al. 2024, §5.4, Fig. 8). We follow LDM-4 on CelebA-HQ (Rombach et al. 2022): downsampling
factor f = 4, |Z| = 8192 codes, latent 64×64×3 at 256 px; encoder/decoder widths 128·(1, 2, 4),
two residual blocks per level (checked against latent-diffusion's vq-f4 config).

Quantisation (van den Oord et al. 2017, "Neural Discrete Representation Learning", Eq. 1-3):
    k*(n) = argmin_k ||z_n − e_k||²  = argmin_k ( ||z_n||² − 2 z_n·e_k + ||e_k||² )
    z_q   = z + sg[e_{k*} − z]                                     (straight-through estimator)
    L_VQ  = ||sg[z] − e||²  (codebook_loss)  +  β·||z − sg[e]||²  (commitment_loss),  β = 0.25
Both squared norms are averaged over all N·D elements (as the VQ-VAE reference code does), so
dL_VQ/dz = 2β(z − e)/(N·D) and dL_VQ/de = 2(e − z)/(N·D).
Warning: taming-transformers' VectorQuantizer2 with its default `legacy=True` puts β on the codebook
term instead of the commitment term; we follow the paper (tested in tests/test_vqvae.py).
Perplexity = exp(−Σ_k p_k log p_k), p_k the fraction of the batch assigned to code k.
Dead codes (an EMA of p_k fell below a fraction of the uniform share 1/K) are restarted at randomly
chosen encoder outputs of the current batch (random restarts, Dhariwal et al. 2020, Jukebox).

Like LDM's VQModelInterface, `encode` returns the continuous pre-quantisation latent z; the
diffusion model works in that space and `decode` quantises first.

Training losses (Esser et al. 2021, "Taming Transformers", Eq. 4-7): L1 reconstruction (no LPIPS:
it needs pretrained VGG weights, outside our package set), L_VQ, and a hinge PatchGAN (Isola et al.
2017) whose generator term is weighted by λ = ||∇_{G_L} L_rec|| / (||∇_{G_L} L_GAN|| + δ) at the
decoder's last layer G_L (Eq. 7), clamped; δ = 1e-4 and the clamp [0, 1e4] follow taming's code
(the paper writes δ = 1e-6). Hinge losses follow taming's `hinge_d_loss` (factor ½).

Shape letters: B batch, C image channels, H/W image height/width, D latent channels (code dim),
h/w latent height/width, N = B·h·w latent vectors, K codebook size, F feature channels,
T = h·w tokens, P patch-logit map size.
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_EPS = 1e-6  # GroupNorm eps of LDM's autoencoder (`Normalize`)
LEAKY_SLOPE = 0.2  # PatchGAN LeakyReLU slope (Isola et al. 2017, appendix, discriminator)
DISC_KERNEL = 4  # PatchGAN 4×4 convolutions (Isola et al. 2017, appendix, discriminator)
DISC_MAX_MULT = 8  # PatchGAN width stops doubling at 8× (512 channels for base 64)
DISC_INIT_STD = 0.02  # N(0, 0.02) conv init (Isola et al. 2017, training details; DCGAN)
ADAPTIVE_WEIGHT_EPS = 1e-4  # δ of Esser et al. Eq. 7 as in taming's code (paper: 1e-6)
ADAPTIVE_WEIGHT_MAX = 1e4  # clamp of λ in taming's code
HINGE_MARGIN = 1.0  # hinge loss margin (Lim & Ye 2017, "Geometric GAN")


@dataclass
class VQConfig:
    """VQ-VAE + PatchGAN settings; defaults are LDM-4 CelebA-HQ scale (see module docstring)."""

    in_channels: int = 3
    base_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 4)  # len − 1 = number of 2× downsamplings
    num_res_blocks: int = 2
    norm_groups: int = 32
    use_mid_attention: bool = True  # single-head self-attention at the lowest resolution (LDM)
    latent_channels: int = 3
    codebook_size: int = 8192
    beta: float = 0.25  # van den Oord et al. 2017, §3.2
    usage_decay: float = 0.99  # EMA decay of per-code usage (our choice: ~100-step memory)
    dead_code_threshold: float = 0.1  # dead if EMA usage < threshold · (1/K) (our choice)
    restart_every: int = 100  # trainer calls restart_dead_codes every n steps; 0 disables
    disc_channels: int = 64  # Isola et al. 2017 (C64-C128-C256-C512)
    disc_layers: int = 3  # strided layers; 3 gives the 70×70 PatchGAN
    disc_start: int = 30000  # our choice: L1 + VQ warm-up before the GAN is switched on
    disc_weight: float = 0.75  # latent-diffusion vq-f4 config

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        positive = {"in_channels": self.in_channels, "base_channels": self.base_channels,
                    "num_res_blocks": self.num_res_blocks, "norm_groups": self.norm_groups,
                    "latent_channels": self.latent_channels, "disc_channels": self.disc_channels,
                    "disc_layers": self.disc_layers}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"VQConfig.{name} must be >= 1, got {value}")
        if len(self.channel_mult) == 0 or min(self.channel_mult) < 1:
            raise ValueError(f"VQConfig.channel_mult must be non-empty positive ints, "
                             f"got {self.channel_mult}")
        for mult in self.channel_mult:
            if (self.base_channels * mult) % self.norm_groups != 0:
                raise ValueError(f"VQConfig.norm_groups={self.norm_groups} must divide "
                                 f"base_channels·mult={self.base_channels * mult}")
        if self.codebook_size < 2:
            raise ValueError(f"VQConfig.codebook_size must be >= 2, got {self.codebook_size}")
        if self.beta < 0:
            raise ValueError(f"VQConfig.beta must be >= 0, got {self.beta}")
        if not 0.0 <= self.usage_decay < 1.0:
            raise ValueError(f"VQConfig.usage_decay must be in [0, 1), got {self.usage_decay}")
        if not 0.0 <= self.dead_code_threshold <= 1.0:
            raise ValueError(f"VQConfig.dead_code_threshold must be in [0, 1], "
                             f"got {self.dead_code_threshold}")
        for name in ("restart_every", "disc_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"VQConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_weight < 0:
            raise ValueError(f"VQConfig.disc_weight must be >= 0, got {self.disc_weight}")

    @property
    def downsample_factor(self) -> int:
        """f: image size / latent size."""
        return 2 ** (len(self.channel_mult) - 1)

    def disc_active(self, step: int) -> bool:
        """Whether the GAN terms are on at training step `step` (0-based)."""
        return step >= self.disc_start


# ----------------------------------------------------------------------------------------------
# Encoder / decoder
# ----------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3, twice, plus a skip (1×1 conv when channels change)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head spatial self-attention with a residual connection (as in LDM's AttnBlock)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, h, w = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3F, h, w)
        qkv = qkv.reshape(b, 3, f, h * w).transpose(-1, -2)  # (B, 3, T, F)
        q, k, v = qkv.unbind(dim=1)  # 3 × (B, T, F)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, T, F), softmax(qkᵀ/√F) v
        out = out.transpose(-1, -2).reshape(b, f, h, w)  # (B, F, h, w)
        return x + self.proj(out)


def _mid_block(channels: int, cfg: VQConfig) -> nn.Sequential:
    attention = SelfAttention(channels, cfg.norm_groups) if cfg.use_mid_attention else nn.Identity()
    return nn.Sequential(ResBlock(channels, channels, cfg.norm_groups), attention,
                         ResBlock(channels, channels, cfg.norm_groups))


class Encoder(nn.Module):
    """x (B, C, H, W) → z (B, D, H/f, W/f); strided 3×3 convs downsample."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        layers = [nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)]
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, width, cfg.norm_groups))
                ch = width
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # H → H/2 (H even)
        layers += [_mid_block(ch, cfg), nn.GroupNorm(cfg.norm_groups, ch, eps=NORM_EPS), nn.SiLU(),
                   nn.Conv2d(ch, cfg.latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """z_q (B, D, h, w) → x̂ (B, C, h·f, w·f); mirrors the encoder with nearest-upsample + conv."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult][::-1]
        ch = widths[0]
        layers = [nn.Conv2d(cfg.latent_channels, ch, 3, padding=1), _mid_block(ch, cfg)]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, width, cfg.norm_groups))
                ch = width
            if level < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(ch, ch, 3, padding=1)]
        layers += [nn.GroupNorm(cfg.norm_groups, ch, eps=NORM_EPS), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.net(z_q))


# ----------------------------------------------------------------------------------------------
# Vector quantiser
# ----------------------------------------------------------------------------------------------

def _flatten_latent(z: torch.Tensor, dim: int) -> torch.Tensor:
    if z.dim() != 4 or z.shape[1] != dim:
        raise ValueError(f"latent z must have shape (B, {dim}, h, w), got {tuple(z.shape)}")
    return z.permute(0, 2, 3, 1).reshape(-1, dim)  # (N, D)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook with straight-through gradients and dead-code restarts.

    Parameters
    ----------
    codebook_size : int
        K, number of codes.
    dim : int
        D, code dimension (= latent channels).
    beta : float
        Commitment weight β (on the encoder-side term, van den Oord et al. 2017 Eq. 3).
    usage_decay, dead_code_threshold : float
        EMA decay of per-code usage; a code is dead when its EMA share < threshold / K.
    """

    def __init__(self, codebook_size: int, dim: int, beta: float,
                 usage_decay: float = VQConfig.usage_decay,
                 dead_code_threshold: float = VQConfig.dead_code_threshold):
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.usage_decay = usage_decay
        self.dead_code_threshold = dead_code_threshold
        # U(−1/K, 1/K) init as in the VQ-VAE reference implementations; restarts fix collapse.
        bound = 1.0 / codebook_size
        self.codebook = nn.Parameter(torch.empty(codebook_size, dim).uniform_(-bound, bound))
        self.register_buffer("code_usage", torch.full((codebook_size,), bound))  # (K,)

    def nearest_codes(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Indices (N,) of the nearest codes to z_flat (N, D) in squared L2."""
        e = self.codebook
        # ||z||² − 2 z·e + ||e||², all pairs at once; ||z||² does not change the argmin but is
        # kept so `distances` are true squared distances.
        distances = (z_flat.pow(2).sum(1, keepdim=True)  # (N, 1)
                     - 2.0 * z_flat @ e.t()  # (N, K)
                     + e.pow(2).sum(1)[None, :])  # (1, K)
        return distances.argmin(dim=1)  # (N,)

    def forward(self, z: torch.Tensor):
        """Quantise z (B, D, h, w).

        Returns
        -------
        z_q : (B, D, h, w), straight-through quantised latent (forward value = codes).
        info : dict with codebook_loss, commitment_loss (β included), perplexity (scalars) and
            indices (B, h, w) long.
        """
        z_flat = _flatten_latent(z, self.dim)  # (N, D)
        b, _, h, w = z.shape
        indices = self.nearest_codes(z_flat.detach())  # (N,)
        e = self.codebook[indices]  # (N, D)
        codebook_loss = F.mse_loss(e, z_flat.detach())  # ||sg[z] − e||², moves codes
        commitment_loss = self.beta * F.mse_loss(z_flat, e.detach())  # β||z − sg[e]||², encoder
        z_q_flat = z_flat + (e - z_flat).detach()  # (N, D), straight-through: dz_q/dz = I
        z_q = z_q_flat.reshape(b, h, w, self.dim).permute(0, 3, 1, 2)  # (B, D, h, w)
        counts = torch.bincount(indices, minlength=self.codebook_size)  # (K,)
        usage = counts.to(z.dtype) / indices.numel()  # (K,), p_k
        perplexity = torch.exp(-torch.special.xlogy(usage, usage).sum())
        if self.training:
            with torch.no_grad():
                self.code_usage.lerp_(usage.to(self.code_usage.dtype), 1.0 - self.usage_decay)
        info = {"codebook_loss": codebook_loss, "commitment_loss": commitment_loss,
                "perplexity": perplexity, "indices": indices.reshape(b, h, w)}  # (B, h, w)
        return z_q, info

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor,
                           generator: Optional[torch.Generator] = None) -> int:
        """Re-initialise dead codes to random encoder outputs of this batch; return how many.

        Parameters
        ----------
        z : (B, D, h, w) or (N, D)
            Encoder outputs (pre-quantisation) of the current batch.
        generator : torch.Generator, optional
            Source of randomness; the result is a deterministic function of (codebook, usage, z,
            generator state). Under DDP every rank must end with the same codebook: either run
            this on rank 0 and broadcast `codebook` and `code_usage`, or give every rank the same
            gathered z and a generator with a shared seed. `generator=None` uses the global RNG.
            (DDP's default broadcast_buffers also copies rank 0's `code_usage` at each forward.)
        """
        z_flat = z if z.dim() == 2 else _flatten_latent(z, self.dim)  # (N, D)
        if z_flat.shape[1] != self.dim or z_flat.shape[0] == 0:
            raise ValueError(f"z must have shape (N, {self.dim}) with N > 0, got {tuple(z.shape)}")
        dead = self.code_usage < self.dead_code_threshold / self.codebook_size  # (K,)
        num_dead = int(dead.sum())
        if num_dead == 0:
            return 0
        n = z_flat.shape[0]
        rng_device = generator.device if generator is not None else torch.device("cpu")
        if n >= num_dead:
            rows = torch.randperm(n, generator=generator, device=rng_device)[:num_dead]
        else:
            rows = torch.randint(n, (num_dead,), generator=generator, device=rng_device)
        self.codebook[dead] = z_flat[rows.to(z_flat.device)].to(self.codebook.dtype)
        self.code_usage[dead] = 1.0 / self.codebook_size  # a fresh code gets the uniform share
        return num_dead


# ----------------------------------------------------------------------------------------------
# The autoencoder
# ----------------------------------------------------------------------------------------------

class VQVAE(nn.Module):
    """Encoder → VectorQuantizer → Decoder.

    `encode(x)` gives the continuous latent z (B, D, H/f, W/f) the diffusion model works in;
    `decode(z)` quantises (unless quantize=False) and decodes to x̂ (B, C, H, W) in about [−1, 1].
    """

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.latent_channels, cfg.beta,
                                         cfg.usage_decay, cfg.dead_code_threshold)
        self.decoder = Decoder(cfg)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the decoder's last conv, G_L in Esser et al. 2021 Eq. 7."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [−1, 1] → z (B, D, H/f, W/f), pre-quantisation."""
        f = self.cfg.downsample_factor
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"x must have shape (B, {self.cfg.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        if x.shape[2] % f != 0 or x.shape[3] % f != 0:
            raise ValueError(f"image size {tuple(x.shape[2:])} must be divisible by the "
                             f"downsample factor {f}")
        return self.encoder(x)

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """z (B, D, h, w) → x̂ (B, C, h·f, w·f); quantises z first unless quantize=False."""
        if z.dim() != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"z must have shape (B, {self.cfg.latent_channels}, h, w), "
                             f"got {tuple(z.shape)}")
        z_q = self.quantizer(z)[0] if quantize else z
        return self.decoder(z_q)

    def forward(self, x: torch.Tensor):
        """Reconstruct x (B, C, H, W); info = quantizer info plus `z` (B, D, h, w) for restarts."""
        z = self.encode(x)
        z_q, info = self.quantizer(z)
        info["z"] = z
        return self.decoder(z_q), info


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): image (B, C, H, W) → patch logits (B, 1, P, P').

    `num_layers` stride-2 4×4 convs (width doubling, capped at 8×), one stride-1 conv, and a
    stride-1 conv to one logit per patch. GroupNorm replaces pix2pix's BatchNorm so that the
    discriminator does not depend on the batch split across DDP ranks (our choice).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3,
                 norm_groups: int = 32):
        super().__init__()
        self.min_size = 3 * 2 ** num_layers  # each stride-2 conv halves, the last two take −1
        widths = [channels * min(2 ** i, DISC_MAX_MULT) for i in range(num_layers + 1)]
        layers = [nn.Conv2d(in_channels, widths[0], DISC_KERNEL, stride=2, padding=1),
                  nn.LeakyReLU(LEAKY_SLOPE)]
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(widths[i - 1], widths[i], DISC_KERNEL, stride, padding=1),
                       nn.GroupNorm(math.gcd(norm_groups, widths[i]), widths[i]),
                       nn.LeakyReLU(LEAKY_SLOPE)]
        layers.append(nn.Conv2d(widths[-1], 1, DISC_KERNEL, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, DISC_INIT_STD)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or min(x.shape[2:]) < self.min_size:
            raise ValueError(f"discriminator input must be (B, C, H, W) with H, W >= "
                             f"{self.min_size}, got {tuple(x.shape)}")
        return self.net(x)


def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean absolute error |x̂ − x| over all elements."""
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat {tuple(x_hat.shape)} and x {tuple(x.shape)} differ in shape")
    return (x_hat - x).abs().mean()


def discriminator_hinge_loss(real_logits: torch.Tensor,
                             fake_logits: torch.Tensor) -> torch.Tensor:
    """½·(mean relu(1 − D(x)) + mean relu(1 + D(x̂))) over patch logits."""
    loss_real = F.relu(HINGE_MARGIN - real_logits).mean()
    loss_fake = F.relu(HINGE_MARGIN + fake_logits).mean()
    return 0.5 * (loss_real + loss_fake)


def generator_hinge_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """−mean D(x̂) (the generator side of the hinge GAN)."""
    return -fake_logits.mean()


def adaptive_disc_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor,
                         last_layer: torch.Tensor) -> torch.Tensor:
    """λ = ||∇_{G_L} L_rec|| / (||∇_{G_L} L_GAN|| + δ), clamped, detached (Esser et al. Eq. 7).

    Both losses must still hold their graphs through `last_layer` (the graphs are retained).
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + ADAPTIVE_WEIGHT_EPS)
    return weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()


def vq_loss(x_hat: torch.Tensor, x: torch.Tensor, info: dict,
            fake_logits: Optional[torch.Tensor] = None,
            last_layer: Optional[torch.Tensor] = None, disc_weight: float = 1.0) -> dict:
    """Autoencoder-side training loss.

    total = L1 + codebook_loss + commitment_loss [+ disc_weight · λ · generator_loss]
    The GAN term is added when `fake_logits` = D(x̂) is given (the trainer does so once
    `cfg.disc_active(step)`); then `last_layer` (VQVAE.last_layer) is required for λ.
    Returns a dict of the named scalar terms and `total`.
    """
    terms = {"reconstruction_loss": reconstruction_loss(x_hat, x),
             "codebook_loss": info["codebook_loss"],
             "commitment_loss": info["commitment_loss"]}
    total = terms["reconstruction_loss"] + terms["codebook_loss"] + terms["commitment_loss"]
    if fake_logits is not None:
        if last_layer is None:
            raise ValueError("vq_loss: last_layer is required when fake_logits is given")
        g_loss = generator_hinge_loss(fake_logits)
        weight = disc_weight * adaptive_disc_weight(terms["reconstruction_loss"], g_loss,
                                                    last_layer)
        terms["generator_loss"] = g_loss
        terms["disc_adaptive_weight"] = weight
        total = total + weight * g_loss
    terms["total"] = total
    return terms

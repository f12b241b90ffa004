"""VQ-VAE for faces: the latent space DiffFAE's diffusion model runs in.

DiffFAE retrains a VQ-VAE on faces because the generic LDM autoencoder gave entangled slots
(Wang et al. 2024, §5.4, Fig. 8). We follow LDM-4 on CelebA-HQ (Rombach et al. 2022): downsampling
factor f = 4, |Z| = 8192 codes, latent 64×64×3 at 256 px; encoder/decoder widths 128·(1, 2, 4),
two residual blocks per level (checked against latent-diffusion's vq-f4 config); the encoder and
the blocks are layers.py's, the decoder mirrors the encoder.

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

Training losses: L1 reconstruction and L_VQ. Not LDM's full autoencoder loss (Esser et al.
2021, "Taming Transformers", Eq. 4-7), which adds LPIPS (it needs pretrained VGG weights, outside
our package set) and a PatchGAN term: the GAN, switched on at step 500 of the tiny preset, cost
4.5 dB of PSNR (docs/ablations.md), and no trained model here ever used it, so it is not built.
In place of LPIPS, which makes LDM's autoencoders keep fine structure, an optional detail term
(our choice, `detail_weight` w) adds the L1 error of the images' Laplacians (layers.laplacian):
    L_rec = mean |x̂ − x| + w · mean |L∗x̂ − L∗x|
At 64 px an eye is a few pixels across: plain L1 is satisfied by a blur of it, and the Laplacian
term is not (its effect is measured in docs/ablations.md). An optional face weight (our choice,
`face_weight` a; synthetic data, whose face masks are exact) makes both means weighted ones,
Σ_p ω_p·e_p / Σ_p ω_p with ω = 1 + a on the face's pixels and 1 elsewhere, so that the face,
a fifth of the image, counts for more of the autoencoder's capacity.

Shape letters: B batch, C image channels, H/W image height/width, D latent channels (code dim),
h/w latent height/width, N = B·h·w latent vectors, K codebook size.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import NORM_EPS, Encoder, check_network, laplacian, levels, mid_block, require

@dataclass
class VQConfig:
    """VQ-VAE settings; defaults are LDM-4 CelebA-HQ scale (see module docstring)."""

    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple = (1, 2, 4)  # len − 1 = number of 2× downsamplings
    num_res_blocks: int = 2
    norm_groups: int = 32
    latent_channels: int = 3
    codebook_size: int = 8192
    beta: float = 0.25  # van den Oord et al. 2017, §3.2
    usage_decay: float = 0.99  # EMA decay of per-code usage (our choice: ~100-step memory)
    dead_code_threshold: float = 0.1  # dead if EMA usage < threshold · (1/K) (our choice)
    restart_every: int = 100  # trainer calls restart_dead_codes every n steps; 0 disables
    detail_weight: float = 0.0  # weight of the Laplacian L1 term of L_rec (our choice; 0: none)
    face_weight: float = 0.0  # extra weight of the face's pixels in L_rec (our choice; 0: none)

    def __post_init__(self):
        check_network(self, "in_channels", "num_res_blocks", "latent_channels")
        require(self.codebook_size >= 2, f"VQConfig.codebook_size={self.codebook_size}: need >= 2")
        for name in ("beta", "restart_every", "detail_weight", "face_weight"):
            require(getattr(self, name) >= 0, f"VQConfig.{name}={getattr(self, name)}: need >= 0")
        require(0 <= self.usage_decay < 1,
                f"VQConfig.usage_decay={self.usage_decay}: need 0 <= usage_decay < 1")
        require(0 <= self.dead_code_threshold <= 1,
                f"VQConfig.dead_code_threshold={self.dead_code_threshold}: need a value in [0, 1]")

    @property
    def downsample_factor(self):
        """f: image size / latent size."""
        return 2 ** (len(self.channel_mult) - 1)



class Decoder(nn.Module):
    """z_q (B, D, h, w) → x̂ (B, C, h·f, w·f); mirrors the encoder with nearest-upsample + conv."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult][::-1]
        groups = cfg.norm_groups

        def up(c):  # h → 2h
            return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]

        self.net = nn.Sequential(
            nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1),
            mid_block(widths[0], groups),
            *levels(widths[0], widths, cfg.num_res_blocks, groups, up),
            nn.GroupNorm(groups, widths[-1], eps=NORM_EPS), nn.SiLU())
        self.conv_out = nn.Conv2d(widths[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z_q):
        return self.conv_out(self.net(z_q))


def _flatten_latent(z):
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B, D, h, w) → (N, D)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook with straight-through gradients and dead-code restarts.

    K = codebook_size codes of size D = dim (the latent channels); beta = β weighs the commitment
    (encoder-side) term, van den Oord et al. 2017 Eq. 3. A code is dead when its share of the
    batches, an EMA with decay usage_decay, falls below dead_code_threshold / K.
    """

    def __init__(self, codebook_size, dim, beta, usage_decay=VQConfig.usage_decay,
                 dead_code_threshold=VQConfig.dead_code_threshold):
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

    def nearest_codes(self, z_flat):
        """Indices (N,) of the nearest codes to z_flat (N, D) in squared L2."""
        e = self.codebook
        # ||z||² − 2 z·e + ||e||², all pairs at once; ||z||² does not change the argmin but is
        # kept so `distances` are true squared distances. In the codebook's precision even under
        # bf16 autocast: with 8 mantissa bits ||z||² swamps z·e and the argmin is noise.
        with torch.autocast(z_flat.device.type, enabled=False):
            z_flat = z_flat.to(e.dtype)
            distances = (z_flat.pow(2).sum(1, keepdim=True)  # (N, 1)
                         - 2.0 * z_flat @ e.t()  # (N, K)
                         + e.pow(2).sum(1)[None, :])  # (1, K)
        return distances.argmin(dim=1)  # (N,)

    def forward(self, z):
        """z (B, D, h, w) → z_q (B, D, h, w), the codes with straight-through gradients, and info:
        codebook_loss, commitment_loss (β included), perplexity (scalars), indices (B, h, w)."""
        assert z.dim() == 4 and z.shape[1] == self.dim, f"latent {tuple(z.shape)}"
        z_flat = _flatten_latent(z)  # (N, D)
        b, _, h, w = z.shape
        indices = self.nearest_codes(z_flat.detach())  # (N,)
        e = self.codebook[indices]  # (N, D)
        codebook_loss = F.mse_loss(e, z_flat.detach())  # ||sg[z] − e||², moves codes
        commitment_loss = self.beta * F.mse_loss(z_flat, e.detach())  # β||z − sg[e]||², encoder
        z_q_flat = z_flat + (e - z_flat).detach()  # (N, D), straight-through: dz_q/dz = I
        z_q = z_q_flat.reshape(b, h, w, self.dim).permute(0, 3, 1, 2)  # (B, D, h, w)
        counts = torch.bincount(indices, minlength=self.codebook_size)  # (K,)
        usage = counts.to(self.code_usage.dtype) / indices.numel()  # (K,), p_k, not in bf16
        perplexity = torch.exp(-torch.special.xlogy(usage, usage).sum())
        if self.training:
            with torch.no_grad():
                self.code_usage.lerp_(usage.to(self.code_usage.dtype), 1.0 - self.usage_decay)
        info = {"codebook_loss": codebook_loss, "commitment_loss": commitment_loss,
                "perplexity": perplexity, "indices": indices.reshape(b, h, w)}  # (B, h, w)
        return z_q, info

    @torch.no_grad()
    def restart_dead_codes(self, z, generator=None):
        """Re-initialise dead codes to random rows of z, the encoder outputs (B, D, h, w) or (N, D)
        of this batch; return how many. The rows are drawn from `generator` (None: the global
        RNG). Under DDP every rank must end with the same codebook: run this on rank 0 and
        broadcast `codebook` and `code_usage`, or give every rank the same z and generator seed.
        """
        z_flat = z if z.dim() == 2 else _flatten_latent(z)  # (N, D)
        assert z_flat.shape[1] == self.dim and len(z_flat) > 0, f"latent {tuple(z.shape)}"
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


class VQVAE(nn.Module):
    """Encoder → VectorQuantizer → Decoder; x̂ is in about [−1, 1]."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, cfg.latent_channels)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.latent_channels, cfg.beta,
                                         cfg.usage_decay, cfg.dead_code_threshold)
        self.decoder = Decoder(cfg)

    def encode(self, x):
        """x (B, C, H, W) in [−1, 1] → z (B, D, H/f, W/f), pre-quantisation."""
        f = self.cfg.downsample_factor
        assert x.dim() == 4 and x.shape[1] == self.cfg.in_channels, f"image {tuple(x.shape)}"
        assert x.shape[2] % f == 0 and x.shape[3] % f == 0, f"image side not divisible by {f}"
        return self.encoder(x)

    def decode(self, z, quantize=True):
        """z (B, D, h, w) → x̂ (B, C, h·f, w·f); quantises z first unless quantize=False."""
        z_q = self.quantizer(z)[0] if quantize else z
        return self.decoder(z_q)

    def forward(self, x):
        """Reconstruct x (B, C, H, W); info = quantizer info plus `z` (B, D, h, w) for restarts."""
        z = self.encode(x)
        z_q, info = self.quantizer(z)
        info["z"] = z
        return self.decoder(z_q), info


def weighted_mean(error, weight=None):
    """Σ ω·e / Σ ω over all elements of `error` (B, C, H, W), with pixel weights ω (B, 1, H, W)
    shared by the channels; the plain mean without them."""
    if weight is None:
        return error.mean()
    weight = weight.to(error.dtype).expand_as(error)
    return (weight * error).sum() / weight.sum()


def reconstruction_loss(x_hat, x, weight=None):
    """Mean absolute error |x̂ − x| over all elements (weighted by pixel: weighted_mean)."""
    assert x_hat.shape == x.shape, f"{tuple(x_hat.shape)} vs {tuple(x.shape)}"
    return weighted_mean((x_hat - x).abs(), weight)


def detail_loss(x_hat, x, weight=None):
    """Mean absolute error |L∗x̂ − L∗x| of the images' Laplacians over all elements (weighted by
    pixel: weighted_mean)."""
    assert x_hat.shape == x.shape, f"{tuple(x_hat.shape)} vs {tuple(x.shape)}"
    return weighted_mean((laplacian(x_hat) - laplacian(x)).abs(), weight)


def vq_loss(x_hat, x, info, detail_weight=0.0, pixel_weight=None):
    """The autoencoder's training loss: L_rec + codebook_loss + commitment_loss, with L_rec = L1
    [+ detail_weight · detail_loss], both weighted by `pixel_weight` (B, 1, H, W) when given.
    Returns a dict of the named scalar terms and `total`."""
    terms = {"reconstruction_loss": reconstruction_loss(x_hat, x, pixel_weight),
             "codebook_loss": info["codebook_loss"],
             "commitment_loss": info["commitment_loss"]}
    rec = terms["reconstruction_loss"]
    if detail_weight:
        terms["detail_loss"] = detail_loss(x_hat, x, pixel_weight)
        rec = rec + detail_weight * terms["detail_loss"]
    terms["total"] = rec + terms["codebook_loss"] + terms["commitment_loss"]
    return terms

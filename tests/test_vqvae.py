"""Tests for vqvae.py: shapes, nearest-code search, straight-through and VQ-loss gradients against
hand-derived formulas, perplexity, dead-code restarts, the reconstruction, detail and face-weighted
terms against hand-computed cases, config checks and input asserts."""
import math

import pytest
import torch

from layers import laplacian
from vqvae import (VectorQuantizer, VQConfig, VQVAE, detail_loss, reconstruction_loss,
                   vq_loss)


def small_config(**overrides) -> VQConfig:
    fields = dict(base_channels=8, norm_groups=4, num_res_blocks=1, codebook_size=16)
    fields.update(overrides)
    return VQConfig(**fields)


def quantizer_with_codes(codes: torch.Tensor, beta: float = 0.25, **kwargs) -> VectorQuantizer:
    vq = VectorQuantizer(codes.shape[0], codes.shape[1], beta, **kwargs).to(codes.dtype)
    with torch.no_grad():
        vq.codebook.copy_(codes)
    return vq


def as_latent(z_flat: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    return z_flat.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (N, D) -> (B, D, h, w)


def test_default_config_is_ldm4_and_validates():
    cfg = VQConfig()
    assert cfg.downsample_factor == 4
    assert (cfg.codebook_size, cfg.latent_channels, cfg.beta) == (8192, 3, 0.25)
    assert VQConfig(channel_mult=[1, 2, 2, 4]).downsample_factor == 8
    with pytest.raises(ValueError, match="norm_groups"):
        VQConfig(base_channels=20)
    with pytest.raises(ValueError, match="usage_decay"):
        VQConfig(usage_decay=1.0)
    with pytest.raises(ValueError, match="channel_mult"):
        VQConfig(channel_mult=())
    with pytest.raises(ValueError, match="codebook_size=1"):
        VQConfig(codebook_size=1)
    with pytest.raises(ValueError, match="detail_weight=-1"):
        VQConfig(detail_weight=-1.0)


@pytest.mark.parametrize("size", [64, 256])
def test_shapes_factor_four(size):
    torch.manual_seed(0)
    cfg = small_config(base_channels=4, norm_groups=2)
    model = VQVAE(cfg)
    x = torch.rand(1, 3, size, size) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        x_hat, info = model(x)
        x_dec = model.decode(z)
    assert z.shape == (1, 3, size // 4, size // 4)
    assert x_hat.shape == x.shape and x_dec.shape == x.shape
    assert info["indices"].shape == (1, size // 4, size // 4)
    assert info["indices"].dtype == torch.long
    assert torch.equal(info["z"], z)
    # decode(encode(x)) is forward(x) (eval mode: no dropout, no state change)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.decode(model.encode(x)), model(x)[0])


def test_nearest_code_matches_cdist_argmin():
    torch.manual_seed(1)
    codes = torch.randn(37, 5, dtype=torch.float64)
    vq = quantizer_with_codes(codes)
    z_flat = torch.randn(200, 5, dtype=torch.float64) * 1.5
    expected = torch.cdist(z_flat, codes).argmin(dim=1)
    assert torch.equal(vq.nearest_codes(z_flat), expected)
    z_q, info = vq(as_latent(z_flat, 2, 10, 10))
    assert torch.equal(info["indices"].reshape(-1), expected)
    assert torch.allclose(as_latent(codes[expected], 2, 10, 10), z_q)


def test_straight_through_gradient_is_identity():
    torch.manual_seed(2)
    vq = quantizer_with_codes(torch.randn(8, 3, dtype=torch.float64))
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    z_q, _ = vq(z)
    (grad,) = torch.autograd.grad((w * z_q).sum(), z)
    assert torch.allclose(grad, w)


def test_beta_is_on_commitment_term():
    # 2 codes in 2-D; 4 latent vectors placed by hand near them: assignment [0, 0, 1, 1].
    codes = torch.tensor([[0.0, 0.0], [4.0, 4.0]], dtype=torch.float64)
    z_flat = torch.tensor([[0.5, -0.2], [0.1, 0.3], [3.0, 4.5], [4.2, 3.9]], dtype=torch.float64)
    assigned = torch.tensor([0, 0, 1, 1])
    beta = 0.25
    vq = quantizer_with_codes(codes, beta=beta)
    z = as_latent(z_flat, 1, 2, 2).clone().requires_grad_(True)  # (1, 2, 2, 2)
    _, info = vq(z)
    assert torch.equal(info["indices"].reshape(-1), assigned)
    n_elements = z_flat.numel()  # N·D: both terms are means over all elements
    e = codes[assigned]  # (N, D)
    sq = (z_flat - e).pow(2).sum()
    assert torch.isclose(info["codebook_loss"], sq / n_elements)
    assert torch.isclose(info["commitment_loss"], beta * sq / n_elements)
    (info["codebook_loss"] + info["commitment_loss"]).backward()
    grad_z_expected = 2 * beta * (z_flat - e) / n_elements  # (N, D)
    assert torch.allclose(z.grad, as_latent(grad_z_expected, 1, 2, 2))
    grad_e_expected = torch.stack([
        (2 * (codes[k] - z_flat[assigned == k]) / n_elements).sum(0) for k in range(2)])
    assert torch.allclose(vq.codebook.grad, grad_e_expected)
    # the legacy taming placement would give the encoder 2(z−e)/(N·D): clearly different
    assert not torch.allclose(z.grad, as_latent(2 * (z_flat - e) / n_elements, 1, 2, 2))


def test_perplexity_uniform_and_single_code():
    k = 4
    codes = torch.eye(k, dtype=torch.float64) * 3.0  # well-separated codes
    vq = quantizer_with_codes(codes)
    uniform = codes[torch.arange(8) % k]  # every code used twice
    _, info = vq(as_latent(uniform, 2, 2, 2))
    assert math.isclose(info["perplexity"].item(), k, rel_tol=1e-12)
    single = codes[torch.zeros(8, dtype=torch.long)]
    _, info = vq(as_latent(single, 2, 2, 2))
    assert math.isclose(info["perplexity"].item(), 1.0, rel_tol=1e-12)
    mixed = codes[torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])]  # p = (3/4, 1/4)
    _, info = vq(as_latent(mixed, 2, 2, 2))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert math.isclose(info["perplexity"].item(), math.exp(entropy), rel_tol=1e-12)


def test_usage_ema_updates_only_in_training():
    k = 4
    vq = quantizer_with_codes(torch.eye(k, dtype=torch.float64), usage_decay=0.5)
    z = as_latent(torch.eye(k, dtype=torch.float64)[[0, 0, 0, 1]], 1, 2, 2)
    vq.eval()
    vq(z)
    assert torch.allclose(vq.code_usage, torch.full((k,), 1 / k, dtype=torch.float64))
    vq.train()
    vq(z)
    share = torch.tensor([0.75, 0.25, 0.0, 0.0], dtype=torch.float64)
    assert torch.allclose(vq.code_usage, 0.5 * (1 / k) + 0.5 * share)


def test_dead_code_restart_replaces_exactly_unused_codes():
    torch.manual_seed(3)
    k, d = 8, 3
    codes = torch.randn(k, d, dtype=torch.float64) * 5
    vq = quantizer_with_codes(codes, usage_decay=0.0)  # usage = this batch's share
    vq.train()
    used = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    vq(as_latent(codes[used], 2, 2, 2))  # codes 4..7 unused -> dead
    before = vq.codebook.detach().clone()
    z_new = torch.randn(2, d, 3, 3, dtype=torch.float64)
    rows = z_new.permute(0, 2, 3, 1).reshape(-1, d)  # (N, D)
    restarted = vq.restart_dead_codes(z_new, generator=torch.Generator().manual_seed(7))
    assert restarted == 4
    after = vq.codebook.detach()
    assert torch.equal(after[:4], before[:4])
    for code in after[4:]:
        assert (rows == code).all(dim=1).any()
    assert len({tuple(c.tolist()) for c in after[4:]}) == 4  # distinct rows (no replacement)
    assert torch.allclose(vq.code_usage[4:], torch.full((4,), 1 / k, dtype=torch.float64))
    assert vq.restart_dead_codes(z_new) == 0  # restarted codes are alive again
    # deterministic given the generator
    vq2 = quantizer_with_codes(codes, usage_decay=0.0)
    vq2(as_latent(codes[used], 2, 2, 2))
    vq2.restart_dead_codes(z_new, generator=torch.Generator().manual_seed(7))
    assert torch.equal(vq2.codebook.detach(), after)


def test_detail_loss_of_one_changed_pixel():
    # x̂ = x + c at one interior pixel of one channel: the Laplacian of the difference is −4c there
    # and c at its four neighbours, so the mean |L∗x̂ − L∗x| is 8c over the C·H·W elements
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    x_hat = x.clone()
    x_hat[0, 1, 4, 3] += 0.3
    assert torch.isclose(detail_loss(x_hat, x), torch.tensor(8 * 0.3 / (3 * 64), dtype=x.dtype))
    assert detail_loss(x + 0.7, x) < 1e-12  # a constant shift has no detail


def test_laplacian_of_one_bright_pixel_is_the_stencil_with_replicated_edges():
    # L∗δ for a unit pixel is the 5-point stencil around it: −4 at the pixel, +1 at its four
    # neighbours. At an edge the replicated border copies the pixel itself into the missing
    # neighbours, each adding +1 to its own −4: −3 on a side, −2 in a corner.
    image = torch.zeros(1, 2, 5, 6, dtype=torch.float64)
    image[0, 0, 2, 3] = 1  # interior, channel 0
    image[0, 1, 0, 0] = 1  # corner, channel 1
    image[0, 1, 4, 3] = 1  # bottom side, channel 1
    expected = torch.zeros_like(image)
    expected[0, 0, 2, 3] = -4
    expected[0, 0, 1, 3] = expected[0, 0, 3, 3] = expected[0, 0, 2, 2] = expected[0, 0, 2, 4] = 1
    expected[0, 1, 0, 0] = -2
    expected[0, 1, 0, 1] = expected[0, 1, 1, 0] = 1
    expected[0, 1, 4, 3] = -3
    expected[0, 1, 3, 3] = expected[0, 1, 4, 2] = expected[0, 1, 4, 4] = 1
    torch.testing.assert_close(laplacian(image), expected, rtol=0, atol=1e-12)
    # a corner change c of x̂ is then seen as |−2c| + c + c = 4c (zero padding would give 6c)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    x_hat = x.clone()
    x_hat[0, 2, 0, 0] += 0.3
    assert torch.isclose(detail_loss(x_hat, x), torch.tensor(4 * 0.3 / (3 * 64), dtype=x.dtype))


def test_vq_loss_adds_the_detail_term_by_its_weight():
    # x̂ = x + c at one interior pixel: L1 = c / (C·H·W) and, by the stencil, detail = 8c / (C·H·W);
    # total = L1 + w·detail + codebook + commitment, and no detail term at all when w = 0
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    x_hat = x.clone()
    x_hat[0, 0, 3, 5] += 0.3
    info = {"codebook_loss": torch.tensor(0.25, dtype=x.dtype),
            "commitment_loss": torch.tensor(0.125, dtype=x.dtype)}
    terms = vq_loss(x_hat, x, info, detail_weight=2.0)
    l1, detail = 0.3 / (3 * 64), 8 * 0.3 / (3 * 64)
    for name, value in (("reconstruction_loss", l1), ("detail_loss", detail),
                        ("total", l1 + 2.0 * detail + 0.25 + 0.125)):
        assert torch.isclose(terms[name], torch.tensor(value, dtype=x.dtype)), name
    plain = vq_loss(x_hat, x, info)
    assert "detail_loss" not in plain
    assert torch.isclose(plain["total"], torch.tensor(l1 + 0.25 + 0.125, dtype=x.dtype))


def test_face_weight_counts_the_face_pixels_more():
    # x̂ − x = c on a face of n_f pixels, d on the n_o others; with ω = 1 + a on the face the L1
    # term is (c·(1 + a)·n_f + d·n_o) / ((1 + a)·n_f + n_o), and the Laplacian term the same
    # weighted mean of |L∗x̂ − L∗x|
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    face = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    face[:, :, 2:5, 3:7] = 1  # 12 pixels of each image's 64
    c, d, a = 0.3, 0.1, 4.0
    x_hat = x + torch.where(face.bool(), c, d)
    n_f, n_o = 2 * 12, 2 * 52
    expected = (c * (1 + a) * n_f + d * n_o) / ((1 + a) * n_f + n_o)
    weight = 1 + a * face
    assert torch.isclose(reconstruction_loss(x_hat, x, weight),
                         torch.tensor(expected, dtype=x.dtype))
    assert torch.isclose(reconstruction_loss(x_hat, x, torch.ones_like(face)),
                         reconstruction_loss(x_hat, x))  # ω = 1 is the plain mean


def test_face_weight_of_the_detail_term_hand_computed():
    # x̂ = x + c at pixel (4, 3) of one channel; ω = 5 on the face, pixels (4, 3) and (4, 4), and
    # 1 elsewhere. |L∗x̂ − L∗x| is 4c at (4, 3) and c at (3, 3), (5, 3), (4, 2), (4, 4), so
    # Σ ω·e = 5·4c + 5·c + 3·c = 28c; ω is shared by the 3 channels: Σ ω = 3·(62 + 2·5) = 216.
    # The L1 term is 5c / 216 the same way.
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    x_hat = x.clone()
    x_hat[0, 1, 4, 3] += 0.3
    weight = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    weight[0, 0, 4, 3:5] = 5
    assert torch.isclose(detail_loss(x_hat, x, weight), torch.tensor(28 * 0.3 / 216,
                                                                     dtype=x.dtype))
    assert torch.isclose(reconstruction_loss(x_hat, x, weight), torch.tensor(5 * 0.3 / 216,
                                                                             dtype=x.dtype))
    assert torch.isclose(vq_loss(x_hat, x, {"codebook_loss": 0, "commitment_loss": 0},
                                 detail_weight=1.0, pixel_weight=weight)["total"],
                         torch.tensor(33 * 0.3 / 216, dtype=x.dtype))  # both terms weighted


def test_bad_inputs_assert():
    model = VQVAE(small_config())
    with pytest.raises(AssertionError, match="image"):
        model.encode(torch.randn(1, 1, 16, 16))
    with pytest.raises(AssertionError, match="image"):
        model.encode(torch.randn(3, 16, 16))
    with pytest.raises(AssertionError, match="divisible"):
        model.encode(torch.randn(1, 3, 18, 16))
    with pytest.raises(AssertionError, match="latent"):
        model.decode(torch.randn(1, 4, 4, 4))
    with pytest.raises(AssertionError, match="latent"):
        model.quantizer(torch.randn(1, 2, 4, 4))
    with pytest.raises(AssertionError):
        reconstruction_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


def test_tiny_overfit_reduces_l1():
    torch.manual_seed(5)
    cfg = small_config(channel_mult=(1, 2), codebook_size=32)
    model = VQVAE(cfg)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        start = reconstruction_loss(model(x)[0], x).item()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: thread overhead dominates on a shared CPU
    try:
        for step in range(100):
            x_hat, info = model(x)
            loss = vq_loss(x_hat, x, info)["total"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 20 == 19:
                model.quantizer.restart_dead_codes(info["z"], torch.Generator().manual_seed(step))
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        end = reconstruction_loss(model(x)[0], x).item()
    assert end < 0.5 * start

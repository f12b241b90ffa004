"""Tests of unet.py: shapes, zero-init, timestep embedding formula, AdaIN formula and wiring,
cross-attention (a hand-computed case, one repeated token, normalisation, token-permutation
equivariance), A_cross averaging, batch consistency, parameter bookkeeping against LDM-4,
config checks, input asserts."""
import math

import pytest
import torch

from layers import UNET_NORM_EPS
from unet import (AdaIN, AdaINResBlock, CrossAttention, SelfAttention, SpatialTransformer, UNet,
                  UNetConfig, average_cross_attention, count_parameters, timestep_embedding)

K = 4  # slot tokens


def tiny_config(**overrides):
    fields = dict(in_channels=6, out_channels=3, base_channels=16, channel_mult=(1, 2),
                  num_res_blocks=1, attention_resolutions=(1, 2), head_channels=8,
                  context_dim=12, id_dim=10, norm_groups=4)
    fields.update(overrides)
    return UNetConfig(**fields)


def make_model(perturb=True, skip_adain=False, seed=0, **overrides):
    """Tiny float64 UNet; perturb adds noise to every parameter so zero-inits are non-zero."""
    torch.manual_seed(seed)
    model = UNet(tiny_config(**overrides)).double().eval()
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if skip_adain and "adain" in name:
                    continue
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_inputs(model, batch=2, size=8, seed=1):
    config = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, K, config.context_dim, generator=g, dtype=torch.float64)
    id_embed = torch.randn(batch, config.id_dim, generator=g, dtype=torch.float64)
    return x, t, context, id_embed


def test_output_shape_and_attention_shapes():
    model = make_model()
    x, t, context, id_embed = make_inputs(model, size=8)
    eps, attn = model(x, t, context, id_embed, return_attn=True)
    assert eps.shape == (2, 3, 8, 8)
    # tiny config: both levels attend; down 1 per level, middle 1, up 2 per level -> 2 + 1 + 4
    heads = {8: 16 // 8, 4: 32 // 8}  # spatial size -> channels // head_channels
    sizes = [8, 4, 4, 4, 4, 8, 8]
    assert [tuple(a.shape) for a in attn] == [(2, heads[s], s, s, K) for s in sizes]
    assert torch.equal(model(x, t, context, id_embed), eps)


def test_zero_output_at_init_and_gradient_reaches_out_conv():
    model = make_model(perturb=False)
    x, t, context, id_embed = make_inputs(model)
    eps = model(x, t, context, id_embed)
    assert torch.equal(eps, torch.zeros_like(eps))
    weights = torch.randn_like(eps)
    (eps * weights).sum().backward()
    # d/d bias_o of Σ w·eps = Σ_{b,y,x} w[b,o,y,x]
    torch.testing.assert_close(model.conv_out.bias.grad, weights.sum(dim=(0, 2, 3)))
    assert model.conv_out.weight.grad.abs().max() > 1e-3


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0], dtype=torch.float64)
    for dim in (10, 7):
        half = dim // 2
        expected = torch.zeros(len(t), dim, dtype=torch.float64)
        for row, value in enumerate(t.tolist()):
            for i in range(half):
                angle = value * 10000.0 ** (-i / half)
                expected[row, i] = math.sin(angle)
                expected[row, half + i] = math.cos(angle)
        torch.testing.assert_close(timestep_embedding(t, dim), expected, rtol=0, atol=1e-12)
    integer = timestep_embedding(torch.tensor([3, 5]), 8)
    assert integer.dtype == torch.float32


def test_adain_formula_with_hand_set_weights():
    """Eq. 4-5: h_s·IN(h) + h_b with [h_s, h_b] = W·SiLU(f_id) + b, IN per image and channel."""
    torch.manual_seed(0)
    channels, id_dim = 6, 4
    layer = AdaIN(channels, id_dim).double()
    weight = torch.randn(2 * channels, id_dim, dtype=torch.float64)
    bias = torch.randn(2 * channels, dtype=torch.float64)
    with torch.no_grad():
        layer.to_scale_shift.weight.copy_(weight)
        layer.to_scale_shift.bias.copy_(bias)
    h = torch.randn(2, channels, 3, 5, dtype=torch.float64) * 3 + 1
    f_id = torch.randn(2, id_dim, dtype=torch.float64)
    mean = h.mean(dim=(2, 3), keepdim=True)
    var = h.var(dim=(2, 3), unbiased=False, keepdim=True)
    normed = (h - mean) / torch.sqrt(var + UNET_NORM_EPS)
    silu = f_id / (1 + torch.exp(-f_id))
    scale_shift = silu @ weight.T + bias  # (B, 2C)
    h_s = scale_shift[:, :channels, None, None]
    h_b = scale_shift[:, channels:, None, None]
    torch.testing.assert_close(layer(h, f_id), h_s * normed + h_b)


def test_adain_starts_as_plain_instance_norm():
    layer = AdaIN(6, 4).double()
    h = torch.randn(2, 6, 3, 5, dtype=torch.float64) * 3 + 1
    expected = (h - h.mean((2, 3), keepdim=True)) / torch.sqrt(
        h.var((2, 3), unbiased=False, keepdim=True) + UNET_NORM_EPS)
    torch.testing.assert_close(layer(h, torch.randn(2, 4, dtype=torch.float64)), expected)


def test_the_timestep_reaches_every_res_block():
    """AdaIN normalises each channel of each image: a time shift added before it would vanish."""
    model = make_model()
    blocks = [m for m in model.modules() if isinstance(m, AdaINResBlock)]
    assert blocks
    for block in blocks:
        x = torch.randn(2, block.conv1.in_channels, 4, 4, dtype=torch.float64)
        temb = torch.randn(2, block.time_proj.in_features, dtype=torch.float64)
        f_id = torch.randn(2, block.adain.to_scale_shift.in_features, dtype=torch.float64)
        assert (block(x, temb, f_id) - block(x, temb + 1, f_id)).abs().max() > 1e-3


def test_identity_enters_only_through_adain():
    model = make_model(skip_adain=True)
    x, t, context, id_embed = make_inputs(model)
    other_id = torch.randn_like(id_embed)
    eps = model(x, t, context, id_embed)
    assert eps.abs().max() > 1e-3  # non-trivial output: the zero-inits are perturbed
    assert torch.equal(model(x, t, context, other_id), eps)  # AdaIN weights still zero
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adain" in name:
                p.add_(0.1 * torch.randn_like(p))
    eps = model(x, t, context, id_embed)
    assert (model(x, t, context, other_id) - eps).abs().max() > 1e-4


def test_cross_attention_probabilities_sum_to_one():
    model = make_model()
    x, t, context, id_embed = make_inputs(model)
    _, attn = model(x, t, context, id_embed, return_attn=True)
    for probs in attn:
        assert probs.min() >= 0
        torch.testing.assert_close(probs.sum(dim=-1), torch.ones(probs.shape[:-1],
                                                                 dtype=torch.float64))


def test_token_permutation_permutes_maps_and_keeps_eps():
    model = make_model()
    x, t, context, id_embed = make_inputs(model)
    perm = torch.tensor([2, 0, 3, 1])
    eps, attn = model(x, t, context, id_embed, return_attn=True)
    eps_perm, attn_perm = model(x, t, context[:, perm], id_embed, return_attn=True)
    assert eps.abs().max() > 1e-3
    assert attn[0].std() > 1e-3  # maps are not uniform, so the permutation check has teeth
    torch.testing.assert_close(eps_perm, eps, rtol=0, atol=1e-12)
    for probs, probs_perm in zip(attn, attn_perm):
        torch.testing.assert_close(probs_perm, probs[..., perm], rtol=0, atol=1e-12)


def test_self_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    layer = SelfAttention(8, heads=2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    q, k, v = (proj(x).view(2, 5, 2, 4).transpose(1, 2)
               for proj in (layer.to_q, layer.to_k, layer.to_v))  # (B, heads, N, d)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # √d = 2
    expected = layer.to_out((probs @ v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(layer(x), expected)


def test_cross_attention_hand_computed_two_tokens():
    # C = 4, 2 heads of d = 2 (channels 0–1 and 2–3), weights set by hand. Pixel 1 is
    # x = (0, √2·ln 3, √2·ln 4, 0); the tokens (1, 0), (0, 1) give the keys (0, 1 | 0, 0) and
    # (0, 0 | 1, 0), so the logits Q·Kᵀ/√d are (ln 3, 0) in head 0 and (0, ln 4) in head 1:
    # softmax (3/4, 1/4) and (1/5, 4/5). The values are (1, 0 | 2, 0) and (0, 1 | 0, 3), so the
    # heads give (3/4, 1/4) and (2/5, 12/5), plus the output bias. Pixel 2 is x = 0: uniform
    # weights, so the mean value.
    layer = CrossAttention(4, context_dim=2, heads=2).double()
    with torch.no_grad():
        layer.to_q.weight.copy_(torch.eye(4))
        layer.to_k.weight.copy_(torch.tensor([[0.0, 0], [1, 0], [0, 1], [0, 0]]))
        layer.to_v.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [2, 0], [0, 3]]))
        layer.to_out.weight.copy_(torch.eye(4))
        layer.to_out.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    x = torch.tensor([[[0, math.sqrt(2) * math.log(3), math.sqrt(2) * math.log(4), 0],
                       [0, 0, 0, 0]]], dtype=torch.float64)  # (B, N, C) = (1, 2, 4)
    context = torch.eye(2, dtype=torch.float64)[None]  # (B, K, Dc) = (1, 2, 2)
    out, probs = layer(x, context)
    expected_probs = torch.tensor([[[3 / 4, 1 / 4], [1 / 2, 1 / 2]],    # head 0, pixels 1, 2
                                   [[1 / 5, 4 / 5], [1 / 2, 1 / 2]]],   # head 1
                                  dtype=torch.float64)[None]
    expected_out = torch.tensor([[[3 / 4 + 0.1, 1 / 4 + 0.2, 2 / 5 + 0.3, 12 / 5 + 0.4],
                                  [1 / 2 + 0.1, 1 / 2 + 0.2, 1 + 0.3, 3 / 2 + 0.4]]],
                                dtype=torch.float64)
    torch.testing.assert_close(probs, expected_probs)
    torch.testing.assert_close(out, expected_out)


@pytest.mark.parametrize("tokens", [1, 3])
def test_cross_attention_to_one_repeated_token_returns_its_value(tokens):
    # K copies of one token have equal logits, so every pixel's weights are 1/K and the output
    # is Σ_k (1/K)·v = to_out(to_v(token)) at every pixel, whatever the queries
    torch.manual_seed(0)
    layer = CrossAttention(8, context_dim=6, heads=2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    token = torch.randn(2, 1, 6, dtype=torch.float64)
    out, probs = layer(x, token.expand(2, tokens, 6))
    torch.testing.assert_close(probs, torch.full((2, 2, 5, tokens), 1 / tokens,
                                                 dtype=torch.float64))
    torch.testing.assert_close(out, layer.to_out(layer.to_v(token)).expand(2, 5, 8))


def test_spatial_transformer_is_pixel_equivariant_and_maps_keep_layout():
    # No positional encoding: transposing H and W of the input transposes the output and the
    # maps; on a non-square input this catches a wrong (H, W) unflatten of the maps.
    torch.manual_seed(0)
    block = SpatialTransformer(8, heads=2, context_dim=6, groups=2).double()
    with torch.no_grad():
        block.proj_out.weight.normal_()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    context = torch.randn(2, 4, 6, dtype=torch.float64)
    out, probs = block(x, context)
    out_t, probs_t = block(x.transpose(2, 3), context)
    assert probs.shape == (2, 2, 3, 5, 4)
    assert (out - x).abs().max() > 1e-3
    torch.testing.assert_close(out_t, out.transpose(2, 3))
    torch.testing.assert_close(probs_t, probs.transpose(2, 3))


def test_average_cross_attention_hand_computed():
    g = torch.Generator().manual_seed(0)
    same = torch.rand(1, 2, 2, 2, 3, generator=g, dtype=torch.float64)  # already 2×2
    fine = torch.rand(1, 1, 4, 4, 3, generator=g, dtype=torch.float64)  # 4×4 -> 2×2
    coarse = torch.rand(1, 3, 1, 1, 3, generator=g, dtype=torch.float64)  # 1×1 -> 2×2
    expected = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    for k in range(3):
        for row in range(2):
            for col in range(2):
                # bilinear 4 -> 2 (align_corners=False) samples at 0.5, 2.5: the 2×2 block mean
                block = fine[0, 0, 2 * row:2 * row + 2, 2 * col:2 * col + 2, k].mean()
                expected[0, k, row, col] = (same[0, :, row, col, k].mean() + block
                                            + coarse[0, :, 0, 0, k].mean()) / 3
    result = average_cross_attention([same, fine, coarse], 2)
    torch.testing.assert_close(result, expected)


def test_average_cross_attention_keeps_sum_to_one():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, heads, size, size, K, generator=g, dtype=torch.float64)
              for heads, size in ((2, 5), (4, 8), (1, 3))]
    attn = [z.softmax(dim=-1) for z in logits]
    for size in (7, 3, (4, 6)):
        result = average_cross_attention(attn, size)
        expected_size = (size, size) if isinstance(size, int) else size
        assert result.shape == (2, K, *expected_size)
        torch.testing.assert_close(result.sum(dim=1), torch.ones(2, *expected_size,
                                                                  dtype=torch.float64))
    with pytest.raises(AssertionError):
        average_cross_attention([], 4)
    with pytest.raises(RuntimeError):  # layers that disagree on K cannot be averaged
        average_cross_attention([attn[0], attn[1][..., :3]], 4)


def test_batch_consistency():
    model = make_model()
    x, t, context, id_embed = make_inputs(model, batch=3)
    eps = model(x, t, context, id_embed)
    for i in range(3):
        alone = model(x[i:i + 1], t[i:i + 1], context[i:i + 1], id_embed[i:i + 1])
        torch.testing.assert_close(alone, eps[i:i + 1], rtol=0, atol=1e-12)
    scalar = model(x, t[0], context, id_embed)  # a scalar t is broadcast over the batch
    torch.testing.assert_close(scalar, model(x, t[0].expand(3), context, id_embed))


def test_float32_runs_and_matches_float64():
    model = make_model()
    x, t, context, id_embed = make_inputs(model)
    eps64 = model(x, t, context, id_embed)
    eps32 = model.float()(x.float(), t, context.float(), id_embed.float())
    assert eps32.dtype == torch.float32
    torch.testing.assert_close(eps32.double(), eps64, rtol=1e-4, atol=1e-4)


def test_structure_matches_ldm4_parameter_count():
    # With LDM's AttentionBlock (GN 2C, qkv 3C²+3C, proj C²+C) in place of our transformers and
    # an affine GroupNorm (2C) in place of AdaIN, the paper config must have LDM-4's 274M.
    with torch.device("meta"):
        model = UNet(UNetConfig())
    total = count_parameters(model)
    base = sum(p.numel() for name, p in model.named_parameters()
               if "transformer" not in name and "adain" not in name)
    ldm_attention = sum(2 * m.proj_in.in_channels + 4 * m.proj_in.in_channels ** 2
                        + 4 * m.proj_in.in_channels
                        for m in model.modules() if isinstance(m, SpatialTransformer))
    ldm_norm2 = sum(2 * m.norm.num_features for m in model.modules() if isinstance(m, AdaIN))
    assert round((base + ldm_attention + ldm_norm2) / 1e6) == 274
    assert total > base + ldm_attention + ldm_norm2
    assert count_parameters(AdaIN(6, 4)) == 4 * 12 + 12


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.zeros(2, 5, 8, 8)), "x "),
    (dict(x=torch.zeros(2, 6, 8)), "x "),
    (dict(x=torch.zeros(2, 6, 9, 8)), "not divisible by 2"),
    (dict(context=torch.zeros(2, K, 11)), "context"),
    (dict(context=torch.zeros(3, K, 12)), "context"),
    (dict(context=torch.zeros(2, 12)), "context"),
    (dict(id_embed=torch.zeros(2, 9)), "id_embed"),
    (dict(id_embed=torch.zeros(1, 10)), "id_embed"),
    (dict(t=torch.zeros(3)), "t "),
])
def test_bad_inputs_assert(change, match):
    model = make_model(perturb=False).float()
    inputs = dict(x=torch.zeros(2, 6, 8, 8), t=torch.zeros(2), context=torch.zeros(2, K, 12),
                  id_embed=torch.zeros(2, 10))
    inputs.update(change)
    with pytest.raises(AssertionError, match=match):
        model(**inputs)


@pytest.mark.parametrize("overrides, match", [
    (dict(base_channels=18), "norm_groups"),
    (dict(head_channels=12), "head_channels"),
    (dict(attention_resolutions=(3,)), "factor 3"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(base_channels=6, channel_mult=(2, 4)), "base_channels=6"),
])
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)

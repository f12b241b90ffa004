"""Tests for slots.py: shapes (Table 4), slot-attention invariances and an independent
re-implementation of Algorithm 1 (Locatello et al. 2020), broadcast-decoder compositing, masks."""
import math

import pytest
import torch
import torch.nn.functional as F

import slots as rsc
from layers import REGION_NAMES

TINY = dict(image_size=32, base_channels=32, channel_mult=(1, 2, 2), feature_dim=32, slot_dim=32,
            mlp_hidden=64, decoder_channels=16, decoder_layers=2, target_size=8)


def tiny_config(**overrides):
    return rsc.SlotsConfig(**{**TINY, **overrides})


def make_attention(iters=3, dim=16, input_dim=12, num_slots=4, seed=0):
    """A float64 SlotAttention whose LayerNorms and GRU biases are not at their defaults."""
    torch.manual_seed(seed)
    module = rsc.SlotAttention(num_slots, dim, iters, mlp_hidden=24, eps=1e-8,
                               input_dim=input_dim).double()
    with torch.no_grad():
        for norm in (module.norm_inputs, module.norm_slots, module.norm_mlp):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0.0, 0.1)
        module.mu.normal_(0.0, 1.0)
    return module


# ---- independent reference: Algorithm 1 written out, reusing only the module's weights ----

def reference_layer_norm(x, norm):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def reference_gru(x, h, cell):
    """GRU cell equations: r, z gates, candidate n, h' = (1 − z)·n + z·h."""
    w_ir, w_iz, w_in = cell.weight_ih.chunk(3)
    w_hr, w_hz, w_hn = cell.weight_hh.chunk(3)
    b_ir, b_iz, b_in = cell.bias_ih.chunk(3)
    b_hr, b_hz, b_hn = cell.bias_hh.chunk(3)
    r = torch.sigmoid(x @ w_ir.T + b_ir + h @ w_hr.T + b_hr)
    z = torch.sigmoid(x @ w_iz.T + b_iz + h @ w_hz.T + b_hz)
    n = torch.tanh(x @ w_in.T + b_in + r * (h @ w_hn.T + b_hn))
    return (1.0 - z) * n + z * h


def reference_iteration(module, inputs, slots):
    x = reference_layer_norm(inputs, module.norm_inputs)
    k = x @ module.to_k.weight.T  # no bias
    v = x @ module.to_v.weight.T
    q = reference_layer_norm(slots, module.norm_slots) @ module.to_q.weight.T
    logits = k @ q.transpose(1, 2) / math.sqrt(module.dim)  # (B, N, K)
    e = torch.exp(logits - logits.max(dim=2, keepdim=True).values)
    attn = e / e.sum(dim=2, keepdim=True)  # normalised over slots
    weights = (attn + module.eps) / (attn + module.eps).sum(dim=1, keepdim=True)
    updates = weights.transpose(1, 2) @ v  # (B, K, D)
    new = reference_gru(updates, slots, module.gru)
    lin1, lin2 = module.mlp[0], module.mlp[2]
    hidden = torch.relu(reference_layer_norm(new, module.norm_mlp) @ lin1.weight.T + lin1.bias)
    new = new + hidden @ lin2.weight.T + lin2.bias
    return new, attn.transpose(1, 2)


@pytest.mark.parametrize("iters", [1, 3])
def test_slot_attention_matches_reference(iters):
    module = make_attention(iters=iters).eval()
    inputs = torch.randn(2, 20, 12, dtype=torch.float64)
    slots, attn = module(inputs)
    expected = module.mu.expand(2, -1, -1)
    for _ in range(iters):
        expected, expected_attn = reference_iteration(module, inputs, expected)
    torch.testing.assert_close(slots, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(attn, expected_attn, atol=1e-10, rtol=0)


def test_permuting_inputs_permutes_attention_and_keeps_slots():
    module = make_attention().eval()
    inputs = torch.randn(3, 25, 12, dtype=torch.float64)
    perm = torch.randperm(25)
    slots, attn = module(inputs)
    slots_p, attn_p = module(inputs[:, perm])
    torch.testing.assert_close(slots_p, slots, atol=1e-10, rtol=0)
    torch.testing.assert_close(attn_p, attn[:, :, perm], atol=1e-10, rtol=0)
    torch.testing.assert_close(attn.sum(dim=1), torch.ones(3, 25, dtype=torch.float64))


def test_learned_initial_slots_are_deterministic_in_training_and_get_gradient():
    inputs = torch.randn(2, 10, 12, dtype=torch.float64)
    module = make_attention().train()
    torch.testing.assert_close(module(inputs)[0], module(inputs)[0], atol=0, rtol=0)
    slots, _ = module(inputs)
    (slots ** 2).sum().backward()
    assert module.mu.grad is not None and module.mu.grad.abs().sum() > 0


def test_slot_attention_separates_well_separated_clusters():
    """Identity projections, GRU that copies the update, zero MLP: a soft k-means. Slots that
    start nearer one cluster (in a shuffled order) must each take exactly that cluster."""
    dim, num_slots, per_cluster = 32, 4, 6
    torch.manual_seed(1)
    module = rsc.SlotAttention(num_slots, dim, iters=3, mlp_hidden=8).double().eval()
    centres = 3.0 * torch.eye(dim, dtype=torch.float64)[:num_slots]  # (K, D) orthogonal
    labels = torch.arange(num_slots).repeat_interleave(per_cluster)  # (N,)
    inputs = (centres[labels] + 0.05 * torch.randn(len(labels), dim, dtype=torch.float64))[None]
    order = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        for linear in (module.to_q, module.to_k, module.to_v):
            linear.weight.copy_(torch.eye(dim))
        module.mu.copy_(centres[order] + 0.3 * torch.randn(num_slots, dim, dtype=torch.float64))
        module.gru.weight_hh.zero_()
        module.gru.weight_ih.zero_()
        module.gru.weight_ih[2 * dim:].copy_(torch.eye(dim))  # candidate n = tanh(u)
        module.gru.bias_ih.zero_()
        module.gru.bias_hh.zero_()
        module.gru.bias_ih[dim:2 * dim].fill_(-30.0)  # update gate z ≈ 0: h' = n
        module.mlp[2].weight.zero_()
        module.mlp[2].bias.zero_()
    _, attn = module(inputs)
    winner = attn[0].argmax(dim=0)  # (N,) slot of each input
    torch.testing.assert_close(winner, torch.argsort(order)[labels])
    assert attn[0].max(dim=0).values.min() > 0.9


def test_slot_attention_asserts_on_bad_inputs():
    module = make_attention()
    with pytest.raises(AssertionError):
        module(torch.randn(2, 10, 13, dtype=torch.float64))
    with pytest.raises(AssertionError):
        module(torch.randn(10, 12, dtype=torch.float64))


def test_paper_config_shapes():
    cfg = rsc.SlotsConfig()
    model = rsc.RegionSlots(cfg).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 256, 256) * 2 - 1)
    assert out["features"].shape == (1, 192, 32, 32)  # Table 4: 256×256 → 32×32
    assert out["slots"].shape == (1, 4, 192)
    assert out["masks"].shape == (1, 4, 32, 32)
    torch.testing.assert_close(out["masks"].sum(dim=1), torch.ones(1, 32, 32))
    assert len(REGION_NAMES) == cfg.num_slots


def test_region_slots_forward_decode_and_every_parameter_trains():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = rsc.RegionSlots(cfg).double().train()
    image = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1
    out = model(image)
    assert out["masks"].shape == (2, 4, 8, 8)
    assert (out["masks"] >= 0).all()
    torch.testing.assert_close(out["masks"].sum(dim=1), torch.ones(2, 8, 8, dtype=torch.float64))
    decoded = model.decode(out["slots"])
    assert decoded["recon"].shape == (2, 3, 8, 8)
    target = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    F.mse_loss(decoded["recon"], target).backward()  # the slots stage's loss (§4.3)
    # no parameter may be left without a gradient (DDP would fail on it)
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_broadcast_decoder_compositing_and_slot_independence():
    torch.manual_seed(0)
    decoder = rsc.BroadcastDecoder(slot_dim=10, channels=8, layers=2, out_channels=3,
                                   size=6).double()
    slots = torch.randn(2, 5, 10, dtype=torch.float64)
    out = decoder(slots)
    assert out["slot_recons"].shape == (2, 5, 3, 6, 6)
    assert out["alphas"].shape == (2, 5, 6, 6)
    torch.testing.assert_close(out["alphas"].sum(dim=1), torch.ones(2, 6, 6, dtype=torch.float64))
    expected = (out["alphas"][:, :, None] * out["slot_recons"]).sum(dim=1)
    torch.testing.assert_close(out["recon"], expected, atol=1e-12, rtol=0)
    # each slot is decoded alone: slot 0's decoding of batch item 0 equals a 1-slot decode
    alone = decoder(slots[:1, :1])["slot_recons"]
    torch.testing.assert_close(alone[0, 0], out["slot_recons"][0, 0], atol=1e-12, rtol=0)
    # permuting slots permutes the layers and leaves the composite unchanged
    perm = torch.tensor([3, 1, 4, 0, 2])
    permuted = decoder(slots[:, perm])
    torch.testing.assert_close(permuted["alphas"], out["alphas"][:, perm], atol=1e-12, rtol=0)
    torch.testing.assert_close(permuted["recon"], out["recon"], atol=1e-12, rtol=0)


def test_position_grid_values():
    grid = rsc.position_grid(3, 5, dtype=torch.float64)
    assert grid.shape == (3, 5, 4)
    torch.testing.assert_close(grid[0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(grid[2, 4], torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(grid[1, 1], torch.tensor([0.25, 0.5, 0.75, 0.5],
                                                        dtype=torch.float64))


def test_masks_at_resizes_and_keeps_partition_of_unity():
    masks = torch.rand(2, 4, 8, 8, dtype=torch.float64).softmax(dim=1)
    for size in (32, (4, 6), 8):
        resized = rsc.masks_at(masks, size)
        side = (size, size) if isinstance(size, int) else size
        assert resized.shape == (2, 4) + tuple(side)
        torch.testing.assert_close(resized.sum(dim=1), torch.ones((2,) + tuple(side),
                                                                   dtype=torch.float64))
    torch.testing.assert_close(rsc.masks_at(masks, 8), masks)  # same size: unchanged
    # bilinear 2× upsampling of a column step: the pixel just left of the step is 3/4 · 1 + 1/4 · 0
    step = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    step[:, 0, :, :2] = 1.0
    step[:, 1] = 1.0 - step[:, 0]
    up = rsc.masks_at(step, (1, 8))
    torch.testing.assert_close(up[0, 0, 0, 3], torch.tensor(0.75, dtype=torch.float64))
    with pytest.raises(AssertionError, match="masks"):
        rsc.masks_at(masks[0], 16)


def test_bad_images_assert():
    model = rsc.RegionSlots(tiny_config())
    with pytest.raises(AssertionError, match="image"):
        model(torch.zeros(1, 1, 32, 32))
    with pytest.raises(AssertionError, match="image"):
        model(torch.zeros(1, 3, 48, 48))
    with pytest.raises(AssertionError, match="image"):
        model(torch.zeros(3, 32, 32))
    with pytest.raises(AssertionError):
        model.decode(torch.zeros(1, 3, 32))


@pytest.mark.parametrize("overrides, message", [
    (dict(image_size=90), "divisible"),
    (dict(base_channels=20), "norm_groups"),
    (dict(attn_heads=5), "attn_heads"),
    (dict(num_slots=0), "num_slots"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(eps=0.0), "eps"),
    (dict(iters=0), "iters=0"),
])
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_float32_module_keeps_dtype():
    model = rsc.RegionSlots(tiny_config()).eval()
    out = model(torch.zeros(1, 3, 32, 32))
    assert out["slots"].dtype == torch.float32
    assert out["masks"].dtype == torch.float32


def test_pretraining_loss_is_mse_plus_the_log_mask_of_each_pixels_region():
    """With masks and a reconstruction set by hand: MSE(recon, target) + w·mean(−log M_r(p)),
    r the true region of pixel p; without supervision the MSE alone."""
    masks = torch.tensor([[[[0.9, 0.2], [0.5, 0.7]]]])
    masks = torch.cat([masks, 1 - masks], 1)  # (1, 2 slots, 2, 2), a partition of unity
    recon, target = torch.zeros(1, 3, 1, 1), torch.full((1, 3, 1, 1), 0.5)

    class HandSet:  # stands in for RegionSlots: its masks and its decoder's output
        def __call__(self, images):
            return {"slots": torch.zeros(1, 2, 4), "masks": masks}

        def decode(self, slots):
            return {"recon": recon}

    regions = torch.tensor([[[0, 1], [1, 0]]])
    out = rsc.pretraining_loss(HandSet(), torch.zeros(1, 3, 2, 2), target, regions, 2.0)
    region = -(math.log(0.9) + math.log(0.8) + math.log(0.5) + math.log(0.7)) / 4
    assert out["reconstruction_loss"].item() == pytest.approx(0.25)
    assert out["region_loss"].item() == pytest.approx(region, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.25 + 2.0 * region, rel=1e-6)
    alone = rsc.pretraining_loss(HandSet(), torch.zeros(1, 3, 2, 2), target)
    assert set(alone) == {"loss"} and alone["loss"].item() == pytest.approx(0.25)

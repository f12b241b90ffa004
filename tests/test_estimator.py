"""Tests for estimator.py: DECA layout, pose mapping, prior, identity embedding, ArcFace margin."""
import math

import pytest
import torch
import torch.nn.functional as F

from estimator import (CoefficientEstimator, EstimatorConfig, IdentityConfig, IdentityEncoder,
                       csim)
from training.arcface import ArcMarginHead
from flame import flame15_to_pose6, pose6_to_flame15


def tiny_estimator_cfg(**overrides):
    fields = dict(image_size=32, base_channels=8, channel_mult=(1, 2), blocks_per_stage=1,
                  norm_groups=4, n_shape=50, n_albedo=8, n_exp=20)
    fields.update(overrides)
    return EstimatorConfig(**fields)


def tiny_identity_cfg(**overrides):
    fields = dict(image_size=16, base_channels=8, channel_mult=(1, 2), blocks_per_stage=1,
                  norm_groups=4, embedding_dim=16)
    fields.update(overrides)
    return IdentityConfig(**fields)


def test_deca_sizes_give_236_and_sizes_are_config_driven():
    assert EstimatorConfig().n_params == 236
    assert tiny_estimator_cfg().n_params == 50 + 8 + 20 + 6 + 3 + 27


def test_decode_encode_round_trip_exact():
    torch.manual_seed(0)
    model = CoefficientEstimator(tiny_estimator_cfg())
    vector = torch.randn(3, model.cfg.n_params, dtype=torch.float64)
    assert torch.equal(model.encode(model.decode(vector)), vector)
    coeffs = model.decode(torch.randn(2, model.cfg.n_params))
    again = model.decode(model.encode(coeffs))
    for key, value in coeffs.items():
        assert torch.equal(again[key], value)


def test_split_order_matches_deca_layout():
    model = CoefficientEstimator(EstimatorConfig(image_size=32, base_channels=8,
                                                 channel_mult=(1,), blocks_per_stage=1,
                                                 norm_groups=4))
    vector = torch.arange(236, dtype=torch.float64)[None]  # (1, 236)
    out = model.decode(vector)
    # DECA: shape 100, tex 50, exp 50, pose 6, cam 3, light 27, in this order
    expected_ranges = {"shape": (0, 100), "albedo": (100, 150), "expression": (150, 200),
                       "pose": (200, 206), "cam": (206, 209)}
    for key, (lo, hi) in expected_ranges.items():
        assert out[key].tolist() == [[float(i) for i in range(lo, hi)]], key
    light_expected = [[[209.0 + 3 * k + c for c in range(3)] for k in range(9)]]
    assert out["light"].tolist() == light_expected


def test_pose6_flame15_mapping():
    pose6 = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    flame15 = pose6_to_flame15(pose6)
    # FLAME joints: global, neck, jaw, left eye, right eye
    expected = [1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 4.0, 5.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert flame15.tolist() == [expected]
    assert torch.equal(flame15_to_pose6(flame15), pose6)
    with pytest.raises(AssertionError):
        pose6_to_flame15(torch.zeros(1, 5))
    with pytest.raises(AssertionError):
        flame15_to_pose6(torch.zeros(1, 9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_estimator_output_shapes(dtype):
    torch.manual_seed(0)
    cfg = tiny_estimator_cfg()
    model = CoefficientEstimator(cfg).to(dtype)
    out = model(torch.rand(2, 3, 32, 32, dtype=dtype) * 2 - 1)
    shapes = {key: tuple(value.shape) for key, value in out.items()}
    assert shapes == {"shape": (2, 50), "albedo": (2, 8), "expression": (2, 20), "pose": (2, 6),
                      "cam": (2, 3), "light": (2, 9, 3)}
    assert all(value.dtype == dtype for value in out.values())


def test_untrained_estimator_starts_at_configured_prior():
    torch.manual_seed(0)
    cfg = tiny_estimator_cfg(init_cam_scale=7.5, init_light_dc=2.0)
    model = CoefficientEstimator(cfg)
    with torch.no_grad():
        model.head.weight.zero_()
    out = model(torch.rand(4, 3, 32, 32) * 2 - 1)
    assert torch.equal(out["cam"], torch.tensor([[7.5, 0.0, 0.0]]).expand(4, 3))
    assert torch.equal(out["light"][:, 0, :], torch.full((4, 3), 2.0))
    assert torch.count_nonzero(out["light"][:, 1:, :]) == 0
    for key in ("shape", "albedo", "expression", "pose"):
        assert torch.count_nonzero(out[key]) == 0, key
    # default DC light √(4π) times the SH DC constant 1/√(4π) gives unit shading
    assert math.isclose(EstimatorConfig().init_light_dc / math.sqrt(4 * math.pi), 1.0)


def test_estimator_output_depends_on_image_once_head_is_nonzero():
    torch.manual_seed(0)
    model = CoefficientEstimator(tiny_estimator_cfg())
    with torch.no_grad():
        model.head.weight.normal_()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(images)
    assert (out["shape"][0] - out["shape"][1]).abs().max() > 1e-4
    # the output is the linear head of the pooled trunk features plus the prior
    features = model.trunk(images).mean(dim=(2, 3))
    vector = features @ model.head.weight.T + model.head.bias + model.prior
    assert torch.allclose(model.encode(out), vector, atol=1e-5)


def test_estimator_asserts_on_bad_inputs():
    model = CoefficientEstimator(tiny_estimator_cfg())
    with pytest.raises(AssertionError, match="image"):
        model(torch.zeros(1, 4, 32, 32))
    with pytest.raises(AssertionError, match="16, 16"):
        model(torch.zeros(1, 3, 16, 16))
    with pytest.raises(AssertionError, match="image"):
        model(torch.zeros(3, 32, 32))
    with pytest.raises(AssertionError, match="113"):
        model.decode(torch.zeros(1, 113))
    coeffs = model.decode(torch.zeros(1, 114))
    del coeffs["cam"]
    with pytest.raises(AssertionError, match="coefficients"):
        model.encode(coeffs)
    coeffs = model.decode(torch.zeros(1, 114))
    coeffs["light"] = torch.zeros(1, 27)
    with pytest.raises(AssertionError, match="light"):
        model.encode(coeffs)


@pytest.mark.parametrize("overrides, word", [
    (dict(norm_groups=3), "norm_groups"),
    (dict(n_exp=0), "n_exp"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(image_size=-1), "image_size"),
    (dict(init_cam_scale=0.0), "init_cam_scale"),
])
def test_estimator_config_validation(overrides, word):
    with pytest.raises(ValueError, match=word):
        tiny_estimator_cfg(**overrides)


def test_identity_config_validation():
    with pytest.raises(ValueError, match="embedding_dim"):
        tiny_identity_cfg(embedding_dim=0)
    with pytest.raises(ValueError, match="norm_groups"):
        tiny_identity_cfg(norm_groups=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_embeddings_unit_norm(dtype):
    torch.manual_seed(0)
    encoder = IdentityEncoder(tiny_identity_cfg(image_size=18)).to(dtype)  # odd sides round up
    emb = encoder(torch.rand(3, 3, 18, 18, dtype=dtype) * 2 - 1)
    assert emb.shape == (3, 16)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert torch.allclose(emb.norm(dim=1), torch.ones(3, dtype=dtype), atol=tol)
    with pytest.raises(AssertionError, match="32, 32"):
        encoder(torch.zeros(1, 3, 32, 32, dtype=dtype))
    with pytest.raises(AssertionError, match="image"):
        encoder(torch.zeros(1, 1, 18, 18, dtype=dtype))


def head_with_angles(class_angles, norms, s, m):
    """2-D ArcMarginHead whose class j points at class_angles[j], with arbitrary norms."""
    head = ArcMarginHead(2, len(class_angles), s=s, m=m).double()
    with torch.no_grad():
        for j, (phi, r) in enumerate(zip(class_angles, norms)):
            head.weight[j] = torch.tensor([r * math.cos(phi), r * math.sin(phi)],
                                          dtype=torch.float64)
    return head


def test_arc_margin_logits_match_closed_form():
    s, m = 64.0, 0.5
    class_angles = [0.0, 1.0, 2.5]
    head = head_with_angles(class_angles, [0.3, 2.0, 5.0], s, m)
    alphas = [0.2, 1.3, 1.9]
    emb = torch.tensor([[3.0 * math.cos(a), 3.0 * math.sin(a)] for a in alphas],
                       dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    logits = head(emb, labels)
    for b, a in enumerate(alphas):
        for j, phi in enumerate(class_angles):
            # independent angle: acos of the dot product of unit vectors
            theta = math.acos(math.cos(a) * math.cos(phi) + math.sin(a) * math.sin(phi))
            if j == labels[b]:
                assert theta + m <= math.pi
                expected = s * math.cos(theta + m)
            else:
                expected = s * math.cos(theta)
            assert math.isclose(logits[b, j].item(), expected, rel_tol=1e-12, abs_tol=1e-10)


def test_arc_margin_fallback_and_monotonic():
    s, m = 64.0, 0.5
    head = head_with_angles([0.0, math.pi / 2], [1.0, 1.0], s, m)
    thetas = torch.linspace(0.0, math.pi, 401, dtype=torch.float64)
    emb = torch.stack([thetas.cos(), thetas.sin()], dim=1)  # class 0 at angle 0: θ = alpha
    target = head(emb, torch.zeros(401, dtype=torch.long))[:, 0] / s
    for theta, value in zip(thetas.tolist(), target.tolist()):
        if theta + m > math.pi + 1e-12:
            expected = math.cos(theta) - m * math.sin(m)
        else:
            expected = math.cos(theta + m)
        assert math.isclose(value, expected, abs_tol=1e-12)
    assert (target[1:] < target[:-1]).all()
    # in the fallback region the raw cos(θ + m) would increase with θ: the reason for the fallback
    assert math.cos(3.1 + m) > math.cos(3.0 + m)
    assert target[-1].item() < target[-2].item() < -1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arc_margin_gradient_finite_at_zero_angle(dtype):
    head = ArcMarginHead(2, 2, s=64.0, m=0.5).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=dtype))
    emb = torch.tensor([[2.0, 0.0], [0.6, 0.8]], dtype=dtype, requires_grad=True)
    labels = torch.tensor([0, 1])
    logits = head(emb, labels)
    assert logits[0, 0].item() == pytest.approx(64.0 * math.cos(0.5))  # cos θ = 1 exactly
    F.cross_entropy(logits, labels).backward()
    assert torch.isfinite(emb.grad).all()
    assert torch.isfinite(head.weight.grad).all()


def test_arc_margin_gradcheck_generic_angles():
    torch.manual_seed(0)
    head = ArcMarginHead(4, 3, s=8.0, m=0.3).double()
    emb = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 1, 0])
    assert torch.autograd.gradcheck(lambda e: head(e, labels), (emb,))


def test_arc_margin_rejects_bad_settings_and_inputs():
    head = ArcMarginHead(4, 3)
    with pytest.raises(RuntimeError):  # label 3 of 3 classes: out of range for gather
        head(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(RuntimeError):  # embeddings of the wrong size
        head(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(AssertionError):
        head(torch.randn(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="margin m=2.0"):
        ArcMarginHead(4, 3, m=2.0)
    with pytest.raises(ValueError, match="scale s=0.0"):
        ArcMarginHead(4, 3, s=0.0)
    with pytest.raises(ValueError, match="n_classes=1"):
        ArcMarginHead(4, 1)


def test_csim():
    torch.manual_seed(0)
    a = torch.randn(4, 8, dtype=torch.float64)
    ones = torch.ones(4, dtype=torch.float64)
    assert torch.allclose(csim(a, a), ones, atol=1e-12)
    assert torch.allclose(csim(a, -3.0 * a), -ones, atol=1e-12)
    e0 = torch.tensor([[1.0, 0.0]])
    e1 = torch.tensor([[0.0, 2.0]])
    assert csim(e0, e1).tolist() == [0.0]
    expected = (a[:, :4] * a[:, 4:]).sum(1) / (a[:, :4].norm(dim=1) * a[:, 4:].norm(dim=1))
    assert torch.allclose(csim(a[:, :4], a[:, 4:]), expected, atol=1e-12)
    with pytest.raises(AssertionError):
        csim(a, a[:, :3])

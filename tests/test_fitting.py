"""fitting/fit.py: the photometric loss against its closed form, and the fit through the renderer
recovering a head rotation it was not given, on a synthetic render whose coefficients are known;
DiffFAE.fit_coefficients and edit(refine_steps) on the bundled model."""
import math

import pytest
import torch
from torch.utils.data import default_collate

from tools import explain
from training import metrics
from runtime.checkpoint import load_model
from runtime.cli import DEFAULT_CHECKPOINT
from difffae import render_face
from flame import FLAME
from fitting.fit import FITTED, photometric_loss, refine
from layers import FACE
from render import Renderer
from assets.synthetic import SyntheticPortraits, true_coefficients


def test_photometric_loss_is_the_weighted_mean_absolute_error():
    rendered = torch.zeros(1, 3, 2, 2)
    images = torch.zeros(1, 3, 2, 2)
    images[0, :, 0, 0] = torch.tensor([0.3, -0.6, 0.9])  # |error| sums to 1.8 at pixel (0, 0)
    images[0, :, 1, 1] = 5.0                              # a pixel of weight 0
    render_mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    face = torch.tensor([[[[0.5, 1.0], [1.0, 1.0]]]])
    # w = (0.5, 1, 0, 0): Σ w·|e| = 0.5 · 1.8, over 3 · Σ w = 4.5
    expected = 0.5 * 1.8 / 4.5
    assert math.isclose(float(photometric_loss(rendered, render_mask, images, face)), expected,
                        rel_tol=1e-6)
    assert float(photometric_loss(rendered, render_mask * 0, images, face)) == 0.0
    # per image: the second image's error is 0.9 at the same weights, the batch's is pooled
    pair = (torch.cat([rendered] * 2), torch.cat([render_mask] * 2),
            torch.cat([images, images / 2]), torch.cat([face] * 2))
    assert torch.allclose(photometric_loss(*pair, per_image=True),
                          torch.tensor([expected, expected / 2]))
    assert math.isclose(float(photometric_loss(*pair)), 0.75 * expected, rel_tol=1e-6)


@pytest.fixture(scope="module")
def scene():
    """Four held-out synthetic faces at 32 px with their exact coefficients, FLAME and the
    renderer, and the true face masks."""
    data = SyntheticPortraits(32, "test", length=4)
    batch = default_collate(data.__getitems__(range(4)))
    flame = FLAME()
    renderer = Renderer(flame.faces, flame.face_uvs, 32, cull_backfaces=True)
    face = (batch["source_regions"] == FACE)[:, None].float()
    return batch, true_coefficients(batch, "source"), face, lambda c: render_face(flame,
                                                                                 renderer, c)


def test_no_steps_returns_the_reading(scene):
    batch, truth, face, render = scene
    losses = []
    fitted = refine(truth, batch["source"], face, render, steps=0, losses=losses)
    assert fitted.keys() == truth.keys()
    assert all(torch.equal(fitted[k], truth[k]) for k in truth) and len(losses) == 1


def test_the_fit_recovers_a_head_turn_and_keeps_the_expression(scene):
    batch, truth, face, render = scene
    turned = {k: v.clone() for k, v in truth.items()}
    turned["pose"][:, 1] += math.radians(6)  # 6° of yaw the reading gets wrong
    turned["albedo"] = torch.zeros_like(truth["albedo"])  # and an average skin
    losses = []
    fitted = refine(turned, batch["source"], face, render, steps=80, losses=losses)
    before = metrics.rotation_error(turned["pose"], truth["pose"])
    after = metrics.rotation_error(fitted["pose"], truth["pose"])
    assert torch.allclose(before, torch.full((4,), 6.0, dtype=before.dtype), atol=0.3)
    assert (after < 0.5 * before).all(), after  # 1.4°, 1.2°, 0.3°, 0.6° when written
    assert losses[-1] < 0.7 * losses[0], losses
    assert torch.equal(fitted["expression"], turned["expression"])  # not fitted
    assert torch.equal(fitted["pose"][:, 3:], turned["pose"][:, 3:])  # the jaw is kept
    assert set(FITTED) <= {k for k in truth if not torch.equal(fitted[k], turned[k])}


def test_each_image_is_fitted_as_if_alone(scene):
    """Fitted together or two by two, the four faces get the same coefficients."""
    batch, truth, face, render = scene
    turned = {k: v.clone() for k, v in truth.items()}
    turned["pose"][:, 1] += math.radians(6)
    together = refine(turned, batch["source"], face, render, steps=5)
    halves = [refine({k: v[part] for k, v in turned.items()}, batch["source"][part],
                     face[part], render, steps=5) for part in (slice(0, 2), slice(2, 4))]
    for k in together:
        assert torch.allclose(together[k], torch.cat([half[k] for half in halves]), atol=1e-5)
    assert not torch.allclose(together["pose"], turned["pose"])


def test_the_model_refines_its_own_reading():
    model = load_model(DEFAULT_CHECKPOINT).eval()
    data = SyntheticPortraits(model.image_size, "test", length=2)
    batch = default_collate(data.__getitems__(range(2)))
    source, query = batch["source"], batch["query"]
    with torch.no_grad():
        reading = model.estimator(query)
    unrefined = model.fit_coefficients(query, steps=0)
    assert all(torch.equal(unrefined[k], reading[k]) for k in reading)
    losses = []
    model.fit_coefficients(query, steps=5, losses=losses)
    assert len(losses) == 6 and losses[-1] < losses[0]
    # the bundle was trained on refined renders: its edits refine as many steps by default
    assert model.diffusion.render_from == "refined"
    assert model.default_refine_steps == model.diffusion.refine_steps > 0
    plain = model.edit(source, query, steps=2)
    same = model.edit(source, query, steps=2, refine_steps=model.diffusion.refine_steps)
    assert torch.equal(plain["image"], same["image"])
    raw_trace, trace = {}, {}
    raw = model.edit(source, query, steps=2, refine_steps=0, trace=raw_trace)
    assert raw_trace["unrefined_render"] is None and raw_trace["fit_losses"] == []
    assert not torch.equal(raw["coefficients"]["pose"], plain["coefficients"]["pose"])
    refined = model.edit(source, query, steps=2, refine_steps=3, trace=trace)
    # the trace holds I_R as the estimator alone drew it: the unrefined edit's
    assert torch.equal(trace["unrefined_render"], raw["render"])
    assert len(trace["fit_losses"]) == 4
    plain_figure = explain.figure(model, {**trace, "unrefined_render": None}, refined, source,
                                  query)
    figure = explain.figure(model, trace, refined, source, query)  # one more line in row 1
    assert figure.height > plain_figure.height and figure.width == plain_figure.width

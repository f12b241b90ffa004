"""Analysis by synthesis: the estimator's coefficients refined through the differentiable renderer.

DECA (Feng et al., SIGGRAPH 2021, Eq. 8) trains its encoder with a photometric loss between the
image and its rendering, and classic 3DMM fitting (Blanz & Vetter 1999) refines a reading of a
face by descending the same loss. Here the estimator's reading ĉ is the starting point and the
region encoder's face slot says which pixels are skin, so no face parser is needed:

    L_pho(c) = Σ_p w_p Σ_ch |I_R(c)(p, ch) − I(p, ch)| / (3 Σ_p w_p),    w = M_R ⊙ M_face

M_R is the render's own mask (the pixels the head covers) and M_face the face slot's mask (soft,
at image size). Their product is used because neither alone will do: the render's mask also
covers skin that the image hides under a fringe, and the face slot also covers skin that the
render misses, where I_R is black and the error is constant (a hard rasterizer gives it no
gradient). The true face region instead of the slot's changed the fitted face's PSNR by 0.1 dB
on 32 held-out pairs (docs/fitting.md), so the slot's mask costs nothing measurable.

The fit descends, with Adam, offsets δ_k measured in each coefficient group's spread s_k in
the data (estimator.COEFFICIENT_SCALE), so that one learning rate suits radians, metres and SH
light alike, under a Gaussian prior centred on the reading:

    c_k = ĉ_k + s_k · δ_k,    L(δ) = L_pho(c) + λ · Σ_k mean(δ_k²)

Fitted: shape β, albedo α, the global head rotation, the camera and the SH light. The jaw and
the expression ψ keep the estimator's reading: through this loss they got worse, not better
(expression 0.63 → 1.2–1.5 mm of mesh, jaw 1.3° → 2.1–3.1° in 30 steps; docs/fitting.md). At
64 px the mouth and the eyes are a few pixels across, and many expression directions move no
pixel of the face at all, so the photometric loss alone does not pin them down; DECA adds
landmarks for that.

Shape letters: B batch, H/W image size, P the coefficients of one group.
"""
import torch

from estimator import COEFFICIENT_SCALE

FITTED = ("shape", "albedo", "pose", "cam", "light")  # the pose's jaw columns are kept (above)
GLOBAL_ROTATION = slice(0, 3)  # pose6 = [global rotation 3, jaw 3]
FIT_LR = 0.05     # Adam's step, in units of each group's spread s_k (chosen in docs/fitting.md)
FIT_PRIOR = 0.01  # λ: the pull towards the estimator's reading


def photometric_loss(rendered, render_mask, images, face, per_image=False):
    """L_pho of the module docstring: the mean |I_R − I| over the pixels of weight
    w = render_mask · face (both (B, 1, H, W), in [0, 1]) and the 3 colours; rendered and
    images (B, 3, H, W). A scalar over the whole batch, or with per_image one per image (B,);
    0 where no pixel has weight."""
    assert rendered.shape == images.shape, f"{tuple(rendered.shape)} vs {tuple(images.shape)}"
    weight = render_mask * face  # (B, 1, H, W)
    error = (rendered - images).abs() * weight
    dims = (1, 2, 3) if per_image else (0, 1, 2, 3)
    return error.sum(dims) / (3 * weight.sum(dims)).clamp(min=1e-8)


def fittable(coefficients):
    """The coefficients with the jaw and the expression detached, so that a photometric loss
    through them moves only what the fit moves (FITTED; the module docstring says why). The
    estimator stage's loss on frames without coefficients goes through it."""
    pose = coefficients["pose"]  # (B, 6)
    pose = torch.cat([pose[:, GLOBAL_ROTATION], pose[:, GLOBAL_ROTATION.stop:].detach()], dim=1)
    kept = {k: v.detach() for k, v in coefficients.items() if k not in FITTED}
    return {**coefficients, **kept, "pose": pose}


def refine(estimates, images, face, render, steps, lr=FIT_LR, prior=FIT_PRIOR, losses=None):
    """The reading `estimates` (the estimator's dict) refined by `steps` Adam steps on L(δ) for
    `images` (B, 3, H, W) with face masks `face` (B, 1, H, W); `render(coefficients)` returns
    (I_R, M_R) as difffae.render_face does. steps = 0 returns the reading unchanged. The
    result has the estimator's keys and shapes, detached. Each image has its own L(δ), summed
    over the batch, so that its fit does not depend on the images fitted beside it. `losses`,
    a list, receives L_pho (the mean over the images) before each step and after the last."""
    scale = {k: torch.as_tensor(v, dtype=images.dtype, device=images.device)
             for k, v in COEFFICIENT_SCALE.items()}
    reading = {k: v.detach() for k, v in estimates.items()}
    delta = {k: torch.zeros_like(reading[k], requires_grad=True) for k in FITTED}
    keep = torch.zeros_like(reading["pose"])
    keep[:, GLOBAL_ROTATION] = 1  # the jaw's offset stays 0

    def coefficients():
        moved = {k: reading[k] + scale[k] * d for k, d in delta.items()}
        moved["pose"] = reading["pose"] + scale["pose"] * delta["pose"] * keep
        return {**reading, **moved}

    optimizer = torch.optim.Adam(delta.values(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = photometric_loss(*render(coefficients()), images, face, per_image=True)
            if losses is not None:
                losses.append(float(loss.detach().mean()))
            total = loss.sum() + prior * sum(d.pow(2).flatten(1).mean(1).sum()
                                             for d in delta.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
    with torch.no_grad():
        fitted = coefficients()
        if losses is not None:
            losses.append(float(photometric_loss(*render(fitted), images, face,
                                                 per_image=True).mean()))
    return fitted

"""The fit: the estimator's reading refined until its render lands on the face (not in the paper).

DiffFAE (Wang et al. 2024, Eq. 3) renders I_R from DECA's reading as it is. A reading a few
degrees or a pixel off draws the eyes and the mouth beside the image's, and the generator learns
to blur what it cannot trust. Two fits of classic 3DMM analysis by synthesis (Blanz & Vetter
1999) bring it back, each descending a loss from the reading ĉ, as DECA trains its encoder with
the same two terms (Feng et al., SIGGRAPH 2021, Eq. 7 and 8):

1. Landmarks (with a detector, fitting/landmarks.py): the projected landmark vertices onto the
   detected ones,
       L_lmk(c) = mean_k ‖π(V_k(c)) − l̂_k‖² / σ²,    σ = LANDMARK_SIGMA pixels,
   moving the head's rotation, the camera, the shape and the expression. It puts I_R within a
   pixel of the face from wherever the estimator left it.
2. Photometric: the render against the image on the face's pixels,
       L_pho(c) = Σ_p w_p Σ_ch |I_R(c)(p, ch) − I(p, ch)| / (3 Σ_p w_p),    w = M_R ⊙ M_face
   moving the shape, the albedo, the head's rotation, the camera and the SH light. M_R is the
   render's own mask, M_face the region encoder's face slot (soft, at image size): the render's
   mask also covers skin that a fringe hides, and the face slot skin that the render misses,
   where I_R is black and a hard rasterizer gives no gradient. The true face region instead of
   the slot's changed the fitted face's PSNR by 0.1 dB on 32 held-out pairs (docs/fitting.md).

Each fit descends, with Adam, offsets δ_k measured in each coefficient group's spread s_k in the
data (estimator.COEFFICIENT_SCALE), so that one learning rate suits radians, metres and SH light,
under a Gaussian prior centred on the reading:

    c_k = ĉ_k + s_k · δ_k,    L(δ) = L_term(c) + λ · Σ_k mean(δ_k²)

The jaw keeps the estimator's reading in both, and the expression in the photometric one:
through the photometric loss they got worse (expression 0.63 → 1.2–1.5 mm of mesh, jaw 1.3° →
2.1–3.1° in 30 steps), and through the landmarks the jaw did (1.3° → 2.6°); at 64 px the mouth
is a few pixels across. All choices and their measurements are in docs/fitting.md.

Shape letters: B batch, K landmarks, H/W image height/width.
"""
import torch

from estimator import COEFFICIENT_SCALE

FITTED = ("shape", "albedo", "pose", "cam", "light")  # by the photometric fit
LANDMARK_FITTED = ("shape", "expression", "pose", "cam")  # by the landmark fit
GLOBAL_ROTATION = slice(0, 3)  # pose6 = [global rotation 3, jaw 3]; the jaw is kept
FIT_LR = 0.05     # Adam's step, in units of each group's spread s_k (docs/fitting.md)
FIT_PRIOR = 0.01  # λ of the photometric fit: the pull towards the reading
LANDMARK_PRIOR = 0.1  # λ of the landmark fit
LANDMARK_SIGMA = 2.0  # pixels: the detector's typical error
LANDMARK_STEPS = 50   # before the photometric steps, when there are landmarks


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


def landmark_loss(located, detected):
    """L_lmk of the module docstring per image (B,): located, detected (B, K, 2) pixels."""
    return (located - detected).pow(2).sum(-1).mean(1) / LANDMARK_SIGMA ** 2


def fittable(coefficients):
    """The coefficients with the jaw and the expression detached, so that a photometric loss
    through them moves only what the photometric fit moves (FITTED). The estimator stage's loss
    on frames without coefficients goes through it."""
    pose = coefficients["pose"]  # (B, 6)
    pose = torch.cat([pose[:, GLOBAL_ROTATION], pose[:, GLOBAL_ROTATION.stop:].detach()], dim=1)
    kept = {k: v.detach() for k, v in coefficients.items() if k not in FITTED}
    return {**coefficients, **kept, "pose": pose}


def descend(reading, groups, loss, steps, lr, prior, losses=None):
    """`reading` (the estimator's dict, detached) moved by `steps` Adam steps on L(δ) of the
    module docstring, δ over `groups` (the jaw's offset held at 0); `loss(coefficients)` gives
    L_term per image (B,). Each image has its own L(δ), summed over the batch, so that its fit
    does not depend on the images fitted beside it. `losses`, a list, receives the mean L_term
    before each step."""
    like = reading["pose"]
    scale = {k: torch.as_tensor(COEFFICIENT_SCALE[k], dtype=like.dtype, device=like.device)
             for k in groups}
    delta = {k: torch.zeros_like(reading[k], requires_grad=True) for k in groups}
    keep = torch.zeros_like(like)
    keep[:, GLOBAL_ROTATION] = 1

    def coefficients():
        moved = {k: reading[k] + scale[k] * d for k, d in delta.items()}
        if "pose" in delta:
            moved["pose"] = reading["pose"] + scale["pose"] * delta["pose"] * keep
        return {**reading, **moved}

    optimizer = torch.optim.Adam(delta.values(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            term = loss(coefficients())
            if losses is not None:
                losses.append(float(term.detach().mean()))
            total = term.sum() + prior * sum(d.pow(2).flatten(1).mean(1).sum()
                                             for d in delta.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
    with torch.no_grad():
        return coefficients()


def refine(estimates, images, face, render, steps, landmarks=None, lr=FIT_LR, prior=FIT_PRIOR,
           losses=None):
    """The reading `estimates` (the estimator's dict) of `images` (B, 3, H, W) with face masks
    `face` (B, 1, H, W) refined: with `landmarks` = (detected (B, K, 2), locate), where
    locate(coefficients) projects the same K vertices, first LANDMARK_STEPS steps of the
    landmark fit, then `steps` of the photometric fit; `render(coefficients)` returns (I_R, M_R)
    as difffae.render_face does. steps = 0 returns the reading unchanged. The result has the
    estimator's keys and shapes, detached. `losses`, a list, receives L_pho (the mean over the
    images) before each photometric step and after the last."""
    reading = {k: v.detach() for k, v in estimates.items()}
    if steps == 0 and losses is None:
        return reading
    if landmarks is not None and steps:
        detected, locate = landmarks
        reading = descend(reading, LANDMARK_FITTED, lambda c: landmark_loss(locate(c), detected),
                          LANDMARK_STEPS, lr, LANDMARK_PRIOR)

    def photometric(coefficients):
        return photometric_loss(*render(coefficients), images, face, per_image=True)

    fitted = descend(reading, FITTED, photometric, steps, lr, prior, losses)
    if losses is not None:
        with torch.no_grad():
            losses.append(float(photometric(fitted).mean()))
    return fitted

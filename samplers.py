"""The diffusion schedule and the samplers of DiffFAE (difffae.py), as pure functions: device
and dtype come from the inputs.

Schedule: LDM's scaled-linear β, √β evenly spaced from √β_start to √β_end over T steps
(Rombach et al. 2022), ᾱ_t = Π_{s≤t} (1 − β_s).
Samplers, each from x_T at the first timestep down to the clean sample:
    DDIM (Song et al. 2021, Eq. 12), with x̂_0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t:
        x_prev = √ᾱ_prev·x̂_0 + √(1−ᾱ_prev−σ_t²)·ε + σ_t·z,
        σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev)
    DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), α_t = √ᾱ_t, σ_t = √(1−ᾱ_t), λ = log(α/σ),
    h_i = λ_{i+1} − λ_i, r = h_{i−1}/h_i:
        D_i = (1 + 1/(2r))·x̂_0,i − 1/(2r)·x̂_0,i−1       (first step: D_0 = x̂_0,0)
        x_{i+1} = (σ_{i+1}/σ_i)·x_i − α_{i+1}·(e^{−h_i} − 1)·D_i
    The last step goes to ᾱ = 1, where both samplers return x̂_0 (a first-order step).
Each sampler is one function of one signature, sampler(model_fn, x_T, alphas_cumprod, timesteps,
callback=None, eta=0.0, generator=None), handing each step's state to `callback` (the shape of
k-diffusion's samplers); SAMPLERS names them.
Timesteps are "trailing" (Lin et al. 2024, Table 2): t_i = round(T−1 − i·T/steps), so sampling
starts at the noisiest step t = T−1.
What the network predicts (DiffusionConfig.prediction): the samplers take ε̂, and
eps_from_prediction makes it from a prediction of ε, of v = √ᾱ·ε − √(1−ᾱ)·x_0 (Salimans & Ho
2022) or of x_0. With unit-variance data, EDM's preconditioning (Karras et al. 2022, Table 1,
σ_data = 1, σ = √((1−ᾱ)/ᾱ), x = x_t/√ᾱ) is v-prediction: c_in·x = x_t, c_skip·x = √ᾱ·x_t,
c_out = √(1−ᾱ), so x̂_0 = √ᾱ·x_t − √(1−ᾱ)·v̂ with F = −v, and its loss weight 1/c_out² is
the plain v-loss; what remains of EDM is its log-normal draw of the training noise levels.

Letters: x latents of any shape, T timesteps.
"""
import math

import torch


def scaled_linear_alphas_cumprod(timesteps, beta_start, beta_end):
    """ᾱ_t = Π_{s≤t} (1 − β_s), t = 0..T−1, with √β linear in t (LDM). Returns (T,) float64."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def make_timesteps(steps, timesteps):
    """Descending "trailing" timesteps t_i = round(T−1 − i·T/steps), i < steps."""
    assert 1 <= steps <= timesteps, f"steps={steps}: expected 1..{timesteps}"
    return [round(timesteps - 1 - i * timesteps / steps) for i in range(steps)]


def _scalar(value, like):
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def predict_x0(x_t, eps, alpha_bar_t):
    """x̂_0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t (DDIM Eq. 12, "predicted x_0")."""
    alpha_bar_t = _scalar(alpha_bar_t, x_t)
    return (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


def eps_from_prediction(output, x_t, alpha_bar_t, prediction):
    """ε̂ from what the network predicted at x_t: ε itself ("eps", returned as it is); v ("v"):
    ε̂ = √ᾱ·v̂ + √(1−ᾱ)·x_t; or x_0 ("x0"): ε̂ = (x_t − √ᾱ·x̂_0)/√(1−ᾱ), in x_t's precision.
    alpha_bar_t: a number or a tensor that broadcasts against x_t."""
    assert prediction in PREDICTIONS, f"prediction {prediction!r}: expected one of {PREDICTIONS}"
    if prediction == "eps":
        return output
    alpha_bar_t, output = _scalar(alpha_bar_t, x_t), output.to(x_t.dtype)
    if prediction == "v":
        return alpha_bar_t.sqrt() * output + (1 - alpha_bar_t).sqrt() * x_t
    return (x_t - alpha_bar_t.sqrt() * output) / (1 - alpha_bar_t).sqrt()


def loss_weight(alpha_bar_t, prediction, min_snr_gamma=0.0, snr_floor=0.0):
    """w_t of the loss w_t·‖ε̂ − ε‖² (alpha_bar_t a tensor). γ = 0: the plain loss of what is
    predicted, ‖ε̂ − ε‖² (w = 1), ‖v̂ − v‖² = ‖ε̂ − ε‖²/ᾱ or ‖x̂_0 − x_0‖² = ‖ε̂ − ε‖²/SNR,
    SNR = ᾱ/(1−ᾱ). γ > 0 (Min-SNR, Hang et al. 2023): the x̂_0 error weighted by
    clamp(SNR, floor, γ), w = clamp(SNR, floor, γ)/SNR, whatever is predicted."""
    snr = alpha_bar_t / (1 - alpha_bar_t)
    if min_snr_gamma > 0:
        return snr.clamp(min=snr_floor, max=min_snr_gamma) / snr
    return {"eps": torch.ones_like(snr), "v": 1 / alpha_bar_t, "x0": 1 / snr}[prediction]


def ddim_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta=0.0, noise=None):
    """One DDIM step (Song et al. 2021, Eq. 12) from ᾱ_t to ᾱ_prev; eta = 0 is deterministic,
    eta = 1 is DDPM's ancestral step with σ_t² = β̃_t. `noise` defaults to fresh N(0, I)."""
    alpha_bar_t, alpha_bar_prev = _scalar(alpha_bar_t, x_t), _scalar(alpha_bar_prev, x_t)
    x0 = predict_x0(x_t, eps, alpha_bar_t)
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t)).sqrt() \
        * (1 - alpha_bar_t / alpha_bar_prev).clamp(min=0).sqrt()
    direction = (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps  # "pointing to x_t"
    x_prev = alpha_bar_prev.sqrt() * x0 + direction
    if eta > 0:
        x_prev = x_prev + sigma * (torch.randn_like(x_t) if noise is None else noise)
    return x_prev


def _checked(alphas_cumprod, timesteps, eta):
    """ᾱ at each timestep and 1 after the last (the clean sample), after checking the list."""
    assert 0 <= eta <= 1, f"eta={eta}: expected 0..1"
    assert all(a > b for a, b in zip(timesteps, timesteps[1:])) and timesteps \
        and 0 <= timesteps[-1] and timesteps[0] < len(alphas_cumprod), timesteps
    return [float(alphas_cumprod[t]) for t in timesteps] + [1.0]


def _denoised(model_fn, x, t, alpha_bar, i, callback):
    """ε̂ and x̂_0 at step i, handed to the callback with the state x: (ε̂, x̂_0)."""
    eps = model_fn(x, t).to(x.dtype)  # the arithmetic in x's precision, even for a bf16 ε
    x0 = predict_x0(x, eps, alpha_bar)
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "eps": eps, "x0": x0})
    return eps, x0


def sample_ddim(model_fn, x, alphas_cumprod, timesteps, callback=None, eta=0.0, generator=None):
    """DDIM (Song et al. 2021, Eq. 12) from x = x_T at timesteps[0] down to the clean sample.

    model_fn(x, t) returns the predicted noise ε̂ at integer timestep t; timesteps is a
    descending list of ints indexing alphas_cumprod (T,); callback, if given, receives a dict
    per step {"i", "t", "x" (the state at t), "eps" ε̂, "x0" x̂_0}; eta as in ddim_step, its
    noise drawn from `generator`.
    """
    alpha_bar = _checked(alphas_cumprod, timesteps, eta)
    for i, t in enumerate(timesteps):
        eps, _ = _denoised(model_fn, x, t, alpha_bar[i], i, callback)
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = ddim_step(x, eps, alpha_bar[i], alpha_bar[i + 1], eta, noise)
    return x


def sample_dpmpp_2m(model_fn, x, alphas_cumprod, timesteps, callback=None, eta=0.0,
                    generator=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), as sample_ddim; deterministic: eta must be 0
    and `generator` is not used."""
    assert eta == 0, f"eta={eta}: DPM-Solver++(2M) is deterministic, expected 0"
    alpha_bar = _checked(alphas_cumprod, timesteps, eta)
    previous_x0, previous_h = None, None
    for i, t in enumerate(timesteps):
        _, x0 = _denoised(model_fn, x, t, alpha_bar[i], i, callback)
        if alpha_bar[i + 1] >= 1.0:  # the step to σ = 0 (λ = ∞) is first order: x = x̂_0
            return x0
        lam, lam_next = (0.5 * math.log(a / (1 - a)) for a in alpha_bar[i:i + 2])  # λ = log(α/σ)
        h = lam_next - lam
        if previous_x0 is None:
            data = x0
        else:
            r = previous_h / h
            data = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
        sigma, sigma_next = math.sqrt(1 - alpha_bar[i]), math.sqrt(1 - alpha_bar[i + 1])
        x = (sigma_next / sigma) * x - math.sqrt(alpha_bar[i + 1]) * math.expm1(-h) * data
        previous_x0, previous_h = x0, h
    return x


PREDICTIONS = ("eps", "v", "x0")  # what the network may predict (eps_from_prediction)
# The samplers by name (DiffusionConfig.sampler, sample.py --sampler): one signature,
# sampler(model_fn, x_T, alphas_cumprod, timesteps, callback=None, eta=0.0, generator=None).
SAMPLERS = {"ddim": sample_ddim, "dpm++2m": sample_dpmpp_2m}

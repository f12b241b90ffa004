"""Tests for the schedule and samplers (samplers.py) and the coefficient editing of difffae.py:

Toy data x_0 ~ N(MU, S²) per dimension has a closed-form optimal noise prediction
    ε*(x, t) = √(1−ᾱ_t)·(x − √ᾱ_t·MU) / v_t,   v_t = ᾱ_t·S² + 1 − ᾱ_t = Var[x_t],
and its probability-flow ODE maps quantiles linearly between marginals:
    x_s = √ᾱ_s·MU + √(v_s/v_t)·(x_t − √ᾱ_t·MU)   (ᾱ_s = 1 gives the clean sample).
Checked against these and other closed forms:
- predict_x0 with ε* is the Gaussian posterior mean E[x_0 | x_t];
- ddim_step with η = 1 is DDPM's ancestral step (Ho et al. 2020, Alg. 2) and, between any two
  steps, a draw from the posterior q(x_s | x_t, x̂_0) (Ho et al. Eq. 6-7); η = 0 is
  √ᾱ_prev·x̂_0 + √(1−ᾱ_prev)·ε;
- sample_ddim with η = 1 over all T steps: sample mean and variance equal the moments of the
  linear-Gaussian DDPM chain, propagated analytically;
- both samplers converge to the exact PF-ODE solution; on a grid uniform in λ = log(α/σ) DDIM is
  first order and DPM-Solver++(2M) second order (Lu et al. 2022), measured against the exact
  flow to the last timestep followed by the exact final x̂_0 step; DPM-Solver++'s first step
  is DDIM's;
- eps_from_prediction turns the optimal v = √ᾱ·ε − √(1−ᾱ)·x_0 and the optimal x̂_0 (the
  posterior mean) into the optimal ε; loss_weight makes w·‖ε̂ − ε‖² the plain v- and x_0-losses,
  or the x̂_0 error weighted by clamp(SNR, floor, γ);
- dtypes are kept; make_timesteps, the scaled-linear schedule (β recovered from ᾱ ratios), the
  samplers' asserts and DiffusionConfig's checks;
- combine_coefficients takes exactly the query's keys of each attribute (DiffFAE Eq. 3);
  set_numbers' Euler angles give R = R_y(yaw)·R_x(pitch)·R_z(roll) (built here from elementary
  rotations and Rodrigues' formula), and its jaw, light and expression edits.
"""
import itertools
import math

import pytest
import torch

from flame import head_pose_degrees
from difffae import DiffusionConfig
from difffae import EDIT_ATTRIBUTES, combine_coefficients, set_numbers
from samplers import (SAMPLERS, ddim_step, eps_from_prediction, loss_weight, make_timesteps,
                      predict_x0, sample_ddim, sample_dpmpp_2m, scaled_linear_alphas_cumprod)
from assets.head import EXPRESSION_NAMES

T = 1000
BETA_START, BETA_END = 0.00085, 0.012
AB = scaled_linear_alphas_cumprod(T, BETA_START, BETA_END)  # (T,) float64
AB_LIST = AB.tolist()
MU, S = 0.5, 0.3


# ---------------------------------------------------------------------------------------------
# The Gaussian toy problem
# ---------------------------------------------------------------------------------------------

def marginal_var(alpha_bar):
    """Var[x_t] = ᾱ·S² + 1 − ᾱ."""
    return alpha_bar * S * S + 1 - alpha_bar


def gaussian_eps(x, t):
    """The optimal ε(x_t, t) = E[ε | x_t] for x_0 ~ N(MU, S²)."""
    a = AB_LIST[t]
    return math.sqrt(1 - a) * (x - math.sqrt(a) * MU) / marginal_var(a)


def pf_flow(x, alpha_bar_from, alpha_bar_to):
    """Exact probability-flow ODE solution from ᾱ_from to ᾱ_to (ᾱ_to = 1: the clean sample)."""
    scale = math.sqrt(marginal_var(alpha_bar_to) / marginal_var(alpha_bar_from))
    return math.sqrt(alpha_bar_to) * MU + scale * (x - math.sqrt(alpha_bar_from) * MU)


def posterior_mean_x0(x, alpha_bar):
    """E[x_0 | x_t] = MU + √ᾱ·S²·(x − √ᾱ·MU)/v_t (Gaussian conditioning)."""
    return MU + math.sqrt(alpha_bar) * S * S * (x - math.sqrt(alpha_bar) * MU) \
        / marginal_var(alpha_bar)


def test_toy_problem_closed_forms_are_consistent():
    # PF flow to ᾱ = 1 is the stated clean-sample formula; flows compose.
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    a0, a1, a2 = AB_LIST[999], AB_LIST[400], AB_LIST[30]
    clean = MU + S * (x - math.sqrt(a0) * MU) / math.sqrt(a0 * S * S + 1 - a0)
    torch.testing.assert_close(pf_flow(x, a0, 1.0), clean, rtol=0, atol=1e-14)
    torch.testing.assert_close(pf_flow(pf_flow(x, a0, a1), a1, a2), pf_flow(x, a0, a2),
                               rtol=0, atol=1e-13)


@pytest.mark.parametrize("t", [0, 1, 50, 500, 999])
def test_predict_x0_with_optimal_eps_is_the_posterior_mean(t):
    x = torch.linspace(-4, 4, 17, dtype=torch.float64)
    x0 = predict_x0(x, gaussian_eps(x, t), AB_LIST[t])
    torch.testing.assert_close(x0, posterior_mean_x0(x, AB_LIST[t]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("t", [0, 1, 50, 500, 999])
def test_v_and_x0_predictions_give_the_optimal_eps(t):
    x = torch.linspace(-4, 4, 17, dtype=torch.float64)
    a = AB_LIST[t]
    eps, x0 = gaussian_eps(x, t), posterior_mean_x0(x, a)
    v = math.sqrt(a) * eps - math.sqrt(1 - a) * x0  # Salimans & Ho 2022, §4
    for prediction, output in (("eps", eps), ("v", v), ("x0", x0)):
        torch.testing.assert_close(eps_from_prediction(output, x, a, prediction), eps,
                                   rtol=0, atol=1e-9)
    a_batch = AB[[t, 999 - t]].view(2, 1)  # a tensor ᾱ per row, as in training
    both = torch.stack([x, x])
    v_rows = torch.stack([v, math.sqrt(a_batch[1]) * gaussian_eps(x, 999 - t)
                          - math.sqrt(1 - a_batch[1]) * posterior_mean_x0(x, a_batch[1].item())])
    torch.testing.assert_close(eps_from_prediction(v_rows, both, a_batch, "v"),
                               torch.stack([eps, gaussian_eps(x, 999 - t)]), rtol=0, atol=1e-9)


@pytest.mark.parametrize("gamma, floor", [(0.0, 0.0), (5.0, 1.0)])
def test_loss_weight_is_the_plain_loss_of_each_target_or_the_weighted_x0_error(gamma, floor):
    generator = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 10, 300, 700, 999])
    a = AB[t].view(-1, 1)
    x0, eps, guess = (torch.randn(5, 8, generator=generator, dtype=torch.float64)
                      for _ in range(3))
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    x0_guess = predict_x0(x_t, guess, a)  # the x̂_0 and v̂ of the noise guess ε̂
    v, v_guess = (a.sqrt() * e - (1 - a).sqrt() * x for e, x in ((eps, x0), (guess, x0_guess)))
    error = (guess - eps).pow(2).mean(1)
    snr = (a / (1 - a)).flatten()
    plain = {"eps": error, "v": (v_guess - v).pow(2).mean(1), "x0": (x0_guess - x0).pow(2).mean(1)}
    for prediction, expected in plain.items():
        if gamma:  # Min-SNR: the x̂_0 error weighted by clamp(SNR, floor, γ)
            expected = (x0_guess - x0).pow(2).mean(1) * snr.clamp(min=floor, max=gamma)
        got = loss_weight(a.flatten(), prediction, gamma, floor) * error
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [1, 2, 10, 100, 500, 998, 999])
def test_ddim_eta1_step_is_ddpm_ancestral_step(t):
    g = torch.Generator().manual_seed(t)
    x, eps, z = torch.randn(3, 64, dtype=torch.float64, generator=g)
    ab_t, ab_prev = AB_LIST[t], AB_LIST[t - 1]
    alpha = ab_t / ab_prev
    beta = 1 - alpha
    sigma = math.sqrt((1 - ab_prev) / (1 - ab_t) * beta)
    ddpm = (x - beta / math.sqrt(1 - ab_t) * eps) / math.sqrt(alpha) + sigma * z
    out = ddim_step(x, eps, ab_t, ab_prev, eta=1.0, noise=z)
    torch.testing.assert_close(out, ddpm, rtol=0, atol=1e-10)
    # Alpha-bars given as float64 0-d tensors work the same.
    out = ddim_step(x, eps, AB[t], AB[t - 1], eta=1.0, noise=z)
    torch.testing.assert_close(out, ddpm, rtol=0, atol=1e-10)


@pytest.mark.parametrize("t, s", [(999, 998), (999, 899), (700, 300), (50, 0), (5, 1)])
def test_ddim_eta1_step_samples_the_ddpm_posterior_between_any_steps(t, s):
    g = torch.Generator().manual_seed(t + s)
    x, eps, z = torch.randn(3, 64, dtype=torch.float64, generator=g)
    ab_t, ab_s = AB_LIST[t], AB_LIST[s]
    alpha = ab_t / ab_s  # the (t | s) transition's α and β
    beta = 1 - alpha
    x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    mean = (math.sqrt(ab_s) * beta / (1 - ab_t)) * x0 \
        + (math.sqrt(alpha) * (1 - ab_s) / (1 - ab_t)) * x
    variance = (1 - ab_s) / (1 - ab_t) * beta
    out = ddim_step(x, eps, ab_t, ab_s, eta=1.0, noise=z)
    torch.testing.assert_close(out, mean + math.sqrt(variance) * z, rtol=0, atol=1e-10)


@pytest.mark.parametrize("t, s", [(999, 998), (999, 899), (700, 300), (1, 0)])
def test_ddim_eta0_step_closed_form(t, s):
    g = torch.Generator().manual_seed(t * 7 + s)
    x, eps = torch.randn(2, 64, dtype=torch.float64, generator=g)
    ab_t, ab_s = AB_LIST[t], AB_LIST[s]
    x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    expected = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s) * eps
    torch.testing.assert_close(ddim_step(x, eps, ab_t, ab_s, eta=0.0), expected,
                               rtol=0, atol=1e-10)
    # eta = 0 ignores the noise; the step to ᾱ = 1 returns x̂_0 for any eta.
    torch.testing.assert_close(ddim_step(x, eps, ab_t, ab_s, eta=0.0, noise=x + 5), expected,
                               rtol=0, atol=1e-10)
    for eta in (0.0, 1.0):
        torch.testing.assert_close(ddim_step(x, eps, ab_t, 1.0, eta=eta, noise=eps + 1), x0,
                                   rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Whole chains
# ---------------------------------------------------------------------------------------------

def ancestral_chain_moments(mean, var, sigma2_is_beta=False):
    """Mean and variance after DDPM's ancestral chain t = T−1 .. 0 (then ᾱ = 1) with ε*, from
    x_T ~ N(mean, var): each step x ↦ f(x) + σ_t·z with f affine, so the moments propagate as
    m ↦ f(m), v ↦ f'² v + σ_t². σ_t² = β̃_t, or DDPM's other choice β_t; 0 at the last step."""
    for t in range(T - 1, -1, -1):
        ab_t = AB_LIST[t]
        ab_prev = AB_LIST[t - 1] if t > 0 else 1.0
        alpha = ab_t / ab_prev
        beta = 1 - alpha
        sigma2 = (1 - ab_prev) / (1 - ab_t) * beta  # 0 at the last step
        if sigma2_is_beta and t > 0:
            sigma2 = beta

        def step_mean(x, ab_t=ab_t, alpha=alpha, beta=beta):
            eps = math.sqrt(1 - ab_t) * (x - math.sqrt(ab_t) * MU) / marginal_var(ab_t)
            return (x - beta / math.sqrt(1 - ab_t) * eps) / math.sqrt(alpha)

        slope = step_mean(1.0) - step_mean(0.0)
        mean, var = step_mean(mean), slope * slope * var + sigma2
    return mean, var


def test_ddim_eta1_all_steps_matches_ancestral_chain_in_distribution():
    # 3 runs of 25 000 samples (each op below torch's intra-op parallel grain: quick also on a
    # busy machine)
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(3):
        x_T = torch.randn(25_000, dtype=torch.float64, generator=g)
        out.append(sample_ddim(gaussian_eps, x_T, AB, list(range(T - 1, -1, -1)), eta=1.0,
                               generator=g))
    out = torch.cat(out)
    n = len(out)
    mean, var = ancestral_chain_moments(0.0, 1.0)
    # The chain is linear-Gaussian, so the samples are exactly N(mean, var), i.i.d.
    assert abs(float(out.mean()) - mean) < 4 * math.sqrt(var / n)
    assert abs(float(out.var()) - var) < 4 * var * math.sqrt(2 / (n - 1))
    # The tolerance separates this from the chain with DDPM's other choice σ² = β.
    _, var_beta = ancestral_chain_moments(0.0, 1.0, sigma2_is_beta=True)
    assert abs(var_beta - var) > 6 * var * math.sqrt(2 / (n - 1))


def test_samplers_converge_to_probability_flow_solution():
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(256, dtype=torch.float64, generator=g)
    a_T = AB_LIST[T - 1]
    exact = MU + S * (x_T - math.sqrt(a_T) * MU) / math.sqrt(a_T * S * S + 1 - a_T)
    errors = {}
    for sampler in SAMPLERS:
        errors[sampler] = [
            float((SAMPLERS[sampler](gaussian_eps, x_T, AB, make_timesteps(n, T)) - exact)
                  .abs().max()) for n in (10, 20, 50, 200)]
        assert all(a > b for a, b in zip(errors[sampler], errors[sampler][1:])), errors
    # The final step returns x̂_0 at t = T/n − 1: an O(1/n) shrinkage towards MU for both.
    assert errors["ddim"][-1] < 0.05 and errors["dpm++2m"][-1] < 0.025, errors
    assert errors["dpm++2m"][1] < 0.9 * errors["ddim"][1], errors


def log_snr_grid(steps, t_max=T - 1, t_min=100):
    """Integer timesteps nearest to a grid uniform in λ = ½·log(ᾱ/(1−ᾱ)), t_max to t_min."""
    lam = 0.5 * torch.log(AB / (1 - AB))
    targets = torch.linspace(float(lam[t_max]), float(lam[t_min]), steps + 1, dtype=torch.float64)
    grid = [int((lam - target).abs().argmin()) for target in targets]
    assert grid[0] == t_max and grid[-1] == t_min
    assert all(a > b for a, b in zip(grid, grid[1:]))
    return grid


def test_convergence_orders_on_a_log_snr_grid():
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(256, dtype=torch.float64, generator=g)
    counts = (10, 20, 40, 80)
    orders = {}
    for sampler in SAMPLERS:
        errors = []
        for n in counts:
            grid = log_snr_grid(n)
            a_last = AB_LIST[grid[-1]]
            # Exact flow to the last timestep, then the sampler's final step x̂_0 there.
            reference = posterior_mean_x0(pf_flow(x_T, AB_LIST[grid[0]], a_last), a_last)
            out = SAMPLERS[sampler](gaussian_eps, x_T, AB, grid)
            errors.append(float((out - reference).abs().max()))
        orders[sampler] = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(0.9 < p < 1.1 for p in orders["ddim"]), orders
    assert all(1.8 < p < 2.3 for p in orders["dpm++2m"]), orders


def test_dpm_solver_first_step_is_ddim():
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(32, dtype=torch.float64, generator=g)
    for grid in ([999], [999, 500], [700, 20]):
        ddim = sample_ddim(gaussian_eps, x_T, AB, grid)
        dpm = sample_dpmpp_2m(gaussian_eps, x_T, AB, grid)
        torch.testing.assert_close(dpm, ddim, rtol=0, atol=1e-12)
    single = sample_dpmpp_2m(gaussian_eps, x_T, AB, [600])
    torch.testing.assert_close(single, posterior_mean_x0(x_T, AB_LIST[600]), rtol=0, atol=1e-12)
    # From the third timestep on the second-order correction makes them differ.
    grid = [999, 600, 300]
    difference = sample_dpmpp_2m(gaussian_eps, x_T, AB, grid) \
        - sample_ddim(gaussian_eps, x_T, AB, grid)
    assert float(difference.abs().max()) > 1e-3


# ---------------------------------------------------------------------------------------------
# Dtypes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_are_kept(dtype):
    g = torch.Generator().manual_seed(3)
    x64, eps64, z64 = torch.randn(3, 4, 8, dtype=torch.float64, generator=g)
    x, eps, z = x64.to(dtype), eps64.to(dtype), z64.to(dtype)
    for eta in (0.0, 1.0):
        # alpha-bars as float64 tensors must not promote a float32 step
        out = ddim_step(x, eps, AB[500], AB[400], eta=eta, noise=z)
        assert out.dtype == dtype
        reference = ddim_step(x64, eps64, AB_LIST[500], AB_LIST[400], eta=eta, noise=z64)
        torch.testing.assert_close(out.double(), reference, rtol=0, atol=1e-5)
    grid = make_timesteps(10, T)
    for sampler, eta in (("ddim", 0.0), ("ddim", 1.0), ("dpm++2m", 0.0)):
        out = SAMPLERS[sampler](gaussian_eps, x, AB, grid, eta=eta,
                                generator=torch.Generator().manual_seed(0))
        assert out.dtype == dtype
        if eta == 0:
            reference = SAMPLERS[sampler](gaussian_eps, x64, AB, grid)
            torch.testing.assert_close(out.double(), reference, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Timesteps and schedule
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("timesteps", [1000, 10, 7])
def test_make_timesteps(timesteps):
    for steps in range(1, timesteps + 1):
        grid = make_timesteps(steps, timesteps)
        assert len(grid) == steps
        assert all(isinstance(t, int) for t in grid)
        assert grid[0] == timesteps - 1
        assert all(a > b for a, b in zip(grid, grid[1:]))
        assert 0 <= grid[-1] and grid[0] < timesteps
    assert make_timesteps(timesteps, timesteps) == list(range(timesteps - 1, -1, -1))
    for bad in (0, -1, timesteps + 1):
        with pytest.raises(AssertionError):
            make_timesteps(bad, timesteps)


def test_make_timesteps_trailing_values():
    assert make_timesteps(1, 1000) == [999]
    assert make_timesteps(4, 1000) == [999, 749, 499, 249]
    assert make_timesteps(10, 1000) == [999 - 100 * i for i in range(10)]


def test_scaled_linear_schedule():
    assert AB.dtype == torch.float64 and AB.shape == (T,)
    betas = torch.cat([1 - AB[:1], 1 - AB[1:] / AB[:-1]])
    assert abs(float(betas[0]) - BETA_START) < 1e-15
    assert abs(float(betas[-1]) - BETA_END) < 1e-12
    assert bool((AB[1:] < AB[:-1]).all()) and 0 < float(AB[-1]) < float(AB[0]) < 1
    # √β evenly spaced
    root = betas.sqrt()
    expected = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, T, dtype=torch.float64)
    torch.testing.assert_close(root, expected, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Argument checks: asserts inside the samplers, errors naming the value in the public config
# (sample.py checks its options: tests/test_difffae.py; evaluate.py: tests/test_evaluate.py)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_callback_sees_every_step_and_its_posterior_mean(sampler):
    """The callback gets step i at timestep t_i with the state x_i it was given (x_T first, the
    previous step's output after: for DDIM, ddim_step of the last dict) and x̂_0, which with
    the optimal ε is E[x_0 | x_t]."""
    x_T = torch.linspace(-2, 2, 5, dtype=torch.float64)
    grid, seen = make_timesteps(6, T), []
    out = SAMPLERS[sampler](gaussian_eps, x_T, AB, grid, callback=seen.append)
    assert [s["i"] for s in seen] == list(range(6)) and [s["t"] for s in seen] == grid
    assert torch.equal(seen[0]["x"], x_T)
    for state in seen:
        torch.testing.assert_close(state["x0"], posterior_mean_x0(state["x"], AB_LIST[state["t"]]),
                                   rtol=0, atol=1e-12)
    if sampler == "ddim":
        for a, b in zip(seen, seen[1:]):
            torch.testing.assert_close(b["x"], ddim_step(a["x"], a["eps"], AB_LIST[a["t"]],
                                                         AB_LIST[b["t"]]), rtol=0, atol=0)
    torch.testing.assert_close(out, seen[-1]["x0"], rtol=0, atol=1e-12)  # ᾱ = 1 after the last


def test_samplers_assert_their_arguments():
    x = torch.zeros(4, dtype=torch.float64)
    for grid in ([999, 999, 500], [500, 999], [10, 20, 5], [1000, 500], []):
        with pytest.raises(AssertionError):
            sample_ddim(gaussian_eps, x, AB, grid)
    for sampler, eta in ((sample_dpmpp_2m, 1.0), (sample_ddim, 1.5), (sample_ddim, -0.1)):
        with pytest.raises(AssertionError):
            sampler(gaussian_eps, x, AB, [999, 500], eta=eta)


@pytest.mark.parametrize("field, value, message", [
    ("timesteps", 1, "timesteps=1"), ("beta_end", 0.0001, "beta_start=0.00085, beta_end=0.0001"),
    ("render_from", "truth", "render_from='truth'"), ("refine_steps", -1, "refine_steps=-1"),
    ("truth_fraction", 1.5, "truth_fraction=1.5"), ("slots_weight", -1, "slots_weight=-1"),
    ("sample_steps", 0, "sample_steps=0"),
    ("sample_steps", 1001, "sample_steps=1001"), ("sampler", "euler", "sampler='euler'")])
def test_diffusion_config_names_the_bad_value(field, value, message):
    DiffusionConfig()  # the defaults are valid
    with pytest.raises(ValueError, match=f"DiffusionConfig.{message}"):
        DiffusionConfig(**{field: value})


# ---------------------------------------------------------------------------------------------
# Coefficients
# ---------------------------------------------------------------------------------------------

def coefficients(batch, offset, seed):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=g) + offset

    return {"shape": draw(batch, 59), "albedo": draw(batch, 8),
            "expression": draw(batch, len(EXPRESSION_NAMES)), "pose": draw(batch, 6),
            "cam": draw(batch, 3), "light": draw(batch, 9, 3)}


def copy(coeffs):
    return {key: value.clone() for key, value in coeffs.items()}


@pytest.mark.parametrize("edit", [subset for k in range(4)
                                  for subset in itertools.combinations(EDIT_ATTRIBUTES, k)])
def test_combine_coefficients(edit):
    source, query = coefficients(3, 0.0, 0), coefficients(3, 10.0, 1)
    source_before, query_before = copy(source), copy(query)
    out = combine_coefficients(source, query, edit)
    assert set(out) == set(source)
    pick = {True: query, False: source}
    assert torch.equal(out["shape"], source["shape"])
    assert torch.equal(out["albedo"], source["albedo"])
    assert torch.equal(out["pose"][:, :3], pick["pose" in edit]["pose"][:, :3])
    assert torch.equal(out["cam"], pick["pose" in edit]["cam"])
    assert torch.equal(out["expression"], pick["expression" in edit]["expression"])
    assert torch.equal(out["pose"][:, 3:], pick["expression" in edit]["pose"][:, 3:])
    assert torch.equal(out["light"], pick["lighting" in edit]["light"])
    # The inputs are unchanged and not shared with the output.
    for value in out.values():
        value.add_(100)
    for key in source:
        assert torch.equal(source[key], source_before[key])
        assert torch.equal(query[key], query_before[key])


def test_combine_coefficients_asserts_known_attributes():
    source, query = coefficients(2, 0.0, 0), coefficients(2, 1.0, 1)
    for edit in (("pose", "hair"), "pose"):  # a bare string is not a tuple of attributes
        with pytest.raises(AssertionError):
            combine_coefficients(source, query, edit)


def rotation_matrix(rotvec):
    """Rodrigues' formula, (B, 3) axis-angle → (B, 3, 3), float64."""
    rotvec = rotvec.double()
    angle = rotvec.norm(dim=1)[:, None, None]
    k = rotvec / rotvec.norm(dim=1, keepdim=True)
    zero = torch.zeros_like(k[:, 0])
    cross = torch.stack([torch.stack([zero, -k[:, 2], k[:, 1]], -1),
                         torch.stack([k[:, 2], zero, -k[:, 0]], -1),
                         torch.stack([-k[:, 1], k[:, 0], zero], -1)], 1)
    return torch.eye(3, dtype=torch.float64) + angle.sin() * cross \
        + (1 - angle.cos()) * cross @ cross


def elementary(axis, degrees):
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    if axis == "x":
        rows = [[1, 0, 0], [0, c, -s], [0, s, c]]
    elif axis == "y":
        rows = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    else:
        rows = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    return torch.tensor(rows, dtype=torch.float64)


def head_coefficients():
    coeffs = coefficients(3, 0.0, 5)
    coeffs["pose"][:, :3] = torch.tensor([[0.3, -0.2, 0.1], [-0.1, 0.5, 0.05], [0.2, 0.1, -0.3]])
    return coeffs


@pytest.mark.parametrize("numbers", [{"yaw": 40.0}, {"pitch": -15.0}, {"roll": 12.0},
                                     {"yaw": -30.0, "pitch": 10.0},
                                     {"yaw": 20.0, "pitch": -25.0, "roll": 8.0}])
def test_set_numbers_euler_angles(numbers):
    coeffs = head_coefficients()
    before = copy(coeffs)
    out = set_numbers(coeffs, numbers)
    angles_before = head_pose_degrees(coeffs["pose"])
    angles = head_pose_degrees(out["pose"])
    for index, name in enumerate(("yaw", "pitch", "roll")):
        expected = numbers.get(name, None)
        column = angles_before[:, index] if expected is None else torch.full((3,), expected)
        torch.testing.assert_close(angles[:, index], column.double(), rtol=0, atol=1e-4)
    # Intrinsic Y-X-Z: R = R_y(yaw)·R_x(pitch)·R_z(roll), checked per sample.
    for b in range(3):
        yaw, pitch, roll = (float(v) for v in angles[b])
        expected = elementary("y", yaw) @ elementary("x", pitch) @ elementary("z", roll)
        torch.testing.assert_close(rotation_matrix(out["pose"][b:b + 1, :3])[0], expected,
                                   rtol=0, atol=1e-5)
    assert torch.equal(out["pose"][:, 3:], coeffs["pose"][:, 3:])
    for key in coeffs:
        assert torch.equal(coeffs[key], before[key])
        if key != "pose":
            assert torch.equal(out[key], coeffs[key])


def test_set_numbers_jaw():
    coeffs = head_coefficients()
    out = set_numbers(coeffs, {"jaw": 20})
    torch.testing.assert_close(out["pose"][:, 3], torch.full((3,), math.radians(20)))
    assert torch.equal(out["pose"][:, 4:], torch.zeros(3, 2))
    assert torch.equal(out["pose"][:, :3], coeffs["pose"][:, :3])
    assert not torch.equal(coeffs["pose"][:, 4:], torch.zeros(3, 2))  # the input is untouched


@pytest.mark.parametrize("direction, axis, sign", [((1, 0, 0), 0, 1.0), ((0, 0, -2.5), 2, -1.0),
                                                   ((0, 3, 0), 1, 1.0)])
def test_set_numbers_light(direction, axis, sign):
    coeffs = head_coefficients()
    before = copy(coeffs)
    out = set_numbers(coeffs, {"light": direction})
    strength = coeffs["light"][:, 1:4].norm(dim=1)  # (B, 3) per colour
    band = out["light"][:, 1:4]  # (B, 3 directions x, y, z, 3 colours)
    torch.testing.assert_close(band[:, axis], sign * strength)
    others = [k for k in range(3) if k != axis]
    assert torch.equal(band[:, others], torch.zeros(3, 2, 3))
    torch.testing.assert_close(band.norm(dim=1), strength)
    assert torch.equal(out["light"][:, 0], coeffs["light"][:, 0])
    assert torch.equal(out["light"][:, 4:], coeffs["light"][:, 4:])
    assert torch.equal(coeffs["light"], before["light"])


def test_set_numbers_expression_and_errors():
    coeffs = head_coefficients()
    index = EXPRESSION_NAMES.index("smile")
    out = set_numbers(coeffs, {"smile": 1.2, "jaw": 5}, expression_names=EXPRESSION_NAMES)
    assert torch.equal(out["expression"][:, index], torch.full((3,), 1.2))
    others = [k for k in range(len(EXPRESSION_NAMES)) if k != index]
    assert torch.equal(out["expression"][:, others], coeffs["expression"][:, others])
    # sample.py refuses these names and values (tests/test_difffae.py); here they are asserts
    for numbers, names in (({"smile": 1.2}, ()), ({"grin": 1.0}, EXPRESSION_NAMES),
                           ({"light": (0, 0, 0)}, ()), ({"light": (1, 0)}, ())):
        with pytest.raises(AssertionError):
            set_numbers(coeffs, numbers, expression_names=names)

"""DDIM sampling / inversion, checked against Gaussian data, where everything is closed-form.

Data x0 ~ N(mu, s^2) independently per dimension. The marginal at level a = alphas_cumprod[t]
is N(sqrt(a) mu, v) with v = a s^2 + 1 - a, the optimal noise predictor is
eps*(x, t) = sqrt(1 - a) (x - sqrt(a) mu) / v, and the probability-flow ODE keeps the
standardized value (x - sqrt(a) mu) / sqrt(v) of every dimension constant.
"""

import math

import pytest
import torch

from mixture_core.ddim import (
    alphas_cumprod_from_sigmas,
    ddim_invert,
    ddim_on_denoiser,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    from_sigma_space,
    null_text_inversion,
    null_text_on_denoisers,
    sampling_sigmas,
    scaled_linear_alphas_cumprod,
    sigmas_from_alphas_cumprod,
    timestep_from_sigma,
    to_sigma_space,
)

ALPHAS = scaled_linear_alphas_cumprod()
SHAPE = (2, 4, 8, 12)  # batch 2, non-square
BOUND = 1e-3


def gaussian_problem(seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    mu = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    s = 0.2 + torch.rand(shape, generator=g, dtype=torch.float64)  # per-dimension std in [0.2, 1.2]
    x0 = mu + s * torch.randn(shape, generator=g, dtype=torch.float64)

    def eps_star(x, t):
        a = float(ALPHAS[t])
        return math.sqrt(1 - a) * (x.double() - math.sqrt(a) * mu) / (a * s**2 + 1 - a)

    def flow_to_level(x0_, a):  # the exact probability-flow map from clean data to level a
        return math.sqrt(a) * mu + torch.sqrt(a * s**2 + 1 - a) * (x0_ - mu) / s

    return x0, eps_star, flow_to_level


def rel_err(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


# ----------------------------------------------------------------------------- 1. round trip


def test_exact_inversion_round_trip_is_within_bound():
    x0, eps_star, _ = gaussian_problem()
    x_T = ddim_invert(x0, eps_star, ALPHAS, 50, refine_iters=10)
    err = rel_err(ddim_sample(x_T, eps_star, ALPHAS, 50), x0)
    assert err < BOUND, f"invert->sample relative error {err:.3e} at 50 steps"
    assert err < 1e-7, f"fixed-point inversion should be exact in float64, got {err:.3e}"


def test_refinement_converges_and_plain_inversion_is_first_order():
    x0, eps_star, _ = gaussian_problem()
    errs = [
        rel_err(ddim_sample(ddim_invert(x0, eps_star, ALPHAS, 50, refine_iters=r), eps_star, ALPHAS, 50), x0)
        for r in range(4)
    ]
    # Plain inversion (r=0) evaluates eps one step early: ~1.3/steps here, so it misses the bound.
    assert 0.01 < errs[0] < 0.05, f"plain inversion error {errs[0]:.3e}"
    assert all(b < a / 5 for a, b in zip(errs, errs[1:])), f"errors per refine iteration {errs}"
    assert errs[2] < BOUND, f"2 refine iterations: {errs[2]:.3e}"


def test_off_by_one_pairing_of_eps_timestep_is_detected():
    """The classic bug: inversion evaluates eps at the transition's less noisy timestep."""
    x0, eps_star, _ = gaussian_problem()
    stride = 1000 // 50
    exact = rel_err(ddim_sample(ddim_invert(x0, eps_star, ALPHAS, 50, refine_iters=10), eps_star, ALPHAS, 50), x0)
    one_step_early = lambda x, t: eps_star(x, max(t - stride, 0))  # noqa: E731
    x_T = ddim_invert(x0, one_step_early, ALPHAS, 50, refine_iters=10)
    shifted = rel_err(ddim_sample(x_T, eps_star, ALPHAS, 50), x0)
    assert shifted > 10 * BOUND, f"off-by-one error {shifted:.3e} would pass the {BOUND} bound"
    assert shifted > 1e4 * exact, f"off-by-one {shifted:.3e} vs exact {exact:.3e}"


@pytest.mark.parametrize("shift", [-1, 1])
def test_schedule_shifted_by_one_train_timestep_is_detected(shift):
    """Sampling on t+-1 (e.g. steps_offset 0 vs 1) after inverting on t: small but far above exact."""
    x0, eps_star, _ = gaussian_problem()
    ts = ddim_timesteps(1000, 50)
    x_T = ddim_invert(x0, eps_star, ALPHAS, 50, refine_iters=10)
    exact = rel_err(ddim_sample(x_T, eps_star, ALPHAS, 50, timesteps=ts), x0)
    shifted = rel_err(ddim_sample(x_T, eps_star, ALPHAS, 50, timesteps=[t + shift for t in ts]), x0)
    assert shifted > 1e-4 and shifted > 1e4 * exact, f"shift {shift}: {shifted:.3e} vs exact {exact:.3e}"


# ----------------------------------------------------------------------------- 2. probability flow


def test_ddim_converges_to_the_probability_flow_map():
    x0, eps_star, flow_to_level = gaussian_problem()
    sample_errs, invert_errs, round_trip = [], [], []
    for steps in (50, 200):
        a_T = float(ALPHAS[ddim_timesteps(1000, steps)[0]])
        x_T_exact = flow_to_level(x0, a_T)  # x0's exact noise under the ODE
        sample_errs.append(rel_err(ddim_sample(x_T_exact, eps_star, ALPHAS, steps), x0))
        x_T = ddim_invert(x0, eps_star, ALPHAS, steps)
        invert_errs.append(rel_err(x_T, x_T_exact))
        round_trip.append(rel_err(ddim_sample(x_T, eps_star, ALPHAS, steps), x0))
    msg = f"sample {sample_errs}, invert {invert_errs}, invert->sample {round_trip} at 50/200 steps"
    assert sample_errs[0] < 0.05 and invert_errs[0] < 0.06 and round_trip[0] < 0.05, msg
    # First order: 4x the steps cuts the error about 3-4x.
    for e50, e200 in (sample_errs, invert_errs, round_trip):
        assert e200 < e50 / 2.5, msg


def test_single_point_data_is_recovered_in_one_step():
    """With s -> 0 the predictor is the true noise and one DDIM step lands exactly on mu."""
    mu = torch.randn(SHAPE, dtype=torch.float64)
    eps = lambda x, t: (x - math.sqrt(float(ALPHAS[t])) * mu) / math.sqrt(1 - float(ALPHAS[t]))  # noqa: E731
    x_T = torch.randn(SHAPE, dtype=torch.float64)
    assert rel_err(ddim_sample(x_T, eps, ALPHAS, 1), mu) < 1e-12


# ----------------------------------------------------------------------------- 3. the update


def test_ddim_step_scalar_example():
    # a_t = 0.25, a_prev = 0.64: x0 = (1 - sqrt(.75) * .5) / .5 = 2 - sqrt(3)/2,
    # x_prev = 0.8 * x0 + 0.6 * 0.5 = 1.9 - 0.4 * sqrt(3).
    x_prev = ddim_step(torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64), 0.25, 0.64)
    assert x_prev.item() == pytest.approx(1.9 - 0.4 * math.sqrt(3), abs=1e-14)
    back = ddim_step(x_prev, torch.tensor([0.5], dtype=torch.float64), 0.64, 0.25)  # same eps: exact inverse
    assert back.item() == pytest.approx(1.0, abs=1e-14)
    clean = ddim_step(torch.tensor([1.0]), torch.tensor([0.5]), 0.25, 1.0)  # alpha 1: the x0 prediction
    assert clean.item() == pytest.approx(2 - math.sqrt(3) / 2, abs=1e-6)


def test_timesteps_leading_with_offset_one():
    assert ddim_timesteps(1000, 50)[:3] == [981, 961, 941] and ddim_timesteps(1000, 50)[-1] == 1
    assert ddim_timesteps(1000, 999)[0] == 999 and len(ddim_timesteps(1000, 999)) == 999
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 1000)
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


# ----------------------------------------------------------------------------- 4. callback


@pytest.mark.parametrize("loop", [ddim_sample, ddim_invert])
def test_callback_once_per_step_and_exception_stops(loop):
    calls, seen = [], []
    eps_fn = lambda x, t: calls.append(t) or torch.zeros_like(x)  # noqa: E731
    loop(torch.zeros(1, 4, 8, 8), eps_fn, ALPHAS, 10, lambda i, n, x: seen.append((i, n, x.shape)))
    assert seen == [(i, 10, (1, 4, 8, 8)) for i in range(10)] and len(calls) == 10
    assert calls == sorted(calls, reverse=(loop is ddim_sample))  # sampling descends, inversion ascends

    class Cancel(Exception):
        pass

    def cancel_at_3(i, n, x):
        if i == 3:
            raise Cancel

    calls.clear()
    with pytest.raises(Cancel):
        loop(torch.zeros(1, 4, 8, 8), eps_fn, ALPHAS, 10, cancel_at_3)
    assert len(calls) == 4  # steps 0..3 ran, nothing after the exception


# ----------------------------------------------------------------------------- 5. dtypes, shapes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_and_shapes(dtype):
    x0, eps_star, _ = gaussian_problem()
    seen_dtypes = set()

    def eps_fn(x, t):
        seen_dtypes.add(x.dtype)
        return eps_star(x, t).to(x.dtype)

    x_T = ddim_invert(x0.to(dtype), eps_fn, ALPHAS, 20, refine_iters=3)
    x_back = ddim_sample(x_T, eps_fn, ALPHAS, 20)
    assert x_T.dtype == dtype and x_back.dtype == dtype and x_back.shape == SHAPE
    assert seen_dtypes == {dtype}
    assert torch.isfinite(x_back.float()).all()
    assert rel_err(x_back, x0) < {torch.float16: 0.02, torch.bfloat16: 0.1, torch.float32: 2e-3}[dtype]
    assert ddim_step(x0.to(dtype), x0.to(dtype), 0.3, 0.5).dtype == dtype


# ----------------------------------------------------------------------------- sigmas


def test_sigma_alpha_conversions_and_timestep_lookup():
    sigmas = sigmas_from_alphas_cumprod(ALPHAS)
    assert torch.all(sigmas[1:] > sigmas[:-1])  # ascending with t
    assert sigmas[0].item() == pytest.approx(0.0292, abs=1e-4) and sigmas[-1].item() == pytest.approx(14.61, abs=0.01)
    assert torch.allclose(alphas_cumprod_from_sigmas(sigmas), ALPHAS, rtol=0, atol=1e-15)
    assert alphas_cumprod_from_sigmas(torch.tensor([0.0])).item() == 1.0
    # ComfyUI keeps its sigma table in float32: lookups must still land on the right index.
    table = sigmas.float()
    for t in (0, 1, 500, 981, 999):
        assert timestep_from_sigma(float(table[t]), table) == t
    assert timestep_from_sigma(0.0, table) == 0
    assert timestep_from_sigma(100.0, table) == 999
    many = timestep_from_sigma(table[[3, 7, 900]].reshape(3, 1), table)
    assert many.shape == (3, 1) and many.flatten().tolist() == [3, 7, 900]


# ----------------------------------------------------------------------------- null-text inversion


def conditional_gaussian_problem(seed=0, shape=SHAPE):
    """Conditional data N(mu_c, s^2), unconditional N(mu_u + e, s^2): the 'embedding' e shifts the
    unconditional mean, so guidance (cfg > 1) pulls sampling off the cond-only (cfg 1) path unless
    e is tuned per step."""
    g = torch.Generator().manual_seed(seed)
    mu_c = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    mu_u = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    s = 0.2 + torch.rand(shape, generator=g, dtype=torch.float64)
    x0 = mu_c + s * torch.randn(shape, generator=g, dtype=torch.float64)

    def eps_gauss(x, t, mu):
        a = float(ALPHAS[t])
        return math.sqrt(1 - a) * (x.double() - math.sqrt(a) * mu) / (a * s**2 + 1 - a)

    calls = []

    def cond(x, t):
        return eps_gauss(x, t, mu_c)

    def uncond(x, t, embeddings):
        calls.append(t)
        return eps_gauss(x, t, mu_u + embeddings[0])

    def guided(cfg, embeddings_at):  # eps of cfg guidance with the embeddings of timestep t
        def eps(x, t):
            e_u = uncond(x, t, embeddings_at(t))
            return e_u + cfg * (cond(x, t) - e_u)

        return eps

    return x0, cond, uncond, guided, calls


NULL0 = [torch.zeros(SHAPE)]


@pytest.mark.parametrize("cfg", [3.0, 7.5])
def test_null_text_inversion_reconstructs_at_cfg_above_one(cfg):
    x0, cond, uncond, guided, calls = conditional_gaussian_problem()
    steps, iters = 10, 20
    pivots = []
    x_T = ddim_invert(x0, cond, ALPHAS, steps, refine_iters=5, trajectory=pivots)
    assert len(pivots) == steps + 1 and torch.equal(pivots[0], x_T) and torch.equal(pivots[-1], x0)
    plain = rel_err(ddim_sample(x_T, guided(cfg, lambda t: NULL0), ALPHAS, steps), x0)
    calls.clear()
    recon, per_step = null_text_inversion(pivots, cond, uncond, NULL0, ALPHAS, cfg, inner_iters=iters, lr=0.1)
    nulltext = rel_err(recon, x0)
    assert plain > 1.0, f"cfg {cfg}: plain DDIM should drift far from the photo, error {plain:.3e}"
    assert nulltext < 0.02 and nulltext < plain / 100, f"cfg {cfg}: null-text {nulltext:.3e} vs plain {plain:.3e}"
    assert steps < len(calls) <= steps * (iters + 1)
    # The embeddings, used at their own steps by a plain guided sampler, give the same result ...
    ts = ddim_timesteps(1000, steps)
    by_t = dict(zip(ts, per_step))
    replay = ddim_sample(x_T, guided(cfg, lambda t: by_t[t]), ALPHAS, steps)
    assert rel_err(replay, recon) < 1e-5
    # ... and one step off (each step with the next step's embeddings) they do not.
    shifted = dict(zip(ts, per_step[1:] + per_step[-1:]))
    assert rel_err(ddim_sample(x_T, guided(cfg, lambda t: shifted[t]), ALPHAS, steps), x0) > 10 * nulltext


def test_null_text_inversion_cost_early_stop_cfg1_and_inference_mode():
    x0, cond, uncond, _, calls = conditional_gaussian_problem()
    pivots = []
    ddim_invert(x0, cond, ALPHAS, 4, refine_iters=3, trajectory=pivots)
    # cfg 1: the unconditional branch does not matter; no calls, embeddings returned as given.
    recon, per_step = null_text_inversion(pivots, cond, uncond, NULL0, ALPHAS, 1.0)
    assert calls == [] and all(torch.equal(e[0], NULL0[0]) for e in per_step)
    assert rel_err(recon, ddim_sample(pivots[0], cond, ALPHAS, 4)) < 1e-12  # plain cfg-1 sampling
    # An early-stop threshold above any loss: one uncond call per step, no update.
    recon, per_step = null_text_inversion(pivots, cond, uncond, NULL0, ALPHAS, 3.0, inner_iters=5, early_stop=1e9)
    assert len(calls) == 4 and all(torch.equal(e[0], NULL0[0]) for e in per_step)
    # Threshold 0: every step uses all its updates plus the final evaluation; works under inference mode.
    calls.clear()
    seen = []
    with torch.inference_mode():
        inference_pivots = [p.clone() for p in pivots]
        recon, per_step = null_text_inversion(
            inference_pivots,
            cond,
            uncond,
            NULL0,
            ALPHAS,
            3.0,
            inner_iters=5,
            early_stop=0.0,
            callback=lambda i, n, x: seen.append((i, n)),
        )
    assert len(calls) == 4 * 6 and seen == [(i, 4) for i in range(4)]
    assert not torch.equal(per_step[0][0], NULL0[0]) and not NULL0[0].any()  # the input is not modified
    with pytest.raises(ValueError, match="pivots"):
        null_text_inversion(pivots[1:], cond, uncond, NULL0, ALPHAS, 3.0, timesteps=ddim_timesteps(1000, 4))


def test_null_text_step_keeps_its_best_iterate():
    """Adam can overshoot: a step whose updates only made the loss worse keeps the embeddings it
    started from, and every step returns the latent of its lowest recorded loss."""
    x0, cond, uncond, guided, _ = conditional_gaussian_problem()
    steps = 4
    pivots = []
    x_T = ddim_invert(x0, cond, ALPHAS, steps, refine_iters=3, trajectory=pivots)
    losses = []
    recon, per_step = null_text_inversion(
        pivots, cond, uncond, NULL0, ALPHAS, 3.0, inner_iters=3, lr=50.0, early_stop=0.0, losses=losses
    )
    assert len(losses) == steps and all(len(step) == 4 for step in losses)
    overshot = [i for i, step in enumerate(losses) if min(step[1:]) > step[0]]
    assert overshot, losses  # lr 50 throws the embedding far off at some step
    for i in overshot:
        start = NULL0 if i == 0 else per_step[i - 1]
        assert torch.equal(per_step[i][0], start[0]), i
    # The kept embeddings are what the step used: replaying them reproduces the reconstruction,
    # and each step's result is at its lowest loss.
    by_t = dict(zip(ddim_timesteps(1000, steps), per_step))
    assert rel_err(ddim_sample(x_T, guided(3.0, lambda t: by_t[t]), ALPHAS, steps), recon) < 1e-5
    x = pivots[0]
    for i, t in enumerate(ddim_timesteps(1000, steps)):
        levels = [float(ALPHAS[s]) for s in ddim_timesteps(1000, steps)] + [1.0]
        x = ddim_step(x, guided(3.0, lambda _t: per_step[i])(x, t), levels[i], levels[i + 1])
        assert math.isclose(float(torch.nn.functional.mse_loss(x, pivots[i + 1])), min(losses[i]), rel_tol=1e-6)


# ----------------------------------------------------------------------------- over a k-diffusion denoiser


def as_denoiser(eps_of_t, table):
    """The denoiser (x_sigma, sigma per row) -> x0 ComfyUI's samplers call, over an eps(x_t, t)."""

    def denoise(x_sigma, sigma):
        s = float(sigma[0])
        t = timestep_from_sigma(s, table)
        return x_sigma - s * eps_of_t(from_sigma_space(x_sigma, s), t)

    return denoise


def test_ddim_on_a_denoiser_is_ddim_in_sigma_space():
    """The same numbers as DDIM in x_t space, rescaled at both ends; the callback gets x_sigma at
    the sigma the step reached and the denoised x0 of the step's model call."""
    x0, eps_star, _ = gaussian_problem()
    table = sigmas_from_alphas_cumprod(ALPHAS)
    ts = ddim_timesteps(1000, 10)
    up, down = sampling_sigmas(table, ts, invert=True), sampling_sigmas(table, ts, invert=False)
    assert up[0] == 0 and down[-1] == 0 and torch.equal(up, down.flip(0)) and torch.all(down[:-1] > down[1:])
    seen = []
    callback = lambda i, x, denoised: seen.append((i, x, denoised))  # noqa: E731
    pivots = []
    noise = ddim_on_denoiser(
        as_denoiser(eps_star, table),
        x0,
        up,
        table,
        ts,
        invert=True,
        refine_iters=2,
        trajectory=pivots,
        callback=callback,
    )
    x_T = ddim_invert(x0, eps_star, ALPHAS, 10, refine_iters=2)
    assert rel_err(noise, to_sigma_space(x_T, float(up[-1]))) < 1e-12 and len(pivots) == 11
    assert [i for i, _, _ in seen] == list(range(10))
    i, x, denoised = seen[4]
    assert rel_err(from_sigma_space(x, float(up[i + 1])), pivots[-1 - (i + 1)]) < 1e-12
    back = ddim_on_denoiser(as_denoiser(eps_star, table), noise, down, table, ts)
    assert rel_err(back, ddim_sample(x_T, eps_star, ALPHAS, 10)) < 1e-12
    assert (
        math.isclose(float(to_sigma_space(torch.ones(1, dtype=torch.float64), 2.0)), 5**0.5)
        and float(from_sigma_space(torch.ones(1), 0)) == 1
    )


def test_null_text_on_denoisers_differentiates_through_the_denoiser():
    """The negative prompt's denoiser carries the gradient to the embeddings: the optimization
    lowers every step's loss and gives the same result as null_text_inversion in x_t space."""
    x0, cond, uncond, _, _ = conditional_gaussian_problem()
    table = sigmas_from_alphas_cumprod(ALPHAS)
    ts = ddim_timesteps(1000, 4)
    pivots = []
    ddim_invert(x0, cond, ALPHAS, 4, refine_iters=3, trajectory=pivots)
    losses, ref_losses = [], []
    recon, per_step = null_text_on_denoisers(
        as_denoiser(cond, table),
        lambda e: as_denoiser(lambda x, t: uncond(x, t, e), table),
        pivots,
        NULL0,
        sampling_sigmas(table, ts, invert=False),
        table,
        ts,
        3.0,
        inner_iters=5,
        lr=0.1,
        losses=losses,
    )
    ref, ref_steps = null_text_inversion(
        pivots, cond, uncond, NULL0, ALPHAS, 3.0, inner_iters=5, lr=0.1, losses=ref_losses
    )
    assert all(min(step) < 0.99 * step[0] for step in losses) and losses[0][-1] < 0.5 * losses[0][0], losses
    assert rel_err(recon, ref) < 1e-9 and rel_err(per_step[-1][0], ref_steps[-1][0]) < 1e-9

"""Deterministic DDIM (eta = 0) sampling and its exact mirror, DDIM inversion.

Works over any noise predictor ``eps_fn(x, t) -> eps`` (t an int index into the
model's ``alphas_cumprod``, 0..999 for SD1.5) and never imports ComfyUI.

Schedule (the one SD1.5 shipped with in diffusers): "leading" spacing with
``steps_offset=1``, i.e. ``t_i = i * (T // steps) + 1`` for i = 0..steps-1, used in
descending order (981, 961, ..., 1 for T=1000, 50 steps). The noise levels visited are

    alpha[t_{N-1}] -> ... -> alpha[t_0] -> 1.0

so sampling ends at alpha = 1 (clean data, ComfyUI's final sigma 0; diffusers'
``set_alpha_to_one=True``, whereas SD1.5's config stopped at alpha[0], sigma 0.029, which
would make inversion treat the clean photo latent as slightly noisy). Inversion walks the same chain upwards, starting from the clean
latent at alpha = 1, and uses at every transition the same timestep as the sampling step
that undoes it (the noisier end's t): so ``ddim_sample(ddim_invert(x))`` is the identity up
to the one approximation of inversion, eps evaluated at the less noisy end of the step.
``refine_iters`` removes that approximation with a fixed-point solve (see ``ddim_invert``).

Guided sampling (cfg > 1) from such a latent no longer retraces the cfg-1 path: each step's
guided eps differs from the one inversion used, and the errors compound. ``null_text_inversion``
(Mokady et al. 2023, "Null-text inversion", which the MoA paper's real-image subject swap, Sec. 5.3,
builds on) fixes that by optimizing the unconditional embedding per step so that the guided step
lands on the inversion's trajectory.

Precision: the noise-level coefficients are computed in Python floats (float64); the
running state is kept in at least float32 (float64 stays float64) and the result is
returned in the input dtype. ``eps_fn`` receives x in the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]
# eps of the unconditional branch given the embeddings that replace the negative prompt's
NullEpsFn = Callable[[torch.Tensor, int, Sequence[torch.Tensor]], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor], None]


# ----------------------------------------------------------------------------- schedules


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """SD1.x's discrete schedule (float64): betas = linspace(sqrt(b0), sqrt(b1), T)**2."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ComfyUI/k-diffusion sigmas: sigma^2 = (1 - a) / a (x_sigma = x0 + sigma * eps)."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Inverse of ``sigmas_from_alphas_cumprod``: a = 1 / (1 + sigma^2); sigma 0 gives a = 1."""
    return 1.0 / (1.0 + sigmas.double() ** 2)


def timestep_from_sigma(sigma: float | torch.Tensor, sigmas: torch.Tensor) -> int | torch.Tensor:
    """Index of the training timestep whose sigma is nearest to ``sigma`` in log space.

    Same rule as ComfyUI's ``ModelSamplingDiscrete.timestep``. ``sigmas`` is the ascending
    per-timestep table (e.g. ``model_sampling.sigmas``). A Python float gives an int; a tensor
    gives a long tensor of its shape. sigma 0 (clean) maps to timestep 0.
    """
    log_table = sigmas.double().log()
    query = torch.as_tensor(sigma, dtype=torch.float64).clamp_min(1e-30).log()  # log(0) -> nearest = t 0
    index = (query.reshape(-1, 1) - log_table.to(query.device)).abs().argmin(dim=1).reshape(query.shape)
    return int(index) if not isinstance(sigma, torch.Tensor) else index


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Sampling timesteps, descending: "leading" spacing, steps_offset=1 (SD1.5's diffusers config)."""
    # steps == T would put the top timestep at T, past the table (diffusers fails there too).
    if not 1 <= steps < num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps - 1}, got {steps}")
    stride = num_train_timesteps // steps
    return [i * stride + 1 for i in reversed(range(steps))]


def _levels(alphas_cumprod: torch.Tensor, timesteps: Sequence[int]) -> list[float]:
    """alpha at each timestep (descending timesteps) followed by the final level 1.0."""
    table = alphas_cumprod.detach().double().cpu()
    return [float(table[t]) for t in timesteps] + [1.0]


# ----------------------------------------------------------------------------- the update


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: float, alpha_prev: float) -> torch.Tensor:
    """One eta = 0 DDIM update from noise level alpha_t to alpha_prev (either direction).

        x0     = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
        x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps

    written as x_prev = c_x * x_t + c_eps * eps with the coefficients in float64. With
    alpha_prev > alpha_t this denoises; with alpha_prev < alpha_t it is the inversion step.
    The tensors are combined in at least float32; the result has x_t's dtype.
    """
    alpha_t, alpha_prev = float(alpha_t), float(alpha_prev)
    c_x = math.sqrt(alpha_prev / alpha_t)
    c_eps = math.sqrt(1.0 - alpha_prev) - math.sqrt(alpha_prev * (1.0 - alpha_t) / alpha_t)
    work = torch.promote_types(x_t.dtype, torch.float32)
    out = x_t.to(work) * c_x + eps.to(device=x_t.device, dtype=work) * c_eps
    return out.to(x_t.dtype)


# ----------------------------------------------------------------------------- loops


def _eps(eps_fn: EpsFn, x: torch.Tensor, t: int, in_dtype: torch.dtype) -> torch.Tensor:
    return eps_fn(x.to(in_dtype), t).to(device=x.device, dtype=x.dtype)


def ddim_sample(
    x_T: torch.Tensor,
    eps_fn: EpsFn,
    alphas_cumprod: torch.Tensor,
    steps: int,
    callback: Callback | None = None,
    *,
    timesteps: Sequence[int] | None = None,
) -> torch.Tensor:
    """Denoise x_T (at alpha[timesteps[0]]) to clean x0 (alpha = 1) with ``len(timesteps)`` calls.

    ``timesteps`` (descending) defaults to ``ddim_timesteps(len(alphas_cumprod), steps)``;
    pass a tail of that list to start from a partially inverted latent. ``callback(i, n, x)``
    runs after step i (0-based) with the new state (working dtype, do not modify it); an
    exception from it propagates and stops the loop.
    """
    ts = list(timesteps) if timesteps is not None else ddim_timesteps(len(alphas_cumprod), steps)
    levels = _levels(alphas_cumprod, ts)
    x = x_T.to(torch.promote_types(x_T.dtype, torch.float32))
    for i, t in enumerate(ts):
        x = ddim_step(x, _eps(eps_fn, x, t, x_T.dtype), levels[i], levels[i + 1])
        if callback is not None:
            callback(i, len(ts), x)
    return x.to(x_T.dtype)


def ddim_invert(
    x0: torch.Tensor,
    eps_fn: EpsFn,
    alphas_cumprod: torch.Tensor,
    steps: int,
    callback: Callback | None = None,
    *,
    timesteps: Sequence[int] | None = None,
    refine_iters: int = 0,
    trajectory: list | None = None,
) -> torch.Tensor:
    """Map clean x0 (alpha = 1) up to x_T at alpha[timesteps[0]]: the mirror of ``ddim_sample``.

    The transition alpha[t_{i+1}] -> alpha[t_i] (or 1.0 -> alpha[t_last]) uses eps at t_i, the
    timestep the sampling step coming back down uses. Sampling evaluates eps at the noisier
    point, which inversion does not know yet: plain DDIM inversion (refine_iters=0) evaluates it
    at the current, less noisy point. Each refine iteration re-evaluates eps at the new
    estimate (one more eps_fn call per step), a fixed-point solve of the sampling step's
    equation, so invert -> sample becomes exact as it converges. ``timesteps`` and
    ``callback`` are as in ``ddim_sample`` (callback once per step, not per refine call).
    ``trajectory``, a list, receives the states visited in sampling order (x_T first, x0 last,
    working dtype): the pivots of ``null_text_inversion``.
    """
    ts = list(timesteps) if timesteps is not None else ddim_timesteps(len(alphas_cumprod), steps)
    levels = _levels(alphas_cumprod, ts)
    x = x0.to(torch.promote_types(x0.dtype, torch.float32))
    visited = [x]
    n = len(ts)
    for i in range(n):
        k = n - 1 - i  # transition levels[k + 1] (less noisy) -> levels[k], timestep ts[k]
        x_next = ddim_step(x, _eps(eps_fn, x, ts[k], x0.dtype), levels[k + 1], levels[k])
        for _ in range(refine_iters):
            x_next = ddim_step(x, _eps(eps_fn, x_next, ts[k], x0.dtype), levels[k + 1], levels[k])
        x = x_next
        if trajectory is not None:
            visited.append(x)
        if callback is not None:
            callback(i, n, x)
    if trajectory is not None:
        trajectory.extend(reversed(visited))
    return x.to(x0.dtype)


# ----------------------------------------------------------------------------- null-text inversion


def null_text_inversion(
    pivots: Sequence[torch.Tensor],
    cond_eps_fn: EpsFn,
    uncond_eps_fn: NullEpsFn,
    nulls: Sequence[torch.Tensor],
    alphas_cumprod: torch.Tensor,
    cfg: float,
    callback: Callback | None = None,
    *,
    timesteps: Sequence[int] | None = None,
    inner_iters: int = 10,
    lr: float = 1e-2,
    early_stop: float = 1e-5,
    losses: list | None = None,
) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """Null-text inversion (Mokady et al. 2023, Alg. 1): per-step unconditional embeddings that
    make cfg-guided DDIM sampling from ``pivots[0]`` retrace the pivot trajectory.

    ``pivots`` are the latents of a (cfg 1) DDIM inversion in sampling order, x_T first and the
    clean latent last (``ddim_invert(..., trajectory=list)``). Guided eps is
    ``e_u + cfg (e_c - e_u)`` with ``e_c = cond_eps_fn(x, t)`` (once per step, no gradient) and
    ``e_u = uncond_eps_fn(x, t, embeddings)``. At step i, starting from step i-1's result (the
    paper's warm start), Adam (``lr``) minimizes the MSE between the guided step from the current
    latent and the pivot ``pivots[i+1]``, for at most ``inner_iters`` updates, stopping early once
    the MSE is below ``early_stop``; the step keeps the embeddings of the lowest MSE seen (Adam
    can overshoot, so the last update is not always the best; never worse than the warm start),
    and the latent moves on with them, so errors of earlier steps are corrected by later ones.
    Costs per step one cond call plus at most ``inner_iters`` uncond calls with backward and one
    without (none at cfg 1, where the embeddings have no effect). ``losses``, a list, receives
    per step the MSE of every evaluation (empty at cfg 1).

    Returns (the reconstruction of the clean latent, one list of embeddings per step, aligned with
    ``timesteps``: what the unconditional branch must use at that step to retrace the pivots).
    ``callback(i, n, x)`` runs after each step; ``uncond_eps_fn`` may raise to cancel. Works under
    an outer ``torch.inference_mode()``/``no_grad()``: the optimization enables grad itself.
    """
    ts = list(timesteps) if timesteps is not None else ddim_timesteps(len(alphas_cumprod), len(pivots) - 1)
    if len(pivots) != len(ts) + 1:
        raise ValueError(
            f"null_text_inversion needs {len(ts) + 1} pivots (x_T .. x0) for {len(ts)} steps, got {len(pivots)}"
        )
    levels = _levels(alphas_cumprod, ts)
    in_dtype = pivots[0].dtype
    guided = not math.isclose(cfg, 1.0)
    per_step = []
    # Pivots made under inference mode cannot be saved for backward: normal copies.
    with torch.inference_mode(False):
        work = torch.promote_types(in_dtype, torch.float32)
        targets = [p.clone().to(work) for p in pivots]
        params = [n.detach().clone().float().requires_grad_(True) for n in nulls]
        x = targets[0]
        for i, t in enumerate(ts):
            with torch.no_grad():
                e_c = _eps(cond_eps_fn, x, t, in_dtype)
            step_losses = []
            if not guided:
                x_prev = ddim_step(x, e_c, levels[i], levels[i + 1])
            else:
                x_prev = _null_text_step(
                    x,
                    e_c,
                    t,
                    params,
                    uncond_eps_fn,
                    cfg,
                    levels[i],
                    levels[i + 1],
                    targets[i + 1],
                    in_dtype,
                    inner_iters,
                    lr,
                    early_stop,
                    step_losses,
                )
            if losses is not None:
                losses.append(step_losses)
            x = x_prev.detach()
            per_step.append([p.detach().clone() for p in params])
            if callback is not None:
                callback(i, len(ts), x)
    return x.to(in_dtype), per_step


def _null_text_step(
    x, e_c, t, params, uncond_eps_fn, cfg, alpha_t, alpha_prev, target, in_dtype, inner_iters, lr, early_stop, losses
):
    """Optimize ``params`` in place for one step (left at the best iterate); return the guided
    step's result with them. ``losses`` receives the MSE of every evaluation."""
    optimizer = torch.optim.Adam(params, lr=lr)
    best = None  # (loss, x_prev, embeddings)
    for j in range(inner_iters + 1):
        last = j == inner_iters  # the final evaluation after the last update needs no gradient
        with torch.set_grad_enabled(not last):
            e_u = uncond_eps_fn(x.to(in_dtype), t, params).to(device=x.device, dtype=x.dtype)
            x_prev = ddim_step(x, e_u + cfg * (e_c - e_u), alpha_t, alpha_prev)
            loss = torch.nn.functional.mse_loss(x_prev, target)
        losses.append(loss.item())
        if best is None or losses[-1] < best[0]:
            best = (losses[-1], x_prev.detach(), [p.detach().clone() for p in params])
        if last or losses[-1] < early_stop:
            break
        # autograd.grad, not backward(): only the embeddings get gradients, never model weights.
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
    with torch.no_grad():
        for p, b in zip(params, best[2]):
            p.copy_(b)
    return best[1]


# ----------------------------------------------------------------------------- over a k-diffusion denoiser

# ComfyUI's samplers (k-diffusion) carry x_sigma = x0 + sigma * eps and call a denoiser
# (x_sigma, sigma per row) -> x0; DDIM carries x_t = sqrt(a) x0 + sqrt(1 - a) eps with
# a = 1 / (1 + sigma^2), so x_sigma = x_t * sqrt(1 + sigma^2). These run DDIM on such a denoiser.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (step i, x_sigma after step i, the denoised x0 of its last model call): previews, progress.
SigmaCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def to_sigma_space(x_t: torch.Tensor, sigma: float) -> torch.Tensor:
    return x_t * math.sqrt(1.0 + sigma * sigma)


def from_sigma_space(x_sigma: torch.Tensor, sigma: float) -> torch.Tensor:
    return x_sigma / math.sqrt(1.0 + sigma * sigma)


def sampling_sigmas(table_sigmas: torch.Tensor, timesteps: Sequence[int], invert: bool) -> torch.Tensor:
    """The sigmas a DDIM pass over ``timesteps`` visits: descending to 0, or (invert) ascending from 0."""
    levels = torch.tensor([float(table_sigmas[t]) for t in timesteps] + [0.0])
    return levels.flip(0) if invert else levels


class _DenoiserEps:
    """DDIM's eps(x_t, t) over a denoiser; keeps the last denoised x0 (for previews)."""

    def __init__(self, denoise: Denoiser, table_sigmas: torch.Tensor, batch: int):
        self.denoise, self.table_sigmas, self.batch, self.denoised = denoise, table_sigmas, batch, None

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        sigma = float(self.table_sigmas[t])
        x_sigma = to_sigma_space(x_t, sigma)
        denoised = self.denoise(x_sigma, x_t.new_full([self.batch], sigma))
        self.denoised = denoised.detach()
        return (x_sigma - denoised) / sigma  # not detached: null-text inversion differentiates it


def _sigma_callback(callback: SigmaCallback | None, sigmas: torch.Tensor, eps: _DenoiserEps) -> Callback | None:
    if callback is None:
        return None
    return lambda i, n, x_t: callback(i, to_sigma_space(x_t, float(sigmas[i + 1])), eps.denoised)


def ddim_on_denoiser(
    denoise: Denoiser,
    x_sigma: torch.Tensor,
    sigmas: torch.Tensor,
    table_sigmas: torch.Tensor,
    timesteps: Sequence[int],
    *,
    invert: bool = False,
    refine_iters: int = 0,
    trajectory: list | None = None,
    callback: SigmaCallback | None = None,
) -> torch.Tensor:
    """``ddim_sample`` (or, with ``invert``, ``ddim_invert``) from x_sigma at sigmas[0] to
    sigmas[-1] (see ``sampling_sigmas``) in sigma space; ``table_sigmas``: the model's sigma per
    training timestep; ``trajectory`` (x_t space): see ``ddim_invert``."""
    eps = _DenoiserEps(denoise, table_sigmas, x_sigma.shape[0])
    run, extra = (
        (ddim_invert, {"refine_iters": refine_iters, "trajectory": trajectory}) if invert else (ddim_sample, {})
    )
    x_t = from_sigma_space(x_sigma, float(sigmas[0]))
    alphas = alphas_cumprod_from_sigmas(table_sigmas.double())
    x_t = run(x_t, eps, alphas, len(timesteps), _sigma_callback(callback, sigmas, eps), timesteps=timesteps, **extra)
    return to_sigma_space(x_t, float(sigmas[-1]))


def null_text_on_denoisers(
    cond: Denoiser,
    uncond: Callable[[Sequence[torch.Tensor]], Denoiser],
    pivots: Sequence[torch.Tensor],
    nulls: Sequence[torch.Tensor],
    sigmas: torch.Tensor,
    table_sigmas: torch.Tensor,
    timesteps: Sequence[int],
    cfg: float,
    callback: SigmaCallback | None = None,
    **settings,
) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """``null_text_inversion`` over denoisers: ``cond`` denoises with the positive prompt,
    ``uncond(embeddings)`` is the negative prompt's denoiser with those embeddings. Returns (the
    reconstruction as x_sigma at sigmas[-1], the embeddings per step)."""
    batch = pivots[0].shape[0]
    cond_eps = _DenoiserEps(cond, table_sigmas, batch)

    def uncond_eps(x_t, t, embeddings):
        return _DenoiserEps(uncond(embeddings), table_sigmas, batch)(x_t, t)

    alphas = alphas_cumprod_from_sigmas(table_sigmas.double())
    step_done = _sigma_callback(callback, sigmas, cond_eps)
    x_t, per_step = null_text_inversion(
        pivots, cond_eps, uncond_eps, nulls, alphas, cfg, step_done, timesteps=timesteps, **settings
    )
    return to_sigma_space(x_t, float(sigmas[-1])), per_step

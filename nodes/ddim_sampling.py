"""DDIM passes through ComfyUI's own sampling path (guider, sampler, conds, patches, previews).

The DDIM math is mixture_core.ddim (eta 0, exact mirror of inversion and sampling); here it runs
as a ComfyUI sampler, so the model's own sampling path applies: its model_sampling table, its
latent scaling, cfg, conditioning, other packs' patches, previews, the progress bar and the Cancel
button (raised from the progress hook at the next step). What a pass needs beyond the denoiser
ComfyUI hands a sampler (the positive and negative branches apart, for null-text inversion) comes
from a CFGGuider subclass, as comfy_extras' guiders read their own conds in predict_noise.
"""

from __future__ import annotations

import math

import comfy.conds
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import latent_preview
import torch

from ..mixture_core import ddim


def require_epsilon_model(model) -> None:
    """DDIM here assumes noise prediction on a discrete schedule (SD1.x, SDXL base)."""
    sampling = model.get_model_object("model_sampling")
    other = (comfy.model_sampling.V_PREDICTION, comfy.model_sampling.CONST, comfy.model_sampling.EDM)
    if (
        not isinstance(sampling, comfy.model_sampling.EPS)
        or isinstance(sampling, other)
        or not hasattr(sampling, "sigmas")
    ):
        kind = type(sampling).__name__
        raise ValueError(
            f"DDIM inversion needs an epsilon-prediction model with a discrete noise schedule (SD1.5, SDXL base); "
            f"this model's sampling is {kind} (v-prediction and flow models are not supported)"
        )


def _k_callback(callback, sigmas):
    """mixture_core.ddim's per-step callback -> the k-diffusion callback (previews, progress bar)."""
    if callback is None:
        return None
    return lambda i, x, denoised: callback(
        {"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised}
    )


def _ddim_sampler_function(
    model, x, sigmas, extra_args=None, callback=None, disable=None, table_sigmas=None, timesteps=None, **options
):
    """A k-diffusion-style sampler over ComfyUI's denoiser (cfg, patches and all). ``options``:
    invert, refine_iters, trajectory (mixture_core.ddim.ddim_on_denoiser)."""
    extra_args = extra_args or {}
    return ddim.ddim_on_denoiser(
        lambda x_sigma, sigma: model(x_sigma, sigma, **extra_args),
        x,
        sigmas,
        table_sigmas,
        timesteps,
        callback=_k_callback(callback, sigmas),
        **options,
    )


def _with_embeddings(conds, embeddings):
    """The (processed) negative conds with their cross-attention replaced by ``embeddings``, one per
    entry; the dicts are copies, so uuids, areas, masks and timestep ranges stay as they were."""
    if len(embeddings) != len(conds):
        raise RuntimeError(f"{len(embeddings)} optimized null-text embeddings for {len(conds)} negative entries")
    out = []
    for c, e in zip(conds, embeddings):
        original = c["model_conds"]["c_crossattn"].cond
        crossattn = comfy.conds.CONDCrossAttn(e.to(device=original.device, dtype=original.dtype))
        out.append({**c, "model_conds": {**c["model_conds"], "c_crossattn": crossattn}})
    return out


class _PerStepNegativeGuider(comfy.samplers.CFGGuider):
    """CFG whose negative prompt uses the null-text embeddings optimized for the step being
    sampled (matched by the step's training timestep); any other sigma uses the negative as is."""

    def __init__(self, model_patcher, embeddings_by_t: dict, table_sigmas):
        super().__init__(model_patcher)
        self.embeddings_by_t, self.table_sigmas = embeddings_by_t, table_sigmas

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (CFGGuider's signature)
        negative = self.conds.get("negative")
        sigma = float(timestep.flatten()[0])
        t = ddim.timestep_from_sigma(sigma, self.table_sigmas)
        if t in self.embeddings_by_t and math.isclose(sigma, float(self.table_sigmas[t]), rel_tol=1e-4):
            negative = _with_embeddings(negative, self.embeddings_by_t[t])
        return comfy.samplers.sampling_function(
            self.inner_model,
            x,
            timestep,
            negative,
            self.conds.get("positive"),
            self.cfg,
            model_options=model_options,
            seed=seed,
        )


class _NullTextGuider(comfy.samplers.CFGGuider):
    """The guider of the null-text optimization pass: its sampler (``sampler()``) runs
    mixture_core.ddim.null_text_on_denoisers on the guider's own processed conds and model through
    calc_cond_batch, so the model's patches, hooks and wrappers apply; the negative entries'
    cross-attention tensors are what gets optimized. ``embeddings`` receives {timestep index:
    [one embedding per negative entry]}."""

    def __init__(self, model_patcher, table_sigmas, timesteps, pivots, settings: dict):
        super().__init__(model_patcher)
        self.table_sigmas, self.timesteps, self.pivots, self.settings = table_sigmas, timesteps, pivots, settings
        self.embeddings: dict[int, list[torch.Tensor]] = {}

    def sampler(self):
        return comfy.samplers.KSAMPLER(self._optimize)

    def _denoiser(self, conds, model_options):
        return lambda x_sigma, sigma: comfy.samplers.calc_cond_batch(
            self.inner_model, [conds], x_sigma, sigma, model_options
        )[0]

    def _optimize(self, model, x, sigmas, extra_args=None, callback=None, disable=None):
        """The sampler function (``model`` is ComfyUI's wrapper of this guider, not needed: the
        branches are evaluated apart)."""
        model_options = extra_args["model_options"]
        positive, negative = self.conds.get("positive"), self.conds.get("negative") or []
        if not negative or any("c_crossattn" not in c.get("model_conds", {}) for c in negative):
            raise ValueError(
                "null-text inversion optimizes the negative prompt's text embedding: connect a negative "
                "conditioning from a text encoder (e.g. CLIP Text Encode of an empty prompt)"
            )

        def uncond(embeddings):
            comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel within a step's updates
            return self._denoiser(_with_embeddings(negative, embeddings), model_options)

        x_sigma, per_step = ddim.null_text_on_denoisers(
            self._denoiser(positive, model_options),
            uncond,
            self.pivots,
            [c["model_conds"]["c_crossattn"].cond for c in negative],
            sigmas,
            self.table_sigmas,
            self.timesteps,
            self.cfg,
            _k_callback(callback, sigmas),
            **self.settings,
        )
        self.embeddings.update(zip(self.timesteps, per_step))
        return x_sigma


def _autograd_ready(model):
    """A clone whose UNet layers compute with fresh copies of their weights (ComfyUI's cast path,
    forced by an identity weight wrapper). ComfyUI runs nodes under torch.inference_mode, so the
    loaded weights are inference tensors, which autograd refuses to save for the backward pass of
    the null-text optimization; the copies are normal tensors, detached so no weight gets a grad."""
    patched = model.clone()
    for name, module in patched.get_model_object("diffusion_model").named_modules():
        if hasattr(module, "weight_function"):
            for param in ("weight", "bias"):
                if getattr(module, param, None) is not None:
                    patched.add_weight_wrapper(f"diffusion_model.{name}.{param}", torch.Tensor.detach)
    return patched


def _table_and_sigmas(model, steps, invert):
    require_epsilon_model(model)
    table = model.get_model_object("model_sampling").sigmas.float().cpu()
    timesteps = ddim.ddim_timesteps(len(table), steps)
    return table, timesteps, ddim.sampling_sigmas(table, timesteps, invert)


def _sample(guider, sampler, sigmas, latent, positive, negative, cfg, progress, seed):
    """One pass through ComfyUI's sampling path (as comfy.sample.sample_custom, with our guider).
    `progress` is (ProgressBar, offset, total) so that several passes share one bar."""
    model = guider.model_patcher
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    callback = None
    if progress is not None:
        pbar, offset, total = progress
        previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)

        def callback(step, x0, x, total_steps):
            preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
            pbar.update_absolute(offset + step + 1, total, preview)

    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    out = guider.sample(
        torch.zeros_like(samples), samples, sampler, sigmas, callback=callback, disable_pbar=True, seed=seed
    )
    return out.to(comfy.model_management.intermediate_device())


def run_ddim(
    model,
    latent,
    positive,
    negative,
    steps,
    cfg,
    invert,
    refine_iters=0,
    progress=None,
    seed=0,
    trajectory=None,
    negative_per_step=None,
):
    """One DDIM pass (inversion up to the noisiest step, or sampling down to clean) through
    ComfyUI's sampler machinery; returns the new latent samples. ``trajectory`` (inversion only)
    receives the DDIM latents visited, x_T first: the null-text pivots; ``negative_per_step``:
    null-text embeddings by timestep, from run_null_text, used by the negative prompt at their own
    steps (sampling only)."""
    table, timesteps, sigmas = _table_and_sigmas(model, steps, invert)
    options = {"invert": invert, "refine_iters": refine_iters, "trajectory": trajectory}
    sampler = comfy.samplers.KSAMPLER(
        _ddim_sampler_function, extra_options={"table_sigmas": table, "timesteps": timesteps, **options}
    )
    guider = (
        _PerStepNegativeGuider(model, negative_per_step, table)
        if negative_per_step
        else comfy.samplers.CFGGuider(model)
    )
    return _sample(guider, sampler, sigmas, latent, positive, negative, cfg, progress, seed)


def run_null_text(
    model,
    latent,
    pivots,
    positive,
    negative,
    steps,
    cfg,
    inner_iters=10,
    lr=1e-2,
    early_stop=1e-5,
    progress=None,
    seed=0,
    losses=None,
):
    """Null-text inversion's optimization pass (Mokady et al. 2023): from the inverted ``latent``
    and the inversion's ``pivots`` (run_ddim(..., trajectory=list)), tunes the negative prompt's
    embeddings step by step so that sampling at ``cfg`` retraces the inversion. Returns (the
    reconstruction, {timestep index: embeddings}) for run_ddim(..., negative_per_step=...).
    ``losses``: see mixture_core.ddim.null_text_inversion."""
    table, timesteps, sigmas = _table_and_sigmas(model, steps, invert=False)
    settings = {"inner_iters": inner_iters, "lr": lr, "early_stop": early_stop, "losses": losses}
    guider = _NullTextGuider(_autograd_ready(model), table, timesteps, pivots, settings)
    reconstruction = _sample(guider, guider.sampler(), sigmas, latent, positive, negative, cfg, progress, seed)
    return reconstruction, guider.embeddings

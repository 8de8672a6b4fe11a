"""DDIM inversion of a real photo and MoA subject swap from the inverted latent.

The DDIM math is mixture_core.ddim (eta 0, exact mirror of inversion and sampling); here it
runs as a ComfyUI sampler, so the model's own sampling path applies: its model_sampling
table, its latent scaling, cfg, conditioning, other packs' patches, previews, the progress
bar and the Cancel button (raised from the progress hook at the next step).
"""

from __future__ import annotations

import math

import comfy.conds
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..mixture_core import ddim

_STEPS_TIP = "DDIM steps (more: a more exact inversion, slower)"


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


def _eps_fn(denoise, table_sigmas, batch: int, last: dict):
    """DDIM's eps(x_t, t) over a ComfyUI denoiser ``denoise(x_sigma, sigma_per_row) -> x0``:
    converts x_sigma = x0 + sigma * eps to x_t = sqrt(a) x0 + sqrt(1 - a) eps and back."""

    def eps_fn(x_t, t):
        sigma = float(table_sigmas[t])
        x_sigma = x_t * math.sqrt(1.0 + sigma * sigma)
        denoised = denoise(x_sigma, x_t.new_full([batch], sigma))
        last["denoised"] = denoised.detach()
        return (x_sigma - denoised) / sigma

    return eps_fn


def _step_callback(callback, sigmas, last: dict):
    """DDIM's per-step callback -> the k-diffusion callback (previews and the progress bar)."""
    if callback is None:
        return None

    def step_done(i, n, x_t):
        sigma = float(sigmas[i + 1])
        callback(
            {
                "i": i,
                "x": x_t * math.sqrt(1.0 + sigma * sigma),
                "sigma": sigmas[i],
                "sigma_hat": sigmas[i],
                "denoised": last["denoised"],
            }
        )

    return step_done


def _ddim_sampler_function(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    table_sigmas=None,
    timesteps=None,
    invert=False,
    refine_iters=0,
    trajectory=None,
):
    """A k-diffusion-style sampler over ComfyUI's denoiser (cfg, patches and all). ``trajectory``
    (inversion only) receives the DDIM latents visited, x_T first: the null-text pivots."""
    extra_args = extra_args or {}
    alphas = ddim.alphas_cumprod_from_sigmas(table_sigmas.double())
    last = {}
    eps_fn = _eps_fn(lambda x_sigma, sigma: model(x_sigma, sigma, **extra_args), table_sigmas, x.shape[0], last)
    step_done = _step_callback(callback, sigmas, last)
    x_t = x / math.sqrt(1.0 + float(sigmas[0]) ** 2)
    if invert:
        x_t = ddim.ddim_invert(
            x_t,
            eps_fn,
            alphas,
            len(timesteps),
            step_done,
            timesteps=timesteps,
            refine_iters=refine_iters,
            trajectory=trajectory,
        )
    else:
        x_t = ddim.ddim_sample(x_t, eps_fn, alphas, len(timesteps), step_done, timesteps=timesteps)
    return x_t * math.sqrt(1.0 + float(sigmas[-1]) ** 2)


def _with_embeddings(conds, embeddings):
    """The (processed) negative conds with their cross-attention replaced by ``embeddings``, one per
    entry; the dicts are copies, so uuids, areas, masks and timestep ranges stay as they were."""
    if len(embeddings) != len(conds):
        raise RuntimeError(f"{len(embeddings)} optimized null-text embeddings for {len(conds)} negative entries")
    out = []
    for c, e in zip(conds, embeddings):
        original = c["model_conds"]["c_crossattn"].cond
        out.append(
            {
                **c,
                "model_conds": {
                    **c["model_conds"],
                    "c_crossattn": comfy.conds.CONDCrossAttn(e.to(device=original.device, dtype=original.dtype)),
                },
            }
        )
    return out


def _null_text_sampler_function(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    table_sigmas=None,
    timesteps=None,
    pivots=None,
    settings=None,
    embeddings_out=None,
):
    """Null-text optimization (mixture_core.ddim.null_text_inversion) through ComfyUI's own cond
    path: the guider's processed conds and calc_cond_batch, so the model's patches, hooks and
    wrappers apply; the negative entries' cross-attention tensors are what gets optimized.
    ``embeddings_out`` receives {timestep index: [one embedding per negative entry]}."""
    guider = model.inner_model  # KSamplerX0Inpaint -> the CFGGuider of this pass
    base, model_options = guider.inner_model, extra_args["model_options"]
    positive, negative = guider.conds.get("positive"), guider.conds.get("negative") or []
    if not negative or any("c_crossattn" not in c.get("model_conds", {}) for c in negative):
        raise ValueError(
            "null-text inversion optimizes the negative prompt's text embedding: connect a negative "
            "conditioning from a text encoder (e.g. CLIP Text Encode of an empty prompt)"
        )
    alphas = ddim.alphas_cumprod_from_sigmas(table_sigmas.double())
    last = {}

    def denoise_with(conds):
        return lambda x_sigma, sigma: comfy.samplers.calc_cond_batch(base, [conds], x_sigma, sigma, model_options)[0]

    cond_eps = _eps_fn(denoise_with(positive), table_sigmas, x.shape[0], last)

    def uncond_eps(x_t, t, embeddings):
        comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel within a step's updates
        return _eps_fn(denoise_with(_with_embeddings(negative, embeddings)), table_sigmas, x.shape[0], {})(x_t, t)

    initial = [c["model_conds"]["c_crossattn"].cond for c in negative]
    x_t, per_step = ddim.null_text_inversion(
        pivots,
        cond_eps,
        uncond_eps,
        initial,
        alphas,
        guider.cfg,
        _step_callback(callback, sigmas, last),
        timesteps=timesteps,
        **settings,
    )
    embeddings_out.update(zip(timesteps, per_step))
    return x_t * math.sqrt(1.0 + float(sigmas[-1]) ** 2)


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


def _autograd_ready(model):
    """A clone whose UNet layers compute with fresh copies of their weights (ComfyUI's cast path,
    forced by an identity weight wrapper). ComfyUI runs nodes under torch.inference_mode, so the
    loaded weights are inference tensors, which autograd refuses to save for the backward pass of
    the null-text optimization; the copies are normal tensors, detached so no weight gets a grad."""
    patched = model.clone()
    for name, module in patched.model.diffusion_model.named_modules():
        if hasattr(module, "weight_function"):
            for param in ("weight", "bias"):
                if getattr(module, param, None) is not None:
                    patched.add_weight_wrapper(f"diffusion_model.{name}.{param}", torch.Tensor.detach)
    return patched


def _table_and_sigmas(model, steps, invert):
    require_epsilon_model(model)
    table = model.get_model_object("model_sampling").sigmas.float().cpu()
    timesteps = ddim.ddim_timesteps(len(table), steps)
    levels = torch.tensor([float(table[t]) for t in timesteps] + [0.0])  # descending, ends at 0
    return table, timesteps, (levels.flip(0) if invert else levels)


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
    ComfyUI's sampler machinery; returns the new latent samples. ``trajectory``: see
    _ddim_sampler_function; ``negative_per_step``: null-text embeddings by timestep, from
    run_null_text, used by the negative prompt at their own steps (sampling only)."""
    table, timesteps, sigmas = _table_and_sigmas(model, steps, invert)
    sampler = comfy.samplers.KSAMPLER(
        _ddim_sampler_function,
        extra_options={
            "table_sigmas": table,
            "timesteps": timesteps,
            "invert": invert,
            "refine_iters": refine_iters,
            "trajectory": trajectory,
        },
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
    embeddings = {}
    sampler = comfy.samplers.KSAMPLER(
        _null_text_sampler_function,
        extra_options={
            "table_sigmas": table,
            "timesteps": timesteps,
            "pivots": pivots,
            "embeddings_out": embeddings,
            "settings": {"inner_iters": inner_iters, "lr": lr, "early_stop": early_stop, "losses": losses},
        },
    )
    guider = comfy.samplers.CFGGuider(_autograd_ready(model))
    reconstruction = _sample(guider, sampler, sigmas, latent, positive, negative, cfg, progress, seed)
    return reconstruction, embeddings


def _check_image_size(image) -> None:
    if image.shape[0] == 0:
        raise ValueError("the image batch is empty")
    h, w = image.shape[1], image.shape[2]
    if h % 8 or w % 8:
        raise ValueError(
            f"the image is {w}x{h}; DDIM inversion needs width and height that are multiples of 8 "
            "(resize or crop it first, e.g. with ImageScale)"
        )


class DDIMInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoA_DDIMInvert",
            display_name="DDIM Invert",
            category="MoA",
            description="Maps a clean latent (VAE Encode of a real photo) to the noise latent that DDIM sampling "
            "with the same model, prompt and steps turns back into it.",
            inputs=[
                io.Model.Input("model", tooltip="The plain model (prior) to invert with"),
                io.Conditioning.Input("positive", tooltip="The prompt that describes the photo, e.g. 'a person'"),
                io.Latent.Input("latent", tooltip="The clean latent of the photo (VAE Encode)"),
                io.Int.Input("steps", default=50, min=1, max=999, tooltip=_STEPS_TIP),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, tooltip="1 is exact and cheapest"),
                io.Int.Input(
                    "refine_iters",
                    default=0,
                    min=0,
                    max=10,
                    tooltip="Extra model calls per step that make the inversion more exact",
                ),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative prompt, used when cfg is not 1"),
            ],
            outputs=[io.Latent.Output(display_name="noise_latent")],
        )

    @classmethod
    def execute(cls, model, positive, latent, steps, cfg, refine_iters, negative=None) -> io.NodeOutput:
        pbar = comfy.utils.ProgressBar(steps)
        samples = run_ddim(
            model,
            latent,
            positive,
            negative if negative is not None else positive,
            steps,
            cfg,
            invert=True,
            refine_iters=refine_iters,
            progress=(pbar, 0, steps),
        )
        return io.NodeOutput({**latent, "samples": samples})


INVERSIONS = ["ddim", "null_text"]


class MoADDIMSwap(io.ComfyNode):
    """The MoA paper's real-image subject swap (Sec. 5.3): DDIM inversion of the photo with the
    prior, then generation with MoA from the inverted noise. At cfg > 1 plain inversion drifts
    (guided steps do not retrace the cfg-1 inversion); "null_text" adds null-text inversion
    (Mokady et al. 2023, which the paper cites there) so the regeneration stays on the photo."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoA_DDIMSwap",
            display_name="MoA DDIM Swap",
            category="MoA",
            description="Puts a new subject into a real photo: the photo is DDIM-inverted with the plain model "
            "(the prior) and regenerated from that noise with the MoA model, so pose, layout and background stay.",
            inputs=[
                io.Model.Input("model", tooltip="The plain model (prior), used for the inversion"),
                io.Model.Input("moa_model", tooltip="The model from MoA Subject Inject"),
                io.Conditioning.Input("positive", tooltip="From MoA Subject Inject (prompt such as 'a person')"),
                io.Conditioning.Input(
                    "negative",
                    tooltip="Negative prompt of the regeneration (and of the "
                    "inversion when inversion_cfg is not 1); with null_text, the embedding that gets "
                    "optimized (an empty prompt, as in the null-text paper)",
                ),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE: encodes the photo, decodes the result"),
                io.Image.Input("image", tooltip="The real photo; width and height multiples of 8"),
                io.Int.Input("steps", default=50, min=1, max=999, tooltip=_STEPS_TIP),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, tooltip="cfg of the regeneration"),
                io.Float.Input(
                    "inversion_cfg",
                    default=1.0,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    tooltip="cfg of the inversion; 1 is exact and cheapest (and what null_text starts from)",
                ),
                io.Int.Input(
                    "refine_iters",
                    default=0,
                    min=0,
                    max=10,
                    optional=True,
                    tooltip="Extra model calls per inversion step that make the inversion more exact "
                    "(the cfg-1 round trip); applies to both inversions",
                ),
                io.Combo.Input(
                    "inversion",
                    options=INVERSIONS,
                    default="ddim",
                    optional=True,
                    tooltip="ddim: plain DDIM inversion, exact only when cfg is 1. null_text: also "
                    "optimizes the negative embedding at every step (Mokady et al. 2023) so that "
                    "regenerating at this cfg retraces the photo; costs up to null_text_iters + 2 "
                    "extra model calls (with backward) per step",
                ),
                io.Int.Input(
                    "null_text_iters",
                    default=10,
                    min=1,
                    max=100,
                    optional=True,
                    tooltip="null_text: most Adam updates of the embedding per step (paper: 10)",
                ),
                io.Float.Input(
                    "null_text_lr",
                    default=0.01,
                    min=0.0001,
                    max=1.0,
                    step=0.001,
                    optional=True,
                    tooltip="null_text: Adam learning rate (paper: 0.01)",
                ),
                io.Float.Input(
                    "null_text_early_stop",
                    default=1e-5,
                    min=0.0,
                    max=1.0,
                    step=1e-6,
                    optional=True,
                    tooltip="null_text: a step stops updating once the latent MSE to the inversion "
                    "is below this (paper: 1e-5)",
                ),
            ],
            outputs=[io.Image.Output(), io.Latent.Output()],
        )

    @classmethod
    def execute(
        cls,
        model,
        moa_model,
        positive,
        negative,
        vae,
        image,
        steps,
        cfg,
        inversion_cfg,
        refine_iters=0,
        inversion="ddim",
        null_text_iters=10,
        null_text_lr=0.01,
        null_text_early_stop=1e-5,
    ) -> io.NodeOutput:
        if inversion not in INVERSIONS:
            raise ValueError(f"inversion must be one of {INVERSIONS}, got {inversion!r}")
        _check_image_size(image)
        require_epsilon_model(model)
        require_epsilon_model(moa_model)
        latent = {"samples": vae.encode(image[:, :, :, :3])}
        # One bar over every pass: inversion, null-text optimization (if any), regeneration.
        optimize = inversion == "null_text" and not math.isclose(cfg, 1.0)  # at cfg 1 the negative has no effect
        passes = 3 if optimize else 2
        pbar = comfy.utils.ProgressBar(passes * steps)
        pivots = [] if optimize else None
        noise = run_ddim(
            model,
            latent,
            positive,
            negative,
            steps,
            inversion_cfg,
            invert=True,
            refine_iters=refine_iters,
            progress=(pbar, 0, passes * steps),
            trajectory=pivots,
        )
        per_step = None
        if optimize:
            _, per_step = run_null_text(
                model,
                {"samples": noise},
                pivots,
                positive,
                negative,
                steps,
                cfg,
                null_text_iters,
                null_text_lr,
                null_text_early_stop,
                progress=(pbar, steps, passes * steps),
            )
        swapped = run_ddim(
            moa_model,
            {"samples": noise},
            positive,
            negative,
            steps,
            cfg,
            invert=False,
            progress=(pbar, (passes - 1) * steps, passes * steps),
            negative_per_step=per_step,
        )
        return io.NodeOutput(vae.decode(swapped), {"samples": swapped})


NODES = [DDIMInvert, MoADDIMSwap]

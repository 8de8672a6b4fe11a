"""DDIM inversion of a real photo and MoA subject swap from the inverted latent.

The DDIM math is mixture_core.ddim (eta 0, exact mirror of inversion and sampling); here it
runs as a ComfyUI sampler, so the model's own sampling path applies: its model_sampling
table, its latent scaling, cfg, conditioning, other packs' patches, previews, the progress
bar and the Cancel button (raised from the progress hook at the next step).
"""

from __future__ import annotations

import math

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
    if not isinstance(sampling, comfy.model_sampling.EPS) or isinstance(sampling, other) or not hasattr(sampling, "sigmas"):
        kind = type(sampling).__name__
        raise ValueError(
            f"DDIM inversion needs an epsilon-prediction model with a discrete noise schedule (SD1.5, SDXL base); "
            f"this model's sampling is {kind} (v-prediction and flow models are not supported)"
        )


def _ddim_sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           table_sigmas=None, timesteps=None, invert=False, refine_iters=0):
    """A k-diffusion-style sampler over ComfyUI's denoiser: converts between ComfyUI's
    x_sigma = x0 + sigma * eps and DDIM's x_t = sqrt(a) x0 + sqrt(1 - a) eps."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    alphas = ddim.alphas_cumprod_from_sigmas(table_sigmas.double())
    last = {}

    def eps_fn(x_t, t):
        sigma = float(table_sigmas[t])
        x_sigma = x_t * math.sqrt(1.0 + sigma * sigma)
        denoised = model(x_sigma, sigma * s_in, **extra_args)
        last["denoised"], last["sigma"] = denoised, sigma
        return (x_sigma - denoised) / sigma

    def step_done(i, n, x_t):
        if callback is not None:
            sigma = float(sigmas[i + 1])
            callback({"i": i, "x": x_t * math.sqrt(1.0 + sigma * sigma), "sigma": sigmas[i],
                      "sigma_hat": sigmas[i], "denoised": last["denoised"]})

    x_t = x / math.sqrt(1.0 + float(sigmas[0]) ** 2)
    if invert:
        x_t = ddim.ddim_invert(x_t, eps_fn, alphas, len(timesteps), step_done, timesteps=timesteps, refine_iters=refine_iters)
    else:
        x_t = ddim.ddim_sample(x_t, eps_fn, alphas, len(timesteps), step_done, timesteps=timesteps)
    return x_t * math.sqrt(1.0 + float(sigmas[-1]) ** 2)


def run_ddim(model, latent, positive, negative, steps, cfg, invert, refine_iters=0, progress=None, seed=0):
    """One DDIM pass (inversion up to the noisiest step, or sampling down to clean) through
    ComfyUI's sampler machinery. `progress` is (ProgressBar, offset, total) so that two
    passes share one bar; returns the new latent samples."""
    require_epsilon_model(model)
    table = model.get_model_object("model_sampling").sigmas.float().cpu()
    timesteps = ddim.ddim_timesteps(len(table), steps)
    levels = torch.tensor([float(table[t]) for t in timesteps] + [0.0])  # descending, ends at 0
    sigmas = levels.flip(0) if invert else levels
    sampler = comfy.samplers.KSAMPLER(
        _ddim_sampler_function,
        extra_options={"table_sigmas": table, "timesteps": timesteps, "invert": invert, "refine_iters": refine_iters},
    )
    samples = latent["samples"]
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    callback = None
    if progress is not None:
        pbar, offset, total = progress
        previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)

        def callback(step, x0, x, total_steps):
            preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
            pbar.update_absolute(offset + step + 1, total, preview)

    return comfy.sample.sample_custom(
        model, torch.zeros_like(samples), cfg, sampler, sigmas, positive, negative, samples,
        callback=callback, disable_pbar=True, seed=seed,
    )


def _check_image_size(image) -> None:
    if image.shape[0] == 0:
        raise ValueError("the image batch is empty")
    h, w = image.shape[1], image.shape[2]
    if h % 8 or w % 8:
        raise ValueError(f"the image is {w}x{h}; DDIM inversion needs width and height that are multiples of 8 "
                         "(resize or crop it first, e.g. with ImageScale)")


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
                io.Int.Input("refine_iters", default=0, min=0, max=10,
                             tooltip="Extra model calls per step that make the inversion more exact"),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative prompt, used when cfg is not 1"),
            ],
            outputs=[io.Latent.Output(display_name="noise_latent")],
        )

    @classmethod
    def execute(cls, model, positive, latent, steps, cfg, refine_iters, negative=None) -> io.NodeOutput:
        pbar = comfy.utils.ProgressBar(steps)
        samples = run_ddim(model, latent, positive, negative if negative is not None else positive, steps, cfg,
                           invert=True, refine_iters=refine_iters, progress=(pbar, 0, steps))
        return io.NodeOutput({**latent, "samples": samples})


class MoADDIMSwap(io.ComfyNode):
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
                io.Conditioning.Input("negative", tooltip="Negative prompt of the regeneration (and of the "
                                      "inversion when inversion_cfg is not 1)"),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE: encodes the photo, decodes the result"),
                io.Image.Input("image", tooltip="The real photo; width and height multiples of 8"),
                io.Int.Input("steps", default=50, min=1, max=999, tooltip=_STEPS_TIP),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, tooltip="cfg of the regeneration"),
                io.Float.Input("inversion_cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="cfg of the inversion; 1 is exact and cheapest"),
            ],
            outputs=[io.Image.Output(), io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, moa_model, positive, negative, vae, image, steps, cfg, inversion_cfg) -> io.NodeOutput:
        _check_image_size(image)
        require_epsilon_model(moa_model)
        latent = {"samples": vae.encode(image[:, :, :, :3])}
        pbar = comfy.utils.ProgressBar(2 * steps)
        noise = run_ddim(model, latent, positive, negative, steps, inversion_cfg, invert=True, progress=(pbar, 0, 2 * steps))
        swapped = run_ddim(moa_model, {"samples": noise}, positive, negative, steps, cfg, invert=False,
                           progress=(pbar, steps, 2 * steps))
        return io.NodeOutput(vae.decode(swapped), {"samples": swapped})


NODES = [DDIMInvert, MoADDIMSwap]

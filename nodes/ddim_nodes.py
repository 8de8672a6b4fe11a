"""The DDIM nodes: DDIM Invert and MoA DDIM Swap (the MoA paper's real-image subject swap,
Sec. 5.3). Their passes run through ComfyUI's sampling path in nodes/ddim_sampling.py."""

from __future__ import annotations

import math

import comfy.utils
import torch
import torch.nn.functional as F
from comfy_api.latest import io

from .ddim_sampling import require_epsilon_model, run_ddim, run_null_text

_STEPS_TIP = "DDIM steps (more: a more exact inversion, slower)"
# The VAE maps 8x8 pixels to one latent cell (SD1.x, SDXL); ComfyUI's UNet takes any latent size.
_PIXELS_PER_LATENT = 8


def pad_to_latent_grid(image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The image (B, H, W, C) padded by repeating its edge pixels until width and height are
    multiples of 8, the padding split between both sides as ComfyUI's VAE encode centres its crop; and
    (top, left, H, W), the photo's place in it. Padding rather than scaling or cropping: the photo's
    pixels stay as they are (no resampling blur, no pixel of the photo lost), the result lines up
    pixel for pixel with the photo, and the invented pixels (at most 4 on a side: less than one latent
    cell) are cut off again by ``crop_to``."""
    if image.shape[0] == 0:
        raise ValueError("the image batch is empty")
    h, w = image.shape[1], image.shape[2]
    pad_h, pad_w = -h % _PIXELS_PER_LATENT, -w % _PIXELS_PER_LATENT
    top, left = pad_h // 2, pad_w // 2
    if pad_h or pad_w:
        padded = F.pad(image.movedim(-1, 1), (left, pad_w - left, top, pad_h - top), mode="replicate")
        image = padded.movedim(1, -1)
    return image, (top, left, h, w)


def crop_to(image: torch.Tensor, place: tuple[int, int, int, int]) -> torch.Tensor:
    top, left, h, w = place
    return image[:, top : top + h, left : left + w]


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
                io.Image.Input(
                    "image",
                    tooltip="The real photo, any size: the result has the photo's size (edges are "
                    "padded to a multiple of 8 pixels for the VAE and cut off again)",
                ),
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
        image, place = pad_to_latent_grid(image)
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
        # The latent covers the padded photo (a latent has whole 8-pixel cells); the image is cropped back.
        return io.NodeOutput(crop_to(vae.decode(swapped), place), {"samples": swapped})


NODES = [DDIMInvert, MoADDIMSwap]

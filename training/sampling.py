"""Sample images written during training (--sample-every N): the same prompts, seed and sampler
every time, through ComfyUI's own sampler on the model being trained, so that a run's progress
can be looked at (as kohya's --sample_every_n_steps does).

The prompts are encoded once, before the CLIP is freed; the VAE is kept for decoding. Images go
to <work dir>/samples/step_<n>_<k>.png. Only the main process samples.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .cli import read_prompts, weight_dtype

log = logging.getLogger("mole.training")


class PromptSampler:
    """Encodes the prompts now; sample(step) writes one image per prompt."""

    def __init__(self, args, base, folder: Path):
        self.args, self.base, self.folder = args, base, folder
        self.vae = base.vae  # kept alive after the data pipeline frees the encoders
        clip = base.clip
        self.negative = self._cond(clip, "")
        self.positives = [self._cond(clip, p) for p in read_prompts(args.sample_prompts)]

    @staticmethod
    @torch.no_grad()
    def _cond(clip, text):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    @torch.no_grad()
    def sample(self, step: int, autocast) -> list[Path]:
        r = self.args.resolution
        self.folder.mkdir(parents=True, exist_ok=True)
        latent = torch.zeros(1, 4, r // 8, r // 8)
        # ComfyUI casts the sampler's input to diffusion_model.dtype: make it the frozen weights'
        # dtype (bf16 with --mixed-precision bf16), as training does (losses.diffusion_loss).
        unet = self.base.model_patcher.model.diffusion_model
        model_dtype, unet.dtype = unet.dtype, weight_dtype(self.args)
        try:
            # ComfyUI's noise seeds the global generator: keep the training's RNG state as it was.
            with torch.random.fork_rng(devices=[]), autocast():
                written = [self._one(step, k, positive, latent) for k, positive in enumerate(self.positives)]
        finally:
            unet.dtype = model_dtype
        log.info("samples of step %d: %s", step, ", ".join(p.name for p in written))
        return written

    def _one(self, step: int, k: int, positive, latent) -> Path:
        import comfy.sample
        from PIL import Image

        args = self.args
        noise = comfy.sample.prepare_noise(latent, args.sample_seed)
        out = comfy.sample.sample(
            self.base.model_patcher,
            noise,
            args.sample_steps,
            args.sample_cfg,
            "euler",
            "normal",
            positive,
            self.negative,
            latent,
            seed=args.sample_seed,
            disable_pbar=True,
        )
        image = self.vae.decode(out.float())[0].float().clamp(0, 1)
        path = self.folder / f"step_{step}_{k}.png"
        Image.fromarray((image.cpu().numpy() * 255).round().astype("uint8")).save(path)
        return path

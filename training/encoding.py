"""Captions to text embeddings with the loaded CLIP, pixels to latents with the loaded VAE, and
the batching of text embeddings of unequal length."""

from __future__ import annotations

import math

import torch

from .base_model import Base


def lcm_repeat(contexts: list[torch.Tensor]) -> torch.Tensor:
    """Stack text embeddings of different token lengths (long captions: multiples of 77) by
    repeating each to the least common multiple, as ComfyUI batches conds of unequal length."""
    lengths = [c.shape[1] for c in contexts]
    total = math.lcm(*lengths)
    return torch.cat([c.repeat(1, total // c.shape[1], 1) for c in contexts])


class Encoder:
    """Captions -> (context, pooled) with the loaded CLIP; pixels -> latents with the VAE,
    scaled as the model expects (latent_format.process_in)."""

    def __init__(self, base: Base, resolution: int):
        self.base, self.resolution = base, resolution
        self._text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def text(self, caption: str):
        if caption not in self._text:
            clip = self.base.clip
            cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
            self._text[caption] = (cond.float().cpu(), None if pooled is None else pooled.float().cpu())
        return self._text[caption]

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        raw = self.base.vae.encode(pixels)
        return self.base.model_patcher.model.latent_format.process_in(raw.float()).cpu()

    def adm(self, pooled: torch.Tensor | None) -> torch.Tensor | None:
        """The UNet's `y` input (SDXL: pooled text + size embeddings; None for SD1.x)."""
        model = self.base.model_patcher.model
        if getattr(model, "adm_channels", 0) == 0:
            return None
        r = self.resolution
        return model.encode_adm(pooled_output=pooled, width=r, height=r, crop_w=0, crop_h=0, target_width=r, target_height=r).float().cpu()

    def conditioning(self, captions: list[str]):
        texts = [self.text(c) for c in captions]
        context = lcm_repeat([t[0] for t in texts])
        ys = [self.adm(t[1]) for t in texts]
        y = None if ys[0] is None else torch.cat(ys)
        return context, y

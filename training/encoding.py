"""Captions to text embeddings with the loaded CLIP, pixels to latents with the loaded VAE, and
the batching of text embeddings of unequal length."""

from __future__ import annotations

import math
from collections import OrderedDict

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
    scaled as the model expects (latent_format.process_in).

    Text embeddings are kept for the last `text_cache` captions only (an SD1.5 caption is
    77 x 768 fp32, 236 KB; SDXL 77 x 2048, 631 KB): repeated captions (MoA's empty caption,
    small sets) are encoded once, and memory does not grow with the data set."""

    def __init__(self, base: Base, resolution: int, text_cache: int = 256):
        self.base, self.resolution, self.text_cache = base, resolution, text_cache
        self._text: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()

    @torch.no_grad()
    def text(self, caption: str):
        if caption in self._text:
            self._text.move_to_end(caption)
            return self._text[caption]
        clip = self.base.clip
        cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
        encoded = (cond.float().cpu(), None if pooled is None else pooled.float().cpu())
        self._text[caption] = encoded
        while len(self._text) > self.text_cache:
            self._text.popitem(last=False)
        return encoded

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
        return (
            model.encode_adm(
                pooled_output=pooled, width=r, height=r, crop_w=0, crop_h=0, target_width=r, target_height=r
            )
            .float()
            .cpu()
        )

    def conditioning(self, captions: list[str]):
        texts = [self.text(c) for c in captions]
        context = lcm_repeat([t[0] for t in texts])
        ys = [self.adm(t[1]) for t in texts]
        y = None if ys[0] is None else torch.cat(ys)
        return context, y

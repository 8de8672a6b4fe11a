"""The training-free MoA router: the personal share follows the subjects' cross-attention maps.

FastComposer trained each subject token's cross-attention map to cover that subject (its
localization loss on the cross-attentions outside the UNet's first and last blocks). A MoA
model converted from it has no learned router; this one reads the router off those maps:

    share(pixel) = max over subjects s of clamp(A_s / quantile_q(A_s), 0, 1)

A_s: subject s's token column of the personalized branch's cross-attention probabilities,
averaged over heads and over the map layers, at the previous sampling step (the current
step's maps are not known before its layers run), per image of the batch. Dividing by a high
quantile (0.98) rather than the maximum makes the subject's area 1 without letting one hot
pixel set the scale; pixels the subject's token does not attend to get 0 (the prior alone).
The layer applies strength * share (MoALayer.forward's share).

The maps are kept on the latent grid: each map layer's map is resized up to it (bilinear) and
averaged; the share is computed there once per step and averaged down to each layer's grid
(area pooling: a pixel block with no attention stays exactly 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def personal_share(maps: torch.Tensor, quantile: float) -> torch.Tensor:
    """(R, S, H, W) subject maps -> (R, 1, H, W): max over subjects of clamp(A / quantile(A), 0, 1),
    the quantile taken over each map's pixels; a map without attention (quantile 0) gives 0."""
    flat = maps.flatten(2).float()
    q = torch.quantile(flat, quantile, dim=-1, keepdim=True)  # (R, S, 1)
    ratio = torch.where(q > 0, flat / q.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return ratio.clamp(0.0, 1.0).amax(dim=1, keepdim=True).unflatten(-1, maps.shape[-2:])


def resize_share(share: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(R, 1, H, W) -> (R, 1, h, w): area average onto a coarser grid (exact zeros stay zero),
    bilinear onto a finer one."""
    if tuple(share.shape[-2:]) == tuple(grid):
        return share
    if grid[0] <= share.shape[-2] and grid[1] <= share.shape[-1]:
        return F.adaptive_avg_pool2d(share, grid)
    return F.interpolate(share, size=grid, mode="bilinear", align_corners=False)


class SubjectMaps:
    """The subject maps of one sampling run (made per run: the host adapter creates one in a
    sampling wrapper): the current step's, accumulated layer by layer, and the personal share
    derived from the previous step's.

    Steps are told apart by their sigma, a host float (the cond and uncond calls of one step
    share it). Maps are kept per image of the batch (the row's position inside its cond/uncond
    chunk), so an image's conditional and unconditional rows get the same share. Nothing here
    reads a device tensor on the host: the image indices come with their count."""

    def __init__(self, quantile: float):
        self.quantile = quantile
        self.reset()

    def reset(self) -> None:
        self.sigma: float | None = None
        self._sum: torch.Tensor | None = None  # (R, S, H, W) this step's maps, summed over layers
        self._count = 0
        self._share: torch.Tensor | None = None  # (R, 1, H, W) from the previous step
        self._resized: dict[tuple, torch.Tensor] = {}

    def step(self, sigma: float) -> None:
        """Called with each model call's sigma: a new sigma ends the step being recorded."""
        if self.sigma is not None and math.isclose(sigma, self.sigma, rel_tol=1e-6, abs_tol=1e-9):
            return
        self._share = None if self._sum is None else personal_share(self._sum / self._count, self.quantile)
        self._resized = {}
        self.sigma, self._sum, self._count = float(sigma), None, 0

    def add(self, maps: torch.Tensor, images: torch.Tensor, n_images: int, latent: tuple[int, int]) -> None:
        """One map layer's maps (rows, S, h, w) of the images `images` (rows,) out of n_images."""
        maps = maps.detach().float()
        if tuple(maps.shape[-2:]) != tuple(latent):
            maps = F.interpolate(maps, size=tuple(latent), mode="bilinear", align_corners=False)
        shape = (n_images, maps.shape[1], *latent)
        if self._sum is None or tuple(self._sum.shape) != shape or self._sum.device != maps.device:
            self._sum, self._count = maps.new_zeros(shape), 0
        self._sum.index_add_(0, images.to(maps.device), maps)
        self._count += 1

    def share(self, images: torch.Tensor, grid: tuple[int, int], n_images: int) -> torch.Tensor | None:
        """(B, h*w, 1) personal share of the rows showing `images` (B,), indices below n_images,
        at a layer of this grid, from the previous step; None before there is one (or for
        another batch layout)."""
        share = self._share
        if share is None or n_images > share.shape[0]:
            return None
        key = tuple(grid)
        if key not in self._resized:
            self._resized[key] = resize_share(share, key).flatten(2).transpose(1, 2)  # (R, h*w, 1)
        return self._resized[key][images.to(share.device)]

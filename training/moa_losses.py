"""MoA's training objective (MoA paper Sec. 3.3, on FastComposer's code where the paper is
silent): the layers each loss covers and the three losses, on batched tensors.

Layer sets are named by diffusers UNet blocks, the names FastComposer's code and the paper's
"block" use; ``mixture_core.unet_names.diffusers_block`` maps the pack's layer ids (SAI naming)
onto them.

* Router loss (paper Sec. 3.3.1): "we exclude the first and last block of the U-Net (i.e. first
  two and last three attention layers)": all MoA layers but down_blocks.0 (input_blocks.1/.2) and
  up_blocks.3 (output_blocks.9/.10/.11), attn1 and attn2: 22 of SD1.5's 32.
* Localization loss (FastComposer ``unet_store_cross_attention_scores(layers=5)``): the
  cross-attention (attn2) of down_blocks.1, down_blocks.2, mid_block, up_blocks.1, up_blocks.2:
  11 layers on SD1.5. The paper names no layer set for it: FastComposer's is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixture_core.unet_names import diffusers_block

ROUTER_EXCLUDED_BLOCKS = ("down_blocks.0", "up_blocks.3")
LOCALIZATION_BLOCKS = ("down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2")


def parse_blocks(spec: str, layer_ids: list[str], flag: str) -> tuple[str, ...]:
    """'down_blocks.0,up_blocks.3' -> the names, checked against the model's blocks."""
    names = tuple(b.strip() for b in spec.split(",") if b.strip())
    known = sorted({diffusers_block(i) for i in layer_ids})
    unknown = [b for b in names if b not in known]
    if unknown:
        raise ValueError(
            f"{flag}: {', '.join(unknown)} is not a UNet block with attention layers (these are: {', '.join(known)})"
        )
    return names


def router_layers(layer_ids: list[str], excluded_blocks=ROUTER_EXCLUDED_BLOCKS) -> list[str]:
    """The layers whose routers the router loss penalises (attn1 and attn2)."""
    return [i for i in layer_ids if diffusers_block(i) not in excluded_blocks]


def localization_layers(layer_ids: list[str], blocks=LOCALIZATION_BLOCKS) -> list[str]:
    """The cross-attention layers the localization loss reads."""
    return [i for i in layer_ids if i.endswith(".attn2") and diffusers_block(i) in blocks]


def _grid(tokens: int, size: tuple[int, int]) -> tuple[int, int]:
    from mixture_core.recording import token_grid

    grid = token_grid(tokens, *size)
    if grid is None:
        raise ValueError(f"{tokens} attention rows are no UNet level of a {size} latent")
    return grid


def router_loss(router: list[torch.Tensor], foreground: torch.Tensor) -> torch.Tensor:
    """|| (1 - M) * (1 - mean_l R0_l) ||^2, mean over pixels and the batch (paper Sec. 3.3.1):
    background pixels go to the prior. router: (B, T_l) prior weights of the penalised layers;
    foreground: (B, h, w) at the latent size; each layer's map is resized to it (bilinear)."""
    size = tuple(foreground.shape[-2:])
    maps = []
    for r0 in router:
        grid = _grid(r0.shape[1], size)
        maps.append(
            F.interpolate(r0.unflatten(1, grid)[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
        )
    prior = torch.stack(maps).mean(0)
    return (((1 - foreground) * (1 - prior)) ** 2).mean()


def localization_loss(attention: list[torch.Tensor], masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """FastComposer's balanced L1 (``BalancedL1Loss``, ``get_object_localization_loss``): for each
    bound subject, the mean of its token's cross-attention (head-averaged; the loss is linear in
    it) on the background minus that on its mask; summed over subjects / their count per sample,
    mean over the batch, mean over layers. attention: (B, T_l, n) per layer; masks (B, n, H, W) at
    the training resolution, resampled per layer as FastComposer does (bilinear, antialias);
    valid (B, n): padding subjects count for nothing."""
    losses = []
    valid = valid.float()
    for probs in attention:
        grid = _grid(probs.shape[1], tuple(masks.shape[-2:]))
        m = F.interpolate(masks.float(), size=grid, mode="bilinear", antialias=True, align_corners=False).flatten(
            2
        )  # (B, n, T)
        a = probs.movedim(1, 2).float()  # (B, n, T)
        background = (a * (1 - m)).sum(-1) / ((1 - m).sum(-1) + 1e-5)
        subject = (a * m).sum(-1) / (m.sum(-1) + 1e-5)
        per_sample = ((background - subject) * valid).sum(1) / (valid.sum(1) + 1e-5)
        losses.append(per_sample.mean())
    return torch.stack(losses).mean()


def masked_reconstruction(pred: torch.Tensor, target: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """FastComposer's masked loss (``mask_loss``): mse(pred * M, target * M) averaged over ALL
    latent elements, M the subjects' union resized bilinearly to the latent; MoA uses it always
    (paper Tab. 1, "Prob. of using masked recon. loss 1"). Chosen over a mean over foreground
    pixels because MoA's weights 1e-4 for the router and localization terms (Tab. 1) were set
    against this loss on FastComposer's code: a foreground mean would scale it by 1 / (foreground
    share), several times on FFHQ-wild, and with it the balance of the three terms."""
    m = F.interpolate(foreground[:, None].float(), size=pred.shape[-2:], mode="bilinear", align_corners=False)
    return F.mse_loss(pred.float() * m, target.float() * m)

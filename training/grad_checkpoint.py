"""Gradient checkpointing of ComfyUI's UNet: recompute activations in the backward pass instead
of keeping them."""

from __future__ import annotations

import torch


def enable_gradient_checkpointing(unet: torch.nn.Module) -> int:
    """Recompute each input/middle/output block of a ComfyUI UNet in the backward pass
    (torch.utils.checkpoint, non-reentrant). Returns the number of blocks wrapped."""
    import torch.utils.checkpoint as cp

    blocks = list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)
    for block in blocks:
        inner = block.forward

        def forward(*a, _inner=inner, **k):
            if torch.is_grad_enabled():
                return cp.checkpoint(_inner, *a, use_reentrant=False, **k)
            return _inner(*a, **k)

        block.forward = forward
    return len(blocks)

"""Gradient checkpointing of ComfyUI's UNet: keep only each layer's inputs in the forward pass
and recompute the layer in the backward pass.

ComfyUI's UNetModel runs its input, middle and output blocks through
``forward_timestep_embed(block, ...)``, which calls each layer of the block (``ResBlock(x, emb)``,
``SpatialTransformer(x, context, transformer_options)``, ...) and never the block's own
``forward``; wrapping the blocks' forward therefore checkpoints nothing. The layers' own calls
are what ComfyUI makes, so each ResBlock and SpatialTransformer is wrapped
(torch.utils.checkpoint, non-reentrant).

Recomputation runs in the backward pass, after the forward has moved on: ``transformer_options``
is shared and mutated by the UNet as it goes (``block``, ``block_index``, ``transformer_index``),
so each wrapped call hands its recomputation a copy taken at the forward. Per-call state a patch
needs (MoA's per-sample subject bindings) should travel in ``transformer_options`` for the same
reason: the patch reads it from ``extra_options`` and sees, in the recomputation, exactly what it
saw in the forward, whatever the patch object holds by then.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint


def checkpointed_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The ResBlocks and SpatialTransformers of a ComfyUI UNet's input, middle and output blocks:
    the calls forward_timestep_embed makes (the blocks' Downsample/Upsample convolutions are left
    alone, their activations are small)."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    blocks = list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)
    return [layer for block in blocks for layer in block if isinstance(layer, (ResBlock, SpatialTransformer))]


def _snapshot(value):
    return dict(value) if isinstance(value, dict) else value


def enable_gradient_checkpointing(unet: torch.nn.Module) -> int:
    """Checkpoint every layer checkpointed_layers finds (when gradients are being recorded).
    Returns the number of layers wrapped."""
    layers = checkpointed_layers(unet)
    for layer in layers:
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            args = tuple(_snapshot(a) for a in args)
            kwargs = {k: _snapshot(v) for k, v in kwargs.items()}
            # Looked up at call time, so that a test can count the calls.
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
    return len(layers)

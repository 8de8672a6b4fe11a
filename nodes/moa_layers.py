"""The attention layers MoA mixes on a ComfyUI model, and where ComfyUI's attention patches meet
them: a patch is told its layer by ``transformer_options["block"]`` and ``block_index``, the
MoA file keys its layers by SAI module path (mixture_core.unet_names maps one to the other)."""

from __future__ import annotations

import logging

import torch

from ..mixture_core.unet_names import is_moa_target, parse_attention

log = logging.getLogger(__name__)

_DIFFUSION = "diffusion_model"


def attention_modules(model_patcher) -> dict[str, torch.nn.Module]:
    """{layer id: attention module} of the attentions MoA can mix (attn1/attn2 of every
    transformer block), layer ids being the UNet module paths in SAI naming."""
    unet = model_patcher.get_model_object(_DIFFUSION)
    return {path: module for path, module in unet.named_modules() if is_moa_target(path) and hasattr(module, "to_q")}


def attention_shapes(model_patcher) -> dict[str, tuple[int, int]]:
    """{layer id: (dim, context_dim)} of the model's attentions, as check_against_model expects."""
    return {
        path: (int(m.to_q.weight.shape[1]), int(m.to_k.weight.shape[1]))
        for path, m in attention_modules(model_patcher).items()
    }


def block_locations(layer_ids) -> dict[tuple, str]:
    """{(block, block_index, "attn1"|"attn2"): layer id}, block being ComfyUI's
    transformer_options["block"] (("input", i), ("middle", 0), ("output", i)) and block_index
    the transformer block's index inside the block's spatial transformer.

    The spatial transformer's position inside its UNet block (the ``1`` of
    ``input_blocks.1.1.transformer_blocks.0``) does not appear in ComfyUI's block id; a block
    holding two spatial transformers would make the id ambiguous, so such layers (none in
    SD1.5) are left out, with a warning."""
    found: dict[tuple, list[str]] = {}
    for layer_id in layer_ids:
        parsed = parse_attention(layer_id)
        if parsed is not None:
            found.setdefault((parsed.block, parsed.index, parsed.attn), []).append(layer_id)
    ambiguous = sorted(x for ids in found.values() if len(ids) > 1 for x in ids)
    if ambiguous:
        log.warning(
            "MoA: %d attention layers share a ComfyUI block id and stay the prior: %s", len(ambiguous), ambiguous[:4]
        )
    return {key: ids[0] for key, ids in found.items() if len(ids) == 1}

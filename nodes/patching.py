"""How the pack patches a ComfyUI model: only public ModelPatcher extension points.

* a layer's forward is replaced through an object patch on ``<module>.forward``; the new
  forward calls whatever forward was there before (the module's own, or another pack's
  patch), so patches chain instead of clobbering each other, and LoRA weight patches and
  lowvram casting of the frozen module keep working;
* the pack's own weights live in a small nn.Module handed to ComfyUI as an additional model
  of the patcher, so ComfyUI loads, offloads and counts them with the UNet.
"""

from __future__ import annotations

import comfy.model_patcher
import torch

from .unet_layers import forward_key


def chain_forward(model, module_path: str, make_forward) -> None:
    """Replace the forward of a UNet module on this (cloned) patcher; make_forward receives the
    forward currently in place, patched or not, and returns the new one."""
    key = forward_key(module_path)
    model.add_object_patch(key, make_forward(model.get_model_object(key)))


def attach_weights(model, key: str, module) -> None:
    """Give ComfyUI's memory management an nn.Module of the pack's weights, beside the
    weights other nodes attached under the same key."""
    patcher = comfy.model_patcher.ModelPatcher(module, load_device=model.load_device, offload_device=model.offload_device)
    model.set_additional_models(key, model.get_additional_models_with_key(key) + [patcher])


def conditional_rows(chunks, batch: int, device=None) -> torch.Tensor | None:
    """(B,) bool: which rows of a model call's batch are conditional. ComfyUI batches cond
    and uncond chunks in one call and lists them in transformer_options["cond_or_uncond"]
    (0 = cond, 1 = uncond), each chunk batch / len(chunks) rows long. None where the batch
    does not split into those chunks."""
    if not chunks or batch % len(chunks):
        return None
    return torch.tensor([c == 0 for c in chunks], device=device).repeat_interleave(batch // len(chunks))

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


def weights_patcher(module, load_device=None, offload_device=None):
    """A ModelPatcher over an nn.Module of the pack's weights, on ComfyUI's default devices
    unless given: the handle ComfyUI's memory management loads, offloads and counts."""
    import comfy.model_management as mm

    return comfy.model_patcher.ModelPatcher(
        module,
        load_device=load_device or mm.get_torch_device(),
        offload_device=offload_device or mm.unet_offload_device(),
    )


def attach_patcher(model, key: str, patcher) -> None:
    """Hand `patcher` to ComfyUI as an additional model of `model` (loaded with it), beside
    the ones other nodes attached under the same key."""
    model.set_additional_models(key, model.get_additional_models_with_key(key) + [patcher])


def attach_weights(model, key: str, module) -> None:
    """Give ComfyUI's memory management an nn.Module of the pack's weights made for this model
    alone (MoLE's layers are built per application; a weight file shared by many models makes
    its patcher once, see weights_patcher)."""
    attach_patcher(model, key, weights_patcher(module, model.load_device, model.offload_device))


def conditional_rows(chunks, batch: int, device=None) -> torch.Tensor | None:
    """(B,) bool: which rows of a model call's batch are conditional. ComfyUI batches cond
    and uncond chunks in one call and lists them in transformer_options["cond_or_uncond"]
    (0 = cond, 1 = uncond), each chunk batch / len(chunks) rows long. None where the batch
    does not split into those chunks."""
    if not chunks or batch % len(chunks):
        return None
    return torch.tensor([c == 0 for c in chunks], device=device).repeat_interleave(batch // len(chunks))

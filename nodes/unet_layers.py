"""Naming and reaching UNet layers of a ComfyUI model, through ComfyUI's own LoRA key map."""

from __future__ import annotations

import comfy.lora

from ..mixture_core.unet_names import DIFFUSION_MODEL, kohya_name, strip_diffusers_prefix


def model_family(model_patcher) -> str:
    """The base family as ComfyUI detected it, lower-cased: "sd15", "sdxl", ..."""
    return type(model_patcher.model.model_config).__name__.lower()


def layer_resolver(model_patcher):
    """A function mapping a layer name as written in a LoRA or gate file to the UNet module
    path ("input_blocks.1.1.proj_in"), or None when the model has no such layer.

    Accepts kohya names (diffusers- or SAI-style "lora_unet_..."), peft/diffusers dotted names
    ("unet.down_blocks.0.attentions.0.proj_in") and module paths themselves.

    Why ComfyUI's key map (issue 9, item 6): LoraLoader maps a LoRA's layer names with
    comfy.lora.model_lora_keys_unet; looking names up in that same map first makes "a layer
    LoraLoader patches is the layer MoLE gates" hold by construction, for every naming the host
    knows now or learns later (kohya, SAI, lycoris_, old diffusers "processor" names). Only
    the grouping of a file into (down, up, alpha) pairs stays in mixture_core.lora_format: the
    training scripts need it without the host, MoLE needs the pairs' matrices to gate them one by
    one (comfy.lora.load_lora makes weight patches, LoHa/LoKr/DoRA included, that cannot be
    gated per token), and parsing the layout lets the matrices be read only when the layers are
    built. The one addition: peft names of attention projections ("unet....attn1.to_q"), which
    the host's map lists only in the old "processor" form (ComfyUI 0.8.0, see Comfy-Org/ComfyUI
    issue 9753), are tried as their kohya name in the same map, so they land on the same layer
    a kohya file of that layer does."""
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})

    def weight_key_to_module(weight_key):
        if isinstance(weight_key, str) and weight_key.startswith(DIFFUSION_MODEL) and weight_key.endswith(".weight"):
            return weight_key[len(DIFFUSION_MODEL) : -len(".weight")]
        return None

    def resolve(name: str) -> str | None:
        for candidate in (name, DIFFUSION_MODEL + name):
            if candidate in key_map:
                return weight_key_to_module(key_map[candidate])
        diffusers = strip_diffusers_prefix(name)
        return None if diffusers is None else weight_key_to_module(key_map.get(kohya_name(diffusers)))

    return resolve


def module_widths(model_patcher):
    """A function giving (d_in, d_out, is_conv) of the UNet module at a module path."""

    def widths(path: str):
        module = model_patcher.get_model_object(DIFFUSION_MODEL + path)
        weight = module.weight
        return weight.shape[1], weight.shape[0], weight.ndim == 4

    return widths


def forward_key(path: str) -> str:
    """The object-patch key that replaces the forward of the UNet module at `path`."""
    return f"{DIFFUSION_MODEL}{path}.forward"

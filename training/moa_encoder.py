"""MoA training's image encoder: CLIP ViT-L/14 (as Load CLIP Vision loads it) with its last K
layers trained (FastComposer's ``--image_encoder_trainable_layers 2``; MoA paper Sec. 3.4, "the
learned image encoder"), and the clip_vision file written beside the MoA file."""

from __future__ import annotations

import types
from pathlib import Path

import torch

from . import base_model


def out_of_place_clip_layer(self, x, mask=None, optimized_attention=None):
    """comfy.clip_model.CLIPLayer.forward without its in-place residual adds (x += ...), which
    autograd cannot differentiate through a trained layer."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def trainable_encoder_layers(clip_model, k: int) -> list[int]:
    n = len(clip_model.vision_model.encoder.layers)
    return list(range(n - k, n))


def prepare(clip_model, k: int) -> list[int]:
    """Freeze the encoder but its last k layers, which train in float32 (FastComposer:
    requires_grad_(True) and float32 on the last K layers); returns their indices."""
    base_model.freeze(clip_model)
    layers = trainable_encoder_layers(clip_model, k)
    for i in layers:
        layer = clip_model.vision_model.encoder.layers[i].float().requires_grad_(True)
        layer.forward = types.MethodType(out_of_place_clip_layer, layer)
    for module in clip_model.modules():  # ComfyUI's per-call weight casts stay out of autograd's way
        if getattr(module, "comfy_cast_weights", False) and any(
            p.requires_grad for p in module.parameters(recurse=False)
        ):
            module.comfy_cast_weights = False
    return layers


def encode_subjects(clip_vision, images: torch.Tensor, device, trained: bool) -> torch.Tensor:
    """(N, 224, 224, 3) subject images -> (N, 768) projected CLS in float32, one encoder call,
    through ComfyUI's own CLIP preprocessing (as MoA Subject Inject encodes)."""
    import comfy.clip_model

    cv = clip_vision
    pixels = comfy.clip_model.clip_preprocess(
        images.to(device), size=cv.image_size, mean=cv.image_mean, std=cv.image_std
    )
    with torch.set_grad_enabled(torch.is_grad_enabled() and trained):
        return cv.model(pixel_values=pixels, intermediate_output=-2)[2].float()


def write_image_encoder(path, clip_model, dtype) -> dict[str, torch.Tensor]:
    """The whole (partly trained) encoder as a clip_vision file in the transformers layout
    (vision_model.*, visual_projection.weight) that Load CLIP Vision reads."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in clip_model.state_dict().items()}
    save_file(state, str(path), {"moa.image_encoder": "clip-vit-l-14"})
    return state


def image_encoder_path(output) -> Path:
    output = Path(output)
    return output.with_name(output.stem + "_image_encoder.safetensors")

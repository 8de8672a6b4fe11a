"""MoA training's checks of the model files before any model loads: the checkpoint is SD1.5 and
--clip-vision is CLIP ViT-L/14, read from the file headers, so a wrong file stops the run in a
second, not after gigabytes have loaded."""

from __future__ import annotations

from pathlib import Path

from mixture_core import unet_names
from training.checks import first_cross_attention_to_k

SD15_ATTN2_KEY = first_cross_attention_to_k(unet_names.SD15)
VIT_L14_KEYS = {  # transformers CLIPVisionModelWithProjection layout, as Load CLIP Vision reads it
    "vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
    "vision_model.embeddings.position_embedding.weight": (257, 1024),
    "vision_model.encoder.layers.23.layer_norm1.weight": (1024,),
    "visual_projection.weight": (768, 1024),
}
VIT_L14_LAYERS = 24


def _header(path, flag: str):
    """{key: shape} of a .safetensors file, from its header only."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise SystemExit(f"error: {flag} {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise SystemExit(f"error: {flag} {path}: not a readable .safetensors file ({type(e).__name__}: {e})") from None


def check_files(args) -> None:
    """SystemExit naming the file when --checkpoint is not SD1.5 or --clip-vision not ViT-L/14."""
    if str(args.checkpoint).endswith(".safetensors"):
        shapes = _header(args.checkpoint, "--checkpoint")
        width = shapes.get(SD15_ATTN2_KEY, (0, 0))[1]
        if width != 768:
            family = (
                "SDXL"
                if any(k.startswith("conditioner.embedders.1.") for k in shapes)
                else "SD2.x (1024-wide text)"
                if width == 1024
                else "not an SD1.x UNet"
            )
            raise SystemExit(
                f"error: --checkpoint {args.checkpoint}: MoA trains on SD1.5 checkpoints (768-wide cross-attention); "
                f"this one is {family}"
            )
    shapes = _header(args.clip_vision, "--clip-vision")
    wrong = [f"{k} {shapes.get(k, 'missing')} (ViT-L/14: {v})" for k, v in VIT_L14_KEYS.items() if shapes.get(k) != v]
    if any(k.startswith(f"vision_model.encoder.layers.{VIT_L14_LAYERS}.") for k in shapes):
        wrong.append(f"more than {VIT_L14_LAYERS} layers")
    if wrong:
        hint = (
            " (OpenAI's original key names: convert it to the transformers layout, the file "
            "openai/clip-vit-large-patch14 ships)"
            if any(k.startswith("visual.") for k in shapes)
            else ""
        )
        raise SystemExit(
            f"error: --clip-vision {args.clip_vision}: MoA encodes subjects with CLIP ViT-L/14 "
            f"(transformers layout, 224 px, 768-wide projection); this file has {'; '.join(wrong)}{hint}"
        )

"""The base model a script trains on: a single-file checkpoint loaded by ComfyUI's own loader,
its UNet (ComfyUI/SAI module names), noise schedule, CLIP and VAE; the layers MoLE experts adapt
and their kohya names; freezing and storage dtypes."""

from __future__ import annotations

import dataclasses
import gc
import os

import torch

from .host import import_host, node_helpers


@dataclasses.dataclass
class Base:
    """A loaded checkpoint: model_patcher (comfy ModelPatcher), clip, vae (None once freed),
    unet (model_patcher.model.diffusion_model), family ("sd15", "sdxl"), alphas_cumprod (1000,)."""

    path: str
    model_patcher: object
    clip: object
    vae: object
    unet: torch.nn.Module
    family: str
    alphas_cumprod: torch.Tensor

    def free_encoders(self) -> None:
        """Drop the CLIP and VAE (after caching) and let ComfyUI forget them."""
        self.clip = self.vae = None
        import comfy.model_management as mm

        gc.collect()
        mm.cleanup_models_gc()
        mm.soft_empty_cache()


def load_base(path, load_encoders: bool = True) -> Base:
    import_host()
    import comfy.sd

    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} not found")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=load_encoders, output_clip=load_encoders, embedding_directory=None
    )
    family = node_helpers().model_family(model)
    sampling = model.model.model_sampling
    import comfy.model_base

    if model.model.model_type != comfy.model_base.ModelType.EPS or not hasattr(sampling, "sigmas"):
        raise SystemExit(
            f"error: {path}: only discrete epsilon-prediction models (SD1.x, SDXL) are supported, "
            f"this one is {model.model.model_type.name}"
        )
    sigmas = sampling.sigmas.detach().double().cpu()
    alphas_cumprod = (1.0 / (1.0 + sigmas**2)).float()  # sigma^2 = (1 - a) / a
    unet = model.model.diffusion_model
    # Training manages dtypes itself (cast_frozen + autocast): ComfyUI's per-call weight casts
    # (manual_cast ops, used when the weights' dtype is not the compute dtype) copy weights
    # outside autograd and would cut the gradients of trainable weights.
    for module in unet.modules():
        if getattr(module, "comfy_cast_weights", False):
            module.comfy_cast_weights = False
    return Base(str(path), model, clip, vae, unet, family, alphas_cumprod)


def expert_target_layers(unet: torch.nn.Module) -> dict[str, tuple[int, int, bool]]:
    """{module path: (d_in, d_out, is_conv)} of the layers MoLE experts adapt (192 on SD1.5)."""
    from mixture_core.unet_names import is_mole_target

    layers = {}
    for path, module in unet.named_modules():
        if is_mole_target(path) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            w = module.weight
            layers[path] = (w.shape[1], w.shape[0], w.ndim == 4)
    return layers


def kohya_names(base: Base, module_paths) -> dict[str, str]:
    """{module path: kohya LoRA layer name}: diffusers-style for SD1.x (lora_unet_down_blocks_0_
    attentions_0_proj_in, as kohya's SD1.5 LoRAs and the MoLE SD1.5 experts are named), SAI-style
    for SDXL (lora_unet_input_blocks_4_1_proj_in, as the released MoLE-SDXL files)."""
    from mixture_core import unet_names

    wanted = set(module_paths)
    if base.family != "sd15":
        return {p: unet_names.kohya_name(p) for p in wanted}
    layout = unet_names.Layout.from_unet_config(base.model_patcher.model.model_config.unet_config)
    diffusers = {p: unet_names.sai_to_diffusers(p, layout) for p in wanted}
    missing = sorted(p for p, name in diffusers.items() if name is None)
    if missing:
        raise RuntimeError(f"no diffusers name for {len(missing)} UNet layers: {missing[:5]}")
    return {p: unet_names.kohya_name(name) for p, name in diffusers.items()}


def freeze(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store frozen floating-point parameters in `dtype`, trainable ones in fp32."""
    for p in module.parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.float32 if p.requires_grad else dtype)

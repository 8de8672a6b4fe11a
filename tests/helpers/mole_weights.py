"""Random MoLE experts and gates in the real file layouts, made from a real ComfyUI model.

* kohya LoRA experts with diffusers-style names (SD1.5 releases: lora_unet_down_blocks_...) or
  SAI-style names (SDXL releases: lora_unet_input_blocks_...), or peft/diffusers dotted names;
* gates in the released MoLE format (moe_<kohya name>.softmoe.*) or the pack's own format.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from mixture_core.mole import GateWeights, is_expert_target
from mixture_core.mole_files import save_gate_file, save_released_gate_file


def target_layers(model_patcher) -> dict[str, tuple[int, int, bool]]:
    """{module path: (d_in, d_out, is_conv)} of the layers MoLE experts adapt in this model."""
    unet = model_patcher.model.diffusion_model
    layers = {}
    for path, module in unet.named_modules():
        if is_expert_target(path) and getattr(module, "weight", None) is not None:
            w = module.weight
            layers[path] = (w.shape[1], w.shape[0], w.ndim == 4)
    return layers


def kohya_names(model_patcher, style: str) -> dict[str, str]:
    """{module path: kohya layer name} in "sai" style (lora_unet_input_blocks_1_1_proj_in) or
    "diffusers" style (lora_unet_down_blocks_0_attentions_0_proj_in), via ComfyUI's converter."""
    layers = target_layers(model_patcher)
    if style == "sai":
        return {p: "lora_unet_" + p.replace(".", "_") for p in layers}
    import comfy.utils

    to_sai = comfy.utils.unet_to_diffusers(model_patcher.model.model_config.unet_config)
    names = {}
    for diffusers_key, sai_key in to_sai.items():
        if diffusers_key.endswith(".weight") and sai_key[: -len(".weight")] in layers:
            names[sai_key[: -len(".weight")]] = "lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_")
    return names


def peft_names(model_patcher) -> dict[str, str]:
    """{module path: peft/diffusers name} such as unet.down_blocks.0.attentions.0.proj_in."""
    import comfy.utils

    layers = target_layers(model_patcher)
    to_sai = comfy.utils.unet_to_diffusers(model_patcher.model.model_config.unet_config)
    return {
        sai[: -len(".weight")]: "unet." + d[: -len(".weight")]
        for d, sai in to_sai.items()
        if d.endswith(".weight") and sai[: -len(".weight")] in layers
    }


def write_lora(
    path, layers, names, rank=8, alpha=4.0, seed=0, dtype=torch.float16, naming="kohya", magnitude=1.0, only=None
):
    """A random LoRA over `layers` (module path -> widths) with file names from `names`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for p, (d_in, d_out, is_conv) in sorted(layers.items()):
        if only is not None and p not in only:
            continue
        down = torch.randn(rank, d_in, generator=g) / d_in**0.5
        up = torch.randn(d_out, rank, generator=g) * magnitude / rank**0.5
        if is_conv:
            down, up = down[..., None, None], up[..., None, None]
        if naming == "kohya":
            sd[f"{names[p]}.lora_down.weight"] = down.to(dtype)
            sd[f"{names[p]}.lora_up.weight"] = up.to(dtype)
            sd[f"{names[p]}.alpha"] = torch.tensor(alpha, dtype=dtype)
        else:
            sd[f"{names[p]}.lora_A.weight"] = down.to(dtype)
            sd[f"{names[p]}.lora_B.weight"] = up.to(dtype)
    save_file(sd, str(path))
    return Path(path)


def random_gates(layers, n_experts=2, variant="released", seed=1):
    g = torch.Generator().manual_seed(seed)
    gates = {}
    for p, (d_in, d_out, _) in sorted(layers.items()):
        width = d_out if variant == "released" else d_in
        gates[p] = GateWeights(
            torch.randn(n_experts, d_in, generator=g) / d_in**0.5,
            torch.randn(n_experts, generator=g),
            torch.randn(n_experts, width, generator=g) / width**0.5,
            torch.randn(n_experts, generator=g),
        )
    return gates


def write_pack_gates(path, layers, expert_names=("face", "hand"), variant="released", family="sd15", seed=1):
    save_gate_file(path, random_gates(layers, len(expert_names), variant, seed), list(expert_names), variant, family)
    return Path(path)


def write_released_gates(path, layers, names, seed=1, dtype=torch.float32):
    gates = random_gates(layers, 2, "released", seed)
    gates = {p: GateWeights(*(t.to(dtype) for t in vars(g).values())) for p, g in gates.items()}
    save_released_gate_file(path, gates, names)
    return Path(path)

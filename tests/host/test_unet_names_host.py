"""mixture_core.unet_names against ComfyUI's own map of UNet names (comfy.utils.unet_to_diffusers)
for the SD1.5 and SDXL layouts ComfyUI detects, and against the tensor names of a real SD1.5-layout
checkpoint (no model is loaded: the file's header is enough)."""

from __future__ import annotations

import pytest
from helpers import random_models

from mixture_core import unet_names as names


@pytest.fixture(scope="module")
def comfy_utils():
    random_models.import_host()
    import comfy.utils

    return comfy.utils


def _phantom(diffusers_key: str, layout: names.Layout) -> bool:
    """Names in ComfyUI's map that no such UNet has: a downsampler for the last down level and an
    upsampler for the last up level (the UNet builds them only `if level != len(channel_mult) - 1`
    and `if level and ...`, comfy/ldm/modules/diffusionmodules/openaimodel.py), and the label
    embedding of a model without one."""
    last = len(layout.channel_mult) - 1
    return diffusers_key.startswith((f"down_blocks.{last}.downsamplers.", f"up_blocks.{last}.upsamplers.")) or (
        not layout.label_embedding and diffusers_key.startswith(("class_embedding.", "add_embedding."))
    )


@pytest.mark.parametrize(
    "config, layout",
    [
        (random_models.SD15_UNET_CONFIG, names.SD15),
        (random_models.SDXL_UNET_CONFIG, names.SDXL),
        (random_models.SD15_SMALL_UNET_CONFIG, None),
        (random_models.SDXL_THIN_UNET_CONFIG, None),
    ],
    ids=["sd15", "sdxl", "sd15_small", "sdxl_thin"],
)
def test_every_name_of_comfyuis_map(comfy_utils, config, layout):
    detected = names.Layout.from_unet_config(config)
    if layout is not None:
        assert detected == layout
    comfy_map = comfy_utils.unet_to_diffusers(config)
    checked = 0
    for diffusers_key, sai_key in comfy_map.items():
        if _phantom(diffusers_key, detected):
            continue
        assert names.diffusers_to_sai(diffusers_key, detected) == sai_key, diffusers_key
        # ComfyUI maps class_embedding and add_embedding both to label_emb; SD-XL's is add_embedding.
        if not diffusers_key.startswith("class_embedding."):
            assert names.sai_to_diffusers(sai_key, detected) == diffusers_key, sai_key
        checked += 1
    assert checked > 250, checked
    # Every attention layer and spatial transformer the module lists is in ComfyUI's map.
    sai_keys = set(comfy_map.values())
    for layer in names.attention_layers(detected):
        assert comfy_map[f"{layer.diffusers}.to_q.weight"] == f"{layer.sai}.to_q.weight"
    for t in names.spatial_transformers(detected):
        assert f"{t.sai}.proj_in.weight" in sai_keys


def test_every_tensor_of_an_sd15_checkpoint(comfy_utils):
    """Every UNet tensor of a real SD1.5-layout checkpoint has a diffusers name and back, and the
    names ComfyUI's map lists but the module refuses are absent from the file."""
    from safetensors import safe_open

    with safe_open(str(random_models.sd15_thin_checkpoint()), framework="pt") as f:
        keys = [k[len(names.CHECKPOINT_PREFIX) :] for k in f.keys() if k.startswith(names.CHECKPOINT_PREFIX)]
    assert len(keys) > 600
    for key in keys:
        diffusers = names.sai_to_diffusers(key)
        assert diffusers is not None and names.diffusers_to_sai(diffusers) == key, key
    phantoms = {
        sai
        for d, sai in comfy_utils.unet_to_diffusers(random_models.SD15_UNET_CONFIG).items()
        if _phantom(d, names.SD15)
    }
    assert phantoms and not phantoms & set(keys)

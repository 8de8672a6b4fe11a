"""mixture_core.unet_names without the host: known names of SD1.5 and SDXL in both namings, the
ComfyUI block ids, the target predicates. The whole map is checked against ComfyUI's own
unet_to_diffusers in tests/host/test_unet_names_host.py."""

from __future__ import annotations

import pytest

from mixture_core import unet_names as names
from mixture_core.unet_names import SD15, SDXL


@pytest.mark.parametrize(
    "sai, diffusers",
    [
        ("input_blocks.0.0.weight", "conv_in.weight"),
        ("input_blocks.1.0.in_layers.2.weight", "down_blocks.0.resnets.0.conv1.weight"),
        ("input_blocks.4.0.skip_connection.bias", "down_blocks.1.resnets.0.conv_shortcut.bias"),
        ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
        ("input_blocks.1.1.proj_in", "down_blocks.0.attentions.0.proj_in"),
        (
            "input_blocks.8.1.transformer_blocks.0.attn2.to_k",
            "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k",
        ),
        ("middle_block.1.transformer_blocks.0.attn1", "mid_block.attentions.0.transformer_blocks.0.attn1"),
        ("middle_block.2.out_layers.3.weight", "mid_block.resnets.1.conv2.weight"),
        ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
        ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
        ("output_blocks.11.1.transformer_blocks.0.ff.net.2", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"),
        ("time_embed.2.weight", "time_embedding.linear_2.weight"),
        ("out.2.bias", "conv_out.bias"),
    ],
)
def test_sd15_names_both_ways(sai, diffusers):
    assert names.sai_to_diffusers(sai) == diffusers
    assert names.diffusers_to_sai(diffusers) == sai


def test_sdxl_names_both_ways():
    pairs = {
        "input_blocks.4.1.transformer_blocks.1.attn2": "down_blocks.1.attentions.0.transformer_blocks.1.attn2",
        "input_blocks.7.1.transformer_blocks.9.ff.net.0.proj": "down_blocks.2.attentions.0.transformer_blocks.9.ff.net.0.proj",
        "output_blocks.0.1.transformer_blocks.9.attn1": "up_blocks.0.attentions.0.transformer_blocks.9.attn1",
        "output_blocks.2.2.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",  # SDXL's first up level has attention
        "output_blocks.5.2.conv.bias": "up_blocks.1.upsamplers.0.conv.bias",
        "label_emb.0.0.weight": "add_embedding.linear_1.weight",
    }
    for sai, diffusers in pairs.items():
        assert names.sai_to_diffusers(sai, SDXL) == diffusers
        assert names.diffusers_to_sai(diffusers, SDXL) == sai
    assert names.diffusers_to_sai("class_embedding.linear_2.bias", SDXL) == "label_emb.0.2.bias"


def test_names_a_layout_does_not_have_are_none():
    assert names.sai_to_diffusers("input_blocks.1.1.proj_in", SDXL) is None  # SDXL's first level has no attention
    assert names.sai_to_diffusers("input_blocks.3.1.proj_in") is None  # a downsampler block
    assert names.sai_to_diffusers("output_blocks.11.2.conv.weight") is None  # the last up level has no upsampler
    assert names.sai_to_diffusers("label_emb.0.0.weight") is None  # SD1.5 has no label embedding
    assert names.sai_to_diffusers("input_blocks.1.0.in_layers.1.weight") is None  # SiLU: no parameters, no name
    assert names.diffusers_to_sai("down_blocks.4.resnets.0.conv1.weight") is None
    assert names.diffusers_to_sai("text_model.encoder.layers.0") is None


def test_attention_layers_of_sd15_and_sdxl():
    sd15 = names.attention_layers(SD15)
    assert len(sd15) == 32 and len(names.attention_layers(SDXL)) == 140
    first, last = sd15[0], sd15[-1]
    assert first.sai == "input_blocks.1.1.transformer_blocks.0.attn1" and first.block == ("input", 1)
    assert (first.dim, first.context_dim, first.diffusers_block) == (320, 320, "down_blocks.0")
    assert last.sai == "output_blocks.11.1.transformer_blocks.0.attn2" and last.context_dim == 768
    mid = [a for a in sd15 if a.block == ("middle", 0)]
    assert [a.attn for a in mid] == ["attn1", "attn2"] and mid[0].dim == 1280 and mid[0].diffusers_block == "mid_block"
    for a in sd15:
        assert names.sai_to_diffusers(a.sai) == a.diffusers and names.diffusers_to_sai(a.diffusers) == a.sai
    # SD1.5's widths per spatial transformer, as FastComposer's UNet has them (diffusers block, SAI, width).
    expected = (
        [
            (f"down_blocks.{b}.attentions.{i}", f"input_blocks.{3 * b + i + 1}.1", 320 * 2**b)
            for b in range(3)
            for i in range(2)
        ]
        + [("mid_block.attentions.0", "middle_block.1", 1280)]
        + [
            (f"up_blocks.{b}.attentions.{i}", f"output_blocks.{3 * b + i}.1", 320 * 2 ** (3 - b))
            for b in range(1, 4)
            for i in range(3)
        ]
    )
    assert [(t.diffusers, t.sai, t.width) for t in names.spatial_transformers(SD15)] == expected


def test_comfyui_block_ids_from_layer_ids():
    a = names.parse_attention("output_blocks.3.1.transformer_blocks.2.attn2")
    assert (a.block, a.sub, a.index, a.attn) == (("output", 3), 1, 2, "attn2")
    assert names.parse_attention("middle_block.1.transformer_blocks.0.attn1").block == ("middle", 0)
    for layer in names.attention_layers(SDXL):
        parsed = names.parse_attention(layer.sai)
        assert (parsed.block, parsed.index, parsed.attn) == (layer.block, layer.index, layer.attn)
    for not_attention in ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.proj_in", "x.attn1"):
        assert names.parse_attention(not_attention) is None


def test_diffusers_block():
    assert names.diffusers_block("input_blocks.4.1.transformer_blocks.0.attn2") == "down_blocks.1"
    assert names.diffusers_block("middle_block.1.transformer_blocks.0.attn1") == "mid_block"
    assert names.diffusers_block("output_blocks.11.1.transformer_blocks.0.attn2") == "up_blocks.3"
    assert names.diffusers_block("output_blocks.2.0.in_layers.2.weight") == "up_blocks.0"
    assert names.diffusers_block("input_blocks.7.1.transformer_blocks.0.attn1", SDXL) == "down_blocks.2"
    with pytest.raises(ValueError, match="not a module of the UNet"):
        names.diffusers_block("input_blocks.0.0")  # conv_in is in no block
    with pytest.raises(ValueError, match="time_embed"):
        names.diffusers_block("time_embed.0")


def test_target_predicates():
    moa = [a.sai for a in names.attention_layers(SD15)]
    assert all(names.is_moa_target(x) for x in moa)
    assert all(names.is_moa_target(a.diffusers) for a in names.attention_layers(SD15))
    assert not names.is_moa_target(moa[0] + ".to_q") and not names.is_moa_target("input_blocks.1.1.proj_in")
    suffixes = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v"]
    suffixes += ["attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]
    mole = [f"{t.sai}.{s}" for t in names.spatial_transformers(SD15) for s in ("proj_in", "proj_out")] + [
        f"{a.sai.rsplit('.', 1)[0]}.{s}" for a in names.attention_layers(SD15)[::2] for s in suffixes
    ]
    assert len(set(mole)) == 192 and all(names.is_mole_target(x) for x in mole)
    for not_target in (
        "input_blocks.1.1.norm",
        "input_blocks.1.1.transformer_blocks.0.attn1",
        "input_blocks.1.1.transformer_blocks.0.ff.net.0",
        "input_blocks.1.0.in_layers.2",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_out.1",
    ):
        assert not names.is_mole_target(not_target), not_target


def test_prefixes_and_kohya_names():
    assert (
        names.strip_diffusers_prefix("unet.base_model.model.down_blocks.0.attentions.0.proj_in")
        == "down_blocks.0.attentions.0.proj_in"
    )
    assert names.strip_diffusers_prefix("unet.mid_block.attentions.0.proj_out") == "mid_block.attentions.0.proj_out"
    assert names.strip_diffusers_prefix("input_blocks.1.1.proj_in") is None
    assert names.kohya_name("input_blocks.4.1.proj_in") == "lora_unet_input_blocks_4_1_proj_in"


def test_layout_from_unet_config():
    config = {
        "model_channels": 320,
        "channel_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1] * 9 + [0] * 3,
        "transformer_depth_middle": 1,
        "context_dim": 768,
        "adm_in_channels": None,
    }
    assert names.Layout.from_unet_config(config) == SD15
    small = names.Layout.from_unet_config(
        {
            **config,
            "num_res_blocks": [1, 1],
            "channel_mult": [1, 1],
            "transformer_depth": [1, 1],
            "transformer_depth_output": [1, 1, 1, 1],
        }
    )
    assert [t.sai for t in names.spatial_transformers(small)] == [
        "input_blocks.1.1",
        "input_blocks.3.1",
        "middle_block.1",
        "output_blocks.0.1",
        "output_blocks.1.1",
        "output_blocks.2.1",
        "output_blocks.3.1",
    ]
    assert names.sai_to_diffusers("output_blocks.1.2.conv.weight", small) == "up_blocks.0.upsamplers.0.conv.weight"

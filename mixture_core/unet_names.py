"""The names of the SD1.x / SDXL UNet's layers, in every naming the pack meets, in one place.

* SAI (the original LDM code, ComfyUI's modules and checkpoints): ``input_blocks.1.1.transformer_blocks.0.attn1``.
  The pack's layer ids are these module paths.
* diffusers (UNet2DConditionModel, peft, FastComposer, MoA's and MoLE's training code):
  ``down_blocks.0.attentions.0.transformer_blocks.0.attn1``.
* ComfyUI's block ids, ``transformer_options["block"]`` in attention patches: ``("input", 1)``,
  ``("middle", 0)``, ``("output", 3)``: the SAI block without the position inside it.

The SAI <-> diffusers map follows the UNet's layout (how many resnets per level, which hold
spatial transformers), given as ComfyUI's ``unet_config`` (``Layout.from_unet_config``) or as the
constants SD15 and SDXL; it is the inverse of ComfyUI's ``comfy.utils.unet_to_diffusers`` (a host
test checks them against each other). Framework-free: plain strings, no torch.

The target predicates (which modules MoA mixes, which MoLE experts adapt) match the end of a
module path, the part inside a spatial transformer, which both namings write the same way.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

# ComfyUI's model-object key of the UNet ("diffusion_model.input_blocks...") and the prefix of the
# UNet's tensors in a single-file checkpoint.
DIFFUSION_MODEL = "diffusion_model."
CHECKPOINT_PREFIX = "model." + DIFFUSION_MODEL
# What peft / diffusers write before the diffusers module path of a UNet layer.
DIFFUSERS_PREFIXES = ("unet.base_model.model.", "base_model.model.", "unet.")

# The attention modules MoA mixes (MoA paper Sec. 3.2: every attention layer): attn1 and attn2 of
# every transformer block.
MOA_TARGET = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn[12]$")
# The layers the released MoLE experts adapt (kohya's default LoRA targets inside each spatial
# transformer): proj_in/proj_out and, per transformer block, the q/k/v/out projections of both
# attentions and the two feed-forward projections. 192 on SD1.5.
MOLE_TARGET = re.compile(
    r"(^|\.)(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))$"
)

_SAI_ATTENTION = re.compile(
    r"^(?:(?P<kind>input|output)_blocks\.(?P<block>\d+)|middle_block)\.(?P<sub>\d+)"
    r"\.transformer_blocks\.(?P<index>\d+)\.(?P<attn>attn[12])$"
)
# ResBlock's sub-modules: SAI name -> diffusers name (comfy.utils.UNET_MAP_RESNET, per module).
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}


def is_moa_target(module_path: str) -> bool:
    """True for the module path of an attention module MoA mixes (either naming)."""
    return MOA_TARGET.search(module_path) is not None


def is_mole_target(module_path: str) -> bool:
    """True for the module path of a layer MoLE experts adapt (either naming)."""
    return MOLE_TARGET.search(module_path) is not None


def kohya_name(module_path: str) -> str:
    """kohya's LoRA layer name of a module path: ``lora_unet_`` and the path with ``_`` for ``.``."""
    return "lora_unet_" + module_path.replace(".", "_")


def strip_diffusers_prefix(name: str) -> str | None:
    """``unet.down_blocks.0.attentions.0.proj_in`` -> ``down_blocks.0.attentions.0.proj_in``; None
    when the name has none of peft's / diffusers' prefixes."""
    for prefix in DIFFUSERS_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None


# ----------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """The shape of an SD-style UNet that decides its names (the keys of ComfyUI's unet_config)."""

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]  # resnets per level, down path (the up path has one more)
    transformer_depth: tuple[int, ...]  # transformer blocks of each down resnet, in order
    transformer_depth_output: tuple[int, ...]  # of each up block, in ComfyUI's order (read from the end)
    transformer_depth_middle: int  # -1: no spatial transformer in the middle block
    context_dim: int
    label_embedding: bool = False  # SDXL's size/crop embedding ("add_embedding" in diffusers)

    @classmethod
    def from_unet_config(cls, config: Mapping) -> Layout:
        """From ComfyUI's unet_config (model_patcher.model.model_config.unet_config)."""
        levels = len(config["channel_mult"])
        res = config["num_res_blocks"]
        res = (res,) * levels if isinstance(res, int) else tuple(res)
        return cls(
            model_channels=int(config["model_channels"]),
            channel_mult=tuple(config["channel_mult"]),
            num_res_blocks=res,
            transformer_depth=tuple(config["transformer_depth"]),
            transformer_depth_output=tuple(config["transformer_depth_output"]),
            transformer_depth_middle=int(config.get("transformer_depth_middle", -1)),
            context_dim=int(config.get("context_dim") or 0),
            label_embedding=config.get("adm_in_channels") is not None or config.get("num_classes") is not None,
        )


SD15 = Layout(320, (1, 2, 4, 4), (2, 2, 2, 2), (1, 1, 1, 1, 1, 1, 0, 0), (1,) * 9 + (0,) * 3, 1, 768)
SDXL = Layout(320, (1, 2, 4), (2, 2, 2), (0, 0, 2, 2, 10, 10), (0, 0, 0, 2, 2, 2, 10, 10, 10), 10, 2048, True)


@dataclass(frozen=True)
class SpatialTransformer:
    """One spatial transformer of the UNet, in both namings."""

    sai: str  # "input_blocks.1.1"
    diffusers: str  # "down_blocks.0.attentions.0"
    block: tuple[str, int]  # ComfyUI's block id: ("input", 1)
    width: int  # channels (attn1's and the feed-forward's width)
    depth: int  # transformer blocks inside

    @property
    def diffusers_block(self) -> str:
        """ "down_blocks.0", "mid_block" or "up_blocks.1": the block as diffusers' code names it."""
        return self.diffusers.split(".attentions.")[0]


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module (attn1: self, attn2: cross) of a transformer block."""

    sai: str  # "input_blocks.1.1.transformer_blocks.0.attn1": the pack's layer id
    diffusers: str  # "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    block: tuple[str, int]  # ComfyUI's block id
    index: int  # the transformer block's index inside its spatial transformer
    attn: str  # "attn1" or "attn2"
    dim: int  # query width
    context_dim: int  # key/value width: dim for attn1, the text width for attn2
    diffusers_block: str  # "down_blocks.0", "mid_block", "up_blocks.1"


@functools.cache
def _units(layout: Layout) -> tuple[dict[str, tuple[str, str]], tuple[SpatialTransformer, ...]]:
    """({SAI module prefix: (diffusers prefix, kind)}, spatial transformers in UNet order), kind
    being "resnet" (sub-modules renamed) or "same" (the rest of the path is the same in both)."""
    units: dict[str, tuple[str, str]] = {
        "time_embed.0": ("time_embedding.linear_1", "same"),
        "time_embed.2": ("time_embedding.linear_2", "same"),
        "input_blocks.0.0": ("conv_in", "same"),
        "out.0": ("conv_norm_out", "same"),
        "out.2": ("conv_out", "same"),
    }
    if layout.label_embedding:
        units |= {
            "label_emb.0.0": ("add_embedding.linear_1", "same"),
            "label_emb.0.2": ("add_embedding.linear_2", "same"),
        }
    transformers = []

    def transformer(sai, diffusers, block, width, depth):
        units[sai] = (diffusers, "same")
        transformers.append(SpatialTransformer(sai, diffusers, block, width, depth))

    depths = list(layout.transformer_depth)
    n = 1
    for level, (res, mult) in enumerate(zip(layout.num_res_blocks, layout.channel_mult)):
        for i in range(res):
            units[f"input_blocks.{n}.0"] = (f"down_blocks.{level}.resnets.{i}", "resnet")
            depth = depths.pop(0)
            if depth:
                transformer(
                    f"input_blocks.{n}.1",
                    f"down_blocks.{level}.attentions.{i}",
                    ("input", n),
                    layout.model_channels * mult,
                    depth,
                )
            n += 1
        if level < len(layout.channel_mult) - 1:
            units[f"input_blocks.{n}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", "same")
            n += 1
    mid_width = layout.model_channels * layout.channel_mult[-1]
    units["middle_block.0"] = ("mid_block.resnets.0", "resnet")
    if layout.transformer_depth_middle >= 0:  # -1: a middle block of one resnet (openaimodel.py)
        transformer(
            "middle_block.1", "mid_block.attentions.0", ("middle", 0), mid_width, layout.transformer_depth_middle
        )
        units["middle_block.2"] = ("mid_block.resnets.1", "resnet")
    depths = list(layout.transformer_depth_output)
    n = 0
    levels = len(layout.channel_mult)
    for up, (res, mult) in enumerate(zip(reversed(layout.num_res_blocks), reversed(layout.channel_mult))):
        for i in range(res + 1):
            units[f"output_blocks.{n}.0"] = (f"up_blocks.{up}.resnets.{i}", "resnet")
            depth = depths.pop()
            if depth:
                transformer(
                    f"output_blocks.{n}.1",
                    f"up_blocks.{up}.attentions.{i}",
                    ("output", n),
                    layout.model_channels * mult,
                    depth,
                )
            if i == res and up < levels - 1:
                units[f"output_blocks.{n}.{2 if depth else 1}.conv"] = (f"up_blocks.{up}.upsamplers.0.conv", "same")
            n += 1
    return units, tuple(transformers)


@functools.cache
def _back(layout: Layout) -> dict[str, tuple[str, str]]:
    return {d: (s, kind) for s, (d, kind) in _units(layout)[0].items()}


def _convert(name: str, table: dict[str, tuple[str, str]], rename: dict[str, str]) -> str | None:
    parts = name.split(".")
    for cut in range(min(len(parts), 6), 0, -1):  # the longest prefix that is a unit (at most 5 parts)
        unit = table.get(".".join(parts[:cut]))
        if unit is None:
            continue
        target, kind = unit
        rest = parts[cut:]
        if kind == "resnet" and rest:
            for size in (2, 1):
                sub = rename.get(".".join(rest[:size]))
                if sub is not None:
                    return ".".join([target, sub, *rest[size:]])
            return None
        return ".".join([target, *rest])
    return None


def sai_to_diffusers(name: str, layout: Layout = SD15) -> str | None:
    """A SAI module path or tensor name in diffusers naming (``input_blocks.1.0.in_layers.2.weight``
    -> ``down_blocks.0.resnets.0.conv1.weight``); None when it names nothing of this layout."""
    return _convert(name, _units(layout)[0], _RESNET)


def diffusers_to_sai(name: str, layout: Layout = SD15) -> str | None:
    """The inverse of ``sai_to_diffusers`` (``class_embedding`` is read as SDXL's ``add_embedding``)."""
    if name.startswith("class_embedding.") and layout.label_embedding:
        name = "add_embedding." + name[len("class_embedding.") :]
    return _convert(name, _back(layout), _RESNET_BACK)


def spatial_transformers(layout: Layout = SD15) -> tuple[SpatialTransformer, ...]:
    """Every spatial transformer, down path first, then the middle, then the up path."""
    return _units(layout)[1]


def attention_layers(layout: Layout = SD15) -> tuple[AttentionLayer, ...]:
    """Every attention module (attn1 and attn2 of every transformer block), in UNet order."""
    return tuple(
        AttentionLayer(
            f"{t.sai}.transformer_blocks.{i}.{attn}",
            f"{t.diffusers}.transformer_blocks.{i}.{attn}",
            t.block,
            i,
            attn,
            t.width,
            t.width if attn == "attn1" else layout.context_dim,
            t.diffusers_block,
        )
        for t in spatial_transformers(layout)
        for i in range(t.depth)
        for attn in ("attn1", "attn2")
    )


@dataclass(frozen=True)
class AttentionId:
    """What a SAI attention layer id says: ComfyUI's block id, the spatial transformer's position
    inside that block (``sub``), the transformer block's index, attn1 or attn2."""

    block: tuple[str, int]
    sub: int
    index: int
    attn: str


def parse_attention(layer_id: str) -> AttentionId | None:
    """``output_blocks.3.1.transformer_blocks.2.attn2`` -> AttentionId(("output", 3), 1, 2, "attn2");
    None for anything else. Needs no layout: ComfyUI's block id is in the name."""
    m = _SAI_ATTENTION.match(layer_id)
    if m is None:
        return None
    block = (m["kind"], int(m["block"])) if m["kind"] else ("middle", 0)
    return AttentionId(block, int(m["sub"]), int(m["index"]), m["attn"])


def diffusers_block(layer_id: str, layout: Layout = SD15) -> str:
    """The diffusers UNet block of a SAI module path: ``input_blocks.4.1.transformer_blocks.0.attn2``
    -> ``down_blocks.1``; ``middle_block...`` -> ``mid_block``. ValueError for a path outside the
    down/mid/up blocks."""
    name = sai_to_diffusers(layer_id, layout)
    if name is None or not name.startswith(("down_blocks.", "mid_block.", "up_blocks.")):
        raise ValueError(
            f"{layer_id!r} is not a module of the UNet's input_blocks/middle_block/output_blocks (SAI naming)"
        )
    return "mid_block" if name.startswith("mid_block.") else ".".join(name.split(".")[:2])

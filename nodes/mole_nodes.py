"""Load MoLE Experts and Apply MoLE Gating."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..mixture_core.errors import WeightFileError
from ..mixture_core.lora_format import parse_lora_state_dict
from ..mixture_core.mole import MODES, MoLEForward, wrap_forward
from ..mixture_core.mole_files import Expert, build_mole_layers, read_gate_file
from ..mixture_core.safetensors_io import SafetensorsFile
from .model_folders import file_fingerprint, full_path, load_from_folder, safetensors_in
from .patching import attach_weights, chain_forward
from .unet_layers import layer_resolver, model_family, module_widths

log = logging.getLogger(__name__)

MoLEExperts = io.Custom("MOLE_EXPERTS")
NONE = "None"


@dataclass(frozen=True)
class ExpertFile:
    """An expert as chosen in Load MoLE Experts. Only its layout is read there; Apply MoLE
    Gating reads the weights straight into the MoLE layers, so they are held once in memory
    rather than again in the node cache."""

    name: str
    path: str
    strength: float


@dataclass(frozen=True)
class LoadedExperts:
    """The value on a MOLE_EXPERTS wire: experts in the order they were loaded."""

    experts: tuple[ExpertFile, ...]


def unet_lora_layers(tensors, path: str) -> dict:
    layers = parse_lora_state_dict(tensors, path)
    # MoLE experts act on the UNet only; text-encoder layers of the file are left out here.
    unet_layers = {k: v for k, v in layers.items() if not k.startswith(("lora_te", "text_encoder", "te_"))}
    if not unet_layers:
        raise WeightFileError(path, "holds only text-encoder LoRA layers; a MoLE expert needs UNet layers")
    return unet_layers


def expert_layout(expert: ExpertFile) -> Expert:
    """The expert with its layers' shapes, not their data (meta tensors)."""
    return Expert(
        expert.name, expert.path, expert.strength, unet_lora_layers(SafetensorsFile(expert.path).layout(), expert.path)
    )


def check_expert(filename: str, name: str, strength: float) -> ExpertFile:
    """Everything about an expert file that can be told without its weights (format, layer
    names and shapes, alphas); the weights themselves are checked when Apply reads them."""
    if not name.strip():
        raise ValueError(f"{filename}: give the expert a name (such as 'face' or 'hand') to match its gate")
    expert = ExpertFile(name=name.strip(), path=full_path("loras", filename), strength=float(strength))
    expert_layout(expert)
    return expert


def pair_reader(experts: list[ExpertFile]):
    """read_pair for build_mole_layers: reads a pair's matrices from its expert's file."""
    files = {e.path: SafetensorsFile(e.path) for e in experts}
    return lambda expert, pair: pair.read(files[expert.path].read(pair.keys).__getitem__)


def find_mole_layers(model) -> dict[str, MoLEForward]:
    """{object patch key: the MoLE forward patched there} of a model (Apply MoLE Gating's
    patches), in the order they were applied."""
    return {key: f for key, f in model.object_patches.items() if isinstance(f, MoLEForward)}


def with_progress(read_pair, total: int):
    """read_pair that moves ComfyUI's progress bar (one tick per expert layer read) and stops at
    Cancel; the model is patched only after every layer is built, so a cancel applies nothing."""
    import comfy.model_management
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def read(expert, pair):
        comfy.model_management.throw_exception_if_processing_interrupted()
        out = read_pair(expert, pair)
        bar.update(1)
        return out

    return read


def apply_mole(model, experts: LoadedExperts, gate_filename: str, mode: str = "both", strength: float = 1.0):
    """A clone of `model` with MoLE on every layer the experts and gates cover. `model` itself is
    never changed; every check runs before the clone is patched, so a failure applies nothing."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if strength == 0.0:
        return model.clone()
    gate_path, tensors, metadata = load_from_folder("mole", gate_filename, check_layout=read_gate_file)
    gate = read_gate_file(tensors, metadata, gate_path)
    family = model_family(model)
    if gate.base_family is not None and gate.base_family != family:
        raise WeightFileError(gate_path, f"its gates are for a {gate.base_family} model, but this model is {family}")
    dtype = model.model.manual_cast_dtype or model.model_dtype()
    layouts = [expert_layout(e) for e in experts.experts]
    layers = build_mole_layers(
        layouts,
        gate,
        layer_resolver(model),
        mode=mode,
        strength=strength,
        dtype=dtype,
        module_widths=module_widths(model),
        read_pair=with_progress(pair_reader(experts.experts), sum(len(e.layers) for e in layouts)),
    )
    patched = model.clone()
    for module_path, layer in layers.items():
        chain_forward(patched, module_path, lambda previous, layer=layer: wrap_forward(layer, previous))
    attach_weights(patched, "mole", torch.nn.ModuleList(layers.values()))
    log.info("MoLE: %d layers gated (%s, %s gates, mode %s)", len(layers), family, gate.variant, mode)
    return patched


class LoadMoLEExperts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        loras = safetensors_in("loras")
        return io.Schema(
            node_id="MoLE_LoadExperts",
            display_name="Load MoLE Experts",
            category="MoLE",
            description="Loads the low-rank experts (LoRA files from models/loras) that MoLE gates: "
            "by default a face expert and a hand expert. Chain another Load MoLE Experts into "
            "'previous' for more experts.",
            inputs=[
                io.Combo.Input("expert_1", options=loras, tooltip="LoRA file of the first expert"),
                io.String.Input("name_1", default="face", tooltip="Expert name, as the gate file names its experts"),
                io.Float.Input(
                    "strength_1",
                    default=1.0,
                    min=-4.0,
                    max=4.0,
                    step=0.05,
                    tooltip="Weight w_1 of the first expert's refinement",
                ),
                io.Combo.Input("expert_2", options=[NONE] + loras, tooltip="LoRA file of the second expert"),
                io.String.Input("name_2", default="hand", tooltip="Expert name, as the gate file names its experts"),
                io.Float.Input(
                    "strength_2",
                    default=1.0,
                    min=-4.0,
                    max=4.0,
                    step=0.05,
                    tooltip="Weight w_2 of the second expert's refinement",
                ),
                MoLEExperts.Input("previous", optional=True, tooltip="Experts loaded by another node, placed first"),
            ],
            outputs=[MoLEExperts.Output(display_name="experts")],
        )

    @classmethod
    def fingerprint_inputs(cls, expert_1=None, expert_2=None, **_) -> tuple:
        return file_fingerprint("loras", expert_1, expert_2)

    @classmethod
    def execute(cls, expert_1, name_1, strength_1, expert_2, name_2, strength_2, previous=None) -> io.NodeOutput:
        loaded = [check_expert(expert_1, name_1, strength_1)]
        if expert_2 != NONE:
            loaded.append(check_expert(expert_2, name_2, strength_2))
        earlier = previous.experts if previous is not None else ()
        return io.NodeOutput(LoadedExperts(tuple(earlier) + tuple(loaded)))


class ApplyMoLEGating(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoLE_ApplyGating",
            display_name="Apply MoLE Gating",
            category="MoLE",
            description="Applies the experts to every layer they cover through MoLE's soft gates "
            "(gate file from models/mole): F(X) + sum_i g_i * s_i * E_i(X).",
            inputs=[
                io.Model.Input("model", tooltip="The model to refine (not changed: a patched clone is returned)"),
                MoLEExperts.Input("experts", tooltip="From Load MoLE Experts"),
                io.Combo.Input(
                    "gates",
                    options=safetensors_in("mole"),
                    tooltip="MoLE gate file (released MoLE format or this pack's)",
                ),
                io.Combo.Input(
                    "mode",
                    options=list(MODES),
                    default="both",
                    tooltip="both: local (per token) x global (per image) gates; local / global: one of them (the paper's ablation)",
                ),
                io.Float.Input(
                    "strength", default=1.0, min=-4.0, max=4.0, step=0.05, tooltip="0 leaves the model unchanged"
                ),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def fingerprint_inputs(cls, gates=None, **_) -> tuple:
        # A changed expert file changes Load MoLE Experts' fingerprint, and with it this node's cache key.
        return file_fingerprint("mole", gates)

    @classmethod
    def execute(cls, model, experts, gates, mode, strength) -> io.NodeOutput:
        return io.NodeOutput(apply_mole(model, experts, gates, mode, strength))


NODES = [LoadMoLEExperts, ApplyMoLEGating]

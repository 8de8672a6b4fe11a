"""MoLE gate files and the assembly of experts + gates into MoLE layers.

Two gate formats are read:

* the released MoLE format (kohya sd-scripts based): per layer
  ``moe_<kohya layer name>.softmoe.Phi_1.{weight,bias}`` (local gate, rows face, hand) and
  ``moe_<kohya layer name>.softmoe.{face,hand}_scale.{weight,bias}`` (global heads);
  its experts are "face" then "hand", its global gate variant is "released";
* the pack's own format (``FORMAT`` below, written by ``save_gate_file``): tensors
  ``<layer>.local.{weight,bias}`` and ``<layer>.global.{weight,bias}`` where <layer> is the
  UNet module path (``input_blocks.1.1.proj_in``), and metadata ``mole.format``,
  ``mole.format_version``, ``mole.base_family``, ``mole.experts`` (JSON list, in row order),
  ``mole.gate_variant`` and ``mole.layers`` (JSON list).

Layer names in files are resolved to module paths by a caller-supplied function (the pack
uses ComfyUI's own LoRA key map), so this module never needs the host.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

from .errors import WeightFileError
from .lora_format import LoRAPair
from .mole import GATE_VARIANTS, GateWeights, MoLELayer

FORMAT = "mole-gates"
FORMAT_VERSION = "1"
RELEASED_EXPERTS = ("face", "hand")
_RELEASED_PREFIX, _RELEASED_INFIX = "moe_", ".softmoe."


@dataclass
class GateFile:
    path: str | None
    variant: str
    expert_names: list[str]
    layers: dict[str, GateWeights]  # keyed by the layer name as written in the file
    base_family: str | None = None
    naming: str = "module"  # "module" (UNet module paths) or "kohya" (lora_unet_... names)
    metadata: dict[str, str] = field(default_factory=dict)


def _released_layers(tensors, path) -> dict[str, GateWeights]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not (key.startswith(_RELEASED_PREFIX) and _RELEASED_INFIX in key):
            raise WeightFileError(path, f"unexpected key {key} in a released-format MoLE gate file")
        name, rest = key[len(_RELEASED_PREFIX) :].split(_RELEASED_INFIX, 1)
        grouped.setdefault(name, {})[rest] = t.float()
    layers = {}
    for name, parts in grouped.items():
        needed = ["Phi_1.weight", "Phi_1.bias"] + [
            f"{e}_scale.{p}" for e in RELEASED_EXPERTS for p in ("weight", "bias")
        ]
        missing = [f"moe_{name}.softmoe.{k}" for k in needed if k not in parts]
        if missing:
            raise WeightFileError(path, f"layer {name} is missing gate tensors", missing)
        layers[name] = GateWeights(
            local_weight=parts["Phi_1.weight"],
            local_bias=parts["Phi_1.bias"],
            global_weight=torch.cat([parts[f"{e}_scale.weight"] for e in RELEASED_EXPERTS], dim=0),
            global_bias=torch.cat([parts[f"{e}_scale.bias"].reshape(1) for e in RELEASED_EXPERTS], dim=0),
        )
    return layers


def _pack_layers(tensors, metadata, path) -> tuple[dict[str, GateWeights], list[str], str]:
    try:
        version = metadata.get("mole.format_version")
        if version != FORMAT_VERSION:
            raise WeightFileError(
                path, f"MoLE gate format version {version!r} is not supported (this pack reads {FORMAT_VERSION!r})"
            )
        experts = json.loads(metadata["mole.experts"])
        names = json.loads(metadata["mole.layers"])
        variant = metadata["mole.gate_variant"]
    except (KeyError, json.JSONDecodeError) as e:
        raise WeightFileError(path, f"MoLE gate metadata is incomplete or malformed ({e})") from e
    if variant not in GATE_VARIANTS:
        raise WeightFileError(path, f"unknown gate variant {variant!r} (expected one of {GATE_VARIANTS})")
    layers, missing = {}, []
    for name in names:
        keys = [f"{name}.local.weight", f"{name}.local.bias", f"{name}.global.weight", f"{name}.global.bias"]
        missing += [k for k in keys if k not in tensors]
        if all(k in tensors for k in keys):
            layers[name] = GateWeights(*(tensors[k].float() for k in keys))
    if missing:
        raise WeightFileError(path, f"{len(missing)} gate tensor(s) named in the metadata are missing", missing)
    extra = sorted(
        set(tensors) - {f"{n}.{g}.{p}" for n in names for g in ("local", "global") for p in ("weight", "bias")}
    )
    if extra:
        raise WeightFileError(path, "holds tensors for layers its metadata does not list", extra)
    return layers, experts, variant


def read_gate_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | None = None) -> GateFile:
    """Recognise the format of a loaded gate file and return its gates."""
    if metadata.get("mole.format") == FORMAT:
        layers, experts, variant = _pack_layers(tensors, metadata, path)
        return GateFile(path, variant, experts, layers, metadata.get("mole.base_family"), "module", metadata)
    if tensors and all(k.startswith(_RELEASED_PREFIX) and _RELEASED_INFIX in k for k in tensors):
        layers = _released_layers(tensors, path)
        return GateFile(path, "released", list(RELEASED_EXPERTS), layers, None, "kohya", metadata)
    sample = sorted(tensors)[:3]
    raise WeightFileError(
        path,
        "is not a MoLE gate file: neither the pack's format (metadata mole.format = 'mole-gates') nor the "
        "released format (keys 'moe_<layer>.softmoe.Phi_1.weight')",
        [f"first keys: {', '.join(sample)}"] if sample else ["the file holds no tensors"],
    )


def save_gate_file(
    path,
    layers: dict[str, GateWeights],
    expert_names: list[str],
    variant: str,
    base_family: str,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Write gates in the pack's format; layer names are UNet module paths."""
    if variant not in GATE_VARIANTS:
        raise ValueError(f"gate variant must be one of {GATE_VARIANTS}")
    tensors = {}
    for name, g in layers.items():
        tensors[f"{name}.local.weight"] = g.local_weight
        tensors[f"{name}.local.bias"] = g.local_bias
        tensors[f"{name}.global.weight"] = g.global_weight
        tensors[f"{name}.global.bias"] = g.global_bias
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {
        "mole.format": FORMAT,
        "mole.format_version": FORMAT_VERSION,
        "mole.base_family": base_family,
        "mole.experts": json.dumps(list(expert_names)),
        "mole.gate_variant": variant,
        "mole.layers": json.dumps(list(layers)),
        **(extra_metadata or {}),
    }
    save_file(tensors, os.fspath(path), metadata)


def save_released_gate_file(path, layers: dict[str, GateWeights], kohya_names: dict[str, str]) -> None:
    """Write two-expert (face, hand) gates of the "released" variant in the public MoLE format.
    ``kohya_names`` maps each module path to its kohya layer name."""
    tensors = {}
    for name, g in layers.items():
        if g.local_weight.shape[0] != 2:
            raise ValueError("the released format holds exactly two experts (face, hand)")
        prefix = f"{_RELEASED_PREFIX}{kohya_names[name]}{_RELEASED_INFIX}"
        tensors[prefix + "Phi_1.weight"] = g.local_weight
        tensors[prefix + "Phi_1.bias"] = g.local_bias
        for i, expert in enumerate(RELEASED_EXPERTS):
            tensors[prefix + f"{expert}_scale.weight"] = g.global_weight[i : i + 1]
            tensors[prefix + f"{expert}_scale.bias"] = g.global_bias[i : i + 1]
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.fspath(path))


@dataclass
class Expert:
    """One loaded expert: its name (matched to the gate file's expert order), strength and
    layers keyed by the layer name as written in its file."""

    name: str
    path: str | None
    strength: float
    layers: dict[str, LoRAPair]


def resolve_names(names, resolve: Callable[[str], str | None], path, what: str) -> dict[str, str]:
    """Map file layer names to module paths; unknown names are an error that lists them."""
    resolved, unknown = {}, []
    for name in names:
        target = resolve(name)
        if target is None:
            unknown.append(name)
        else:
            resolved[name] = target
    if unknown:
        raise WeightFileError(
            path,
            f"{len(unknown)} of its {len(resolved) + len(unknown)} {what} layer names do not exist in this model "
            "(a file for another model family, such as SDXL experts on SD1.5?)",
            sorted(unknown),
        )
    return resolved


def order_experts(experts: list[Expert], gate_names: list[str], gate_path) -> list[Expert]:
    """Put experts in the gate file's row order, matching them by name."""
    given = [e.name for e in experts]
    if len(set(given)) != len(given):
        raise WeightFileError(None, f"two experts share a name: {given}; give each expert its own name")
    if sorted(given) != sorted(gate_names):
        raise WeightFileError(
            gate_path,
            f"its gates are for experts {gate_names} but the loaded experts are named {given}; "
            "name each expert as in the gate file (Load MoLE Experts' name inputs)",
        )
    by_name = {e.name: e for e in experts}
    return [by_name[n] for n in gate_names]


def build_mole_layers(
    experts: list[Expert],
    gate: GateFile,
    resolve: Callable[[str], str | None],
    mode: str = "both",
    strength: float = 1.0,
    dtype: torch.dtype | None = None,
    module_widths: Callable[[str], tuple[int, int, bool]] | None = None,
    read_pair: Callable[[Expert, LoRAPair], LoRAPair] | None = None,
) -> dict[str, MoLELayer]:
    """Check experts and gates against each other and build one MoLELayer per module path.
    ``resolve`` maps a layer name as written in a file to the module path (None if unknown);
    ``module_widths`` gives the model's (d_in, d_out, is_conv) at a module path, to catch
    experts made for another model whose layer names happen to exist here.
    Every check runs before anything is returned, so a failure applies nothing.
    Experts may be parsed from their files' layouts (meta tensors); ``read_pair`` then reads
    each pair's matrices as its layer is built, so the files are never held whole in memory
    beside the MoLE layers."""
    ordered = order_experts(experts, gate.expert_names, gate.path)
    per_expert: list[dict[str, LoRAPair]] = []
    for e in ordered:
        names = resolve_names(e.layers, resolve, e.path, "LoRA")
        per_expert.append({names[k]: v for k, v in e.layers.items()})
    gate_names = resolve_names(gate.layers, resolve, gate.path, "gate")
    gates = {gate_names[k]: v for k, v in gate.layers.items()}

    reference = set(per_expert[0])
    for e, layers in zip(ordered[1:], per_expert[1:]):
        if set(layers) != reference:
            diff = sorted(reference.symmetric_difference(layers))
            raise WeightFileError(
                e.path,
                f"expert '{e.name}' adapts other layers than expert '{ordered[0].name}' "
                f"({len(diff)} differ); all experts must cover the same layers",
                diff,
            )
    if set(gates) != reference:
        missing = sorted(reference - set(gates))
        extra = sorted(set(gates) - reference)
        raise WeightFileError(
            gate.path,
            f"its layers do not match the experts' ({len(missing)} expert layers have no gate, "
            f"{len(extra)} gates have no expert layer)",
            [f"no gate for {m}" for m in missing] + [f"no expert for {x}" for x in extra],
        )

    if module_widths is not None:
        for e, layers_of in zip(ordered, per_expert):
            wrong = []
            for module, pair in sorted(layers_of.items()):
                d_in, d_out, is_conv = module_widths(module)
                if (pair.d_in, pair.d_out, pair.is_conv) != (d_in, d_out, is_conv):
                    kind = lambda conv: "1x1 conv" if conv else "linear"  # noqa: E731
                    wrong.append(
                        f"{module}: expert is {kind(pair.is_conv)} {pair.d_in}->{pair.d_out}, "
                        f"model layer is {kind(is_conv)} {d_in}->{d_out}"
                    )
            if wrong:
                raise WeightFileError(
                    e.path,
                    f"expert '{e.name}' does not fit this model's layers (made for another model family?)",
                    wrong,
                )

    layers, mismatched = {}, []
    for module in sorted(reference):
        pairs = [layers_of[module] for layers_of in per_expert]
        if read_pair is not None:
            pairs = [read_pair(e, p) for e, p in zip(ordered, pairs)]
        if dtype is not None:
            pairs = [LoRAPair(p.down.to(dtype), p.up.to(dtype), p.alpha, p.is_conv) for p in pairs]
        g = gates[module]
        if dtype is not None:
            g = GateWeights(*(t.to(dtype) for t in (g.local_weight, g.local_bias, g.global_weight, g.global_bias)))
        try:
            layers[module] = MoLELayer(
                pairs,
                g,
                gate.variant,
                mode,
                expert_strengths=[e.strength for e in ordered],
                strength=strength,
                expert_names=[e.name for e in ordered],
            )
        except ValueError as err:
            mismatched.append(f"{module}: {err}")
    if mismatched:
        raise WeightFileError(gate.path, "gates and experts do not fit together (widths or expert count)", mismatched)
    return layers

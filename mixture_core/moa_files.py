"""MoA weight files (format "moa", versions 1 and 2).

A safetensors file holding, for every MoA layer (``<layer>`` = the attention module's UNet
path in SAI naming, such as ``input_blocks.1.1.transformer_blocks.0.attn2``):

* ``<layer>.to_q.weight``, ``<layer>.to_k.weight``, ``<layer>.to_v.weight`` (inner, in),
  ``<layer>.to_out.weight`` (dim, inner), ``<layer>.to_out.bias`` (dim,): the personalized attention;
* ``<layer>.router.fc1.{weight,bias}``, ``<layer>.router.fc2.{weight,bias}``: the router;

and once: ``fusion.mlp.fc{1,2}.{weight,bias}`` (the multimodal fusion) and
``spacetime.layer_embedding.weight``, ``spacetime.mlp.fc{1,2}.{weight,bias}`` (the
timestep/layer encoding).

Metadata (all strings): ``moa.format`` = "moa", ``moa.format_version`` = "1",
``moa.base_family`` (such as "sd15"), ``moa.image_encoder`` = "clip-vit-l-14",
``moa.image_embedding`` = "projected_cls", ``moa.image_embedding_dim`` (the fusion's image
width), ``moa.text_dim``, ``moa.layers`` (JSON list of layer ids; the order gives the layer
indices of the spacetime encoding), ``moa.heads`` (JSON {layer id: heads}),
``moa.n_layers``, ``moa.router_hidden``, ``moa.fusion_hidden``, ``moa.spacetime_dim``.
Query/context widths and the head width follow from the to_q and to_k shapes.

Version 2 (written only when a file needs it; version 1 files read as before) adds:

* ``moa.fusion``: "moa" (the above) or "fastcomposer": then the fusion tensors are
  ``fusion.mlp1.{layernorm,fc1,fc2}.{weight,bias}``, ``fusion.mlp2.{layernorm,fc1,fc2}.{weight,bias}``,
  ``fusion.layer_norm.{weight,bias}`` (FastComposer's postfuse module) and there is no spacetime
  encoding; ``moa.fusion_hidden`` is its MLPs' hidden width;
* ``moa.router``: "learned" (the router tensors above), "constant" or "attention" (no router
  tensors; ``moa.router_hidden`` is 0), with ``moa.router_share`` (constant), ``moa.router_quantile``,
  ``moa.router_map_layers`` (JSON list of the cross-attention layer ids whose maps it reads) and
  ``moa.prior_steps`` (the fraction of sampling that runs the prior alone);
* ``moa.image_preprocess``: "clip" (ComfyUI's CLIP preprocessing) or "fastcomposer" (subject
  images padded to a square with black, then resized, as FastComposer prepares them).

Any version may name the image encoder it was made with (a clip_vision file, checked by MoA
Subject Inject): ``moa.image_encoder_file`` (suggested file name), ``moa.image_encoder_layers``
(e.g. "22,23": the encoder layers that differ from OpenAI's CLIP ViT-L/14) and
``moa.image_encoder_fingerprint`` (vision_encoder_fingerprint over those layers).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import torch
from safetensors.torch import save_file

from .errors import WeightFileError
from .moa import AttentionShape, MoAModel, RouterConfig
from .safetensors_io import SafetensorsFile

FORMAT = "moa"
FORMAT_VERSION = "2"  # the newest this pack writes; it reads every version in READ_VERSIONS
READ_VERSIONS = ("1", "2")
IMAGE_PREPROCESS = ("clip", "fastcomposer")
IMAGE_ENCODER = "clip-vit-l-14"
IMAGE_EMBEDDING = "projected_cls"
_SIZES = ("router_hidden", "fusion_hidden", "spacetime_dim", "n_layers", "text_dim", "image_embedding_dim")


def _file_key(model: MoAModel, state_key: str) -> str:
    """The file's name for a state-dict entry: layer ids instead of list positions, and the
    spacetime encoding (owned by the fusion) at the top level."""
    if state_key.startswith("layers."):
        index, rest = state_key[len("layers.") :].split(".", 1)
        return f"{model.layer_ids[int(index)]}.{rest}"
    if state_key.startswith("fusion.spacetime."):
        return state_key[len("fusion.") :]
    return state_key


_ENCODER_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")


def _encoder_layer(key: str) -> int | None:
    m = _ENCODER_LAYER.match(key)
    return None if m is None else int(m[1])


def vision_encoder_fingerprint(state_dict: dict[str, torch.Tensor], layers) -> str:
    """A short hash identifying an image encoder's fine-tuned part: sha256 (first 16 hex digits)
    over the keys ``vision_model.encoder.layers.{i}.*`` for i in layers and
    ``visual_projection.weight``, sorted by key, each tensor's bytes as contiguous float16 on the
    CPU (so an fp16 and an fp32 copy of the same weights agree). The contract shared with the MoA
    trainer (training/): change it in both or not at all."""
    wanted = sorted({int(i) for i in layers})
    keys = sorted(k for k in state_dict if k == "visual_projection.weight" or _encoder_layer(k) in wanted)
    present = {_encoder_layer(k) for k in keys}
    missing = [f"vision_model.encoder.layers.{i}.*" for i in wanted if i not in present]
    missing += [] if "visual_projection.weight" in keys else ["visual_projection.weight"]
    if missing:
        raise ValueError(f"the image encoder has no {', '.join(missing)}")
    digest = hashlib.sha256()
    for k in keys:
        digest.update(state_dict[k].detach().to(torch.float16).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _needs_version_2(moa_model: MoAModel) -> bool:
    return (moa_model.fusion_kind, moa_model.router_config.kind, moa_model.image_preprocess) != (
        "moa",
        "learned",
        "clip",
    )


def save_moa_file(path, moa_model: MoAModel, base_family: str, extra_metadata: dict[str, str] | None = None) -> None:
    fusion, router = moa_model.fusion, moa_model.router_config
    tensors = {_file_key(moa_model, k): v.detach().contiguous().cpu() for k, v in moa_model.state_dict().items()}
    version_2 = (
        {
            "moa.fusion": moa_model.fusion_kind,
            "moa.router": router.kind,
            "moa.router_share": repr(router.share),
            "moa.router_quantile": repr(router.quantile),
            "moa.prior_steps": repr(router.prior_steps),
            "moa.router_map_layers": json.dumps(list(router.map_layers)),
            "moa.image_preprocess": moa_model.image_preprocess,
        }
        if _needs_version_2(moa_model)
        else {}
    )
    spacetime = moa_model.spacetime
    metadata = {
        **(extra_metadata or {}),  # first, so that it cannot overwrite the format's own keys
        "moa.format": FORMAT,
        "moa.format_version": "2" if version_2 else "1",
        **version_2,
        "moa.base_family": base_family,
        "moa.image_encoder": IMAGE_ENCODER,
        "moa.image_embedding": IMAGE_EMBEDDING,
        "moa.image_embedding_dim": str(fusion.image_dim),
        "moa.text_dim": str(fusion.text_dim),
        "moa.layers": json.dumps(moa_model.layer_ids),
        "moa.heads": json.dumps({layer_id: s.heads for layer_id, s in moa_model.shapes().items()}),
        "moa.n_layers": str(len(moa_model.layer_ids)),
        "moa.router_hidden": str(moa_model.router_hidden),
        "moa.fusion_hidden": str(fusion.hidden_dim),
        "moa.spacetime_dim": str(spacetime.dim if spacetime is not None else 0),
    }
    save_file(tensors, os.fspath(path), metadata)


def _read_version_2(metadata: dict[str, str], path, layers: list[str]) -> dict:
    """The MoAModel keyword arguments of the version 2 metadata (defaults for version 1)."""
    if metadata.get("moa.format_version") == "1":
        return {}
    try:
        map_layers = json.loads(metadata.get("moa.router_map_layers", "[]"))
        router = RouterConfig(
            kind=metadata.get("moa.router", "learned"),
            share=float(metadata.get("moa.router_share", "1.0")),
            quantile=float(metadata.get("moa.router_quantile", "0.98")),
            prior_steps=float(metadata.get("moa.prior_steps", "0.0")),
            map_layers=tuple(map_layers),
        )
    except (ValueError, TypeError) as e:
        raise WeightFileError(path, f"its router metadata is malformed ({e})") from e
    unknown = sorted(set(router.map_layers) - set(layers))
    if unknown:
        raise WeightFileError(path, "moa.router_map_layers names layers that moa.layers does not list", unknown)
    fusion = metadata.get("moa.fusion", "moa")
    preprocess = metadata.get("moa.image_preprocess", "clip")
    if fusion not in ("moa", "fastcomposer"):
        raise WeightFileError(path, f"moa.fusion {fusion!r} is not one of 'moa', 'fastcomposer'")
    if preprocess not in IMAGE_PREPROCESS:
        raise WeightFileError(path, f"moa.image_preprocess {preprocess!r} is not one of {IMAGE_PREPROCESS}")
    return {"fusion": fusion, "router": router, "image_preprocess": preprocess}


def _read_metadata(metadata: dict[str, str], path) -> tuple[list[str], dict[str, int], dict[str, int]]:
    tag = metadata.get("moa.format")
    if tag != FORMAT:
        found = "has no moa.format metadata" if tag is None else f"has moa.format {tag!r}"
        raise WeightFileError(path, f"is not a MoA file: it {found}, expected {FORMAT!r}")
    version = metadata.get("moa.format_version")
    if version not in READ_VERSIONS:
        raise WeightFileError(
            path, f"MoA format version {version!r} is not supported (this pack reads {', '.join(READ_VERSIONS)})"
        )
    try:
        layers = json.loads(metadata["moa.layers"])
        heads = {k: int(v) for k, v in json.loads(metadata["moa.heads"]).items()}
        sizes = {k: int(metadata[f"moa.{k}"]) for k in _SIZES}
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise WeightFileError(path, f"MoA metadata is incomplete or malformed ({type(e).__name__}: {e})") from e
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise WeightFileError(path, f"moa.layers must be a JSON list of layer ids, not {metadata['moa.layers'][:80]!r}")
    encoder = (metadata.get("moa.image_encoder"), metadata.get("moa.image_embedding"))
    if encoder != (IMAGE_ENCODER, IMAGE_EMBEDDING):
        raise WeightFileError(
            path, f"its subjects are encoded as {encoder}, this pack provides {(IMAGE_ENCODER, IMAGE_EMBEDDING)}"
        )
    if not layers or sizes["n_layers"] != len(layers) or len(set(layers)) != len(layers):
        raise WeightFileError(
            path, f"moa.n_layers is {sizes['n_layers']} but moa.layers lists {len(set(layers))} distinct layers"
        )
    if set(heads) != set(layers):
        raise WeightFileError(
            path,
            "moa.heads does not give the heads of exactly the layers in moa.layers",
            sorted(set(heads).symmetric_difference(layers)),
        )
    return layers, heads, sizes


def load_moa_file(path) -> MoAModel:
    """Read a MoA file into a MoAModel (in the file's dtype, on the CPU). Raises
    WeightFileError, naming the file, for anything that does not fit. Names, shapes and dtypes
    are checked on the file's layout; the tensors are read only once all of them fit."""
    file = SafetensorsFile(path)
    tensors, metadata = file.layout(), file.metadata
    layers, heads, sizes = _read_metadata(metadata, path)
    kinds = _read_version_2(metadata, path, layers)
    shape_keys = [f"{layer_id}.{p}.weight" for layer_id in layers for p in ("to_q", "to_k")]
    missing = [k for k in shape_keys if k not in tensors]
    if missing:
        raise WeightFileError(path, f"{len(missing)} attention tensor(s) are missing", missing)
    shapes, wrong = {}, []
    for layer_id in layers:
        try:
            shapes[layer_id] = AttentionShape.from_weights(
                tensors[f"{layer_id}.to_q.weight"], tensors[f"{layer_id}.to_k.weight"], heads[layer_id]
            )
        except ValueError as e:
            wrong.append(f"{layer_id}: {e}")
    if wrong:
        raise WeightFileError(path, "attention weights do not fit their heads", wrong)

    try:
        with torch.device("meta"):  # no random init to throw away: every value comes from the file
            model = MoAModel(
                shapes,
                sizes["router_hidden"],
                sizes["fusion_hidden"],
                sizes["spacetime_dim"],
                sizes["text_dim"],
                sizes["image_embedding_dim"],
                **kinds,
            )
    except (ValueError, RuntimeError) as e:
        raise WeightFileError(path, f"its metadata describes modules that cannot be built ({e})") from e
    expected = {_file_key(model, k): (k, v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise WeightFileError(path, f"{len(missing)} tensor(s) are missing", missing)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise WeightFileError(path, f"holds {len(extra)} tensor(s) its metadata does not describe", extra)
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} {str(tensors[k].dtype).removeprefix('torch.')}, expected {tuple(shape)} floating point"
        for k, (_, shape) in expected.items()
        if tensors[k].shape != shape or not tensors[k].is_floating_point()
    ]
    if wrong:
        raise WeightFileError(path, f"{len(wrong)} tensor(s) have the wrong shape or dtype", wrong)
    # fp8 files are widened to fp16, exactly (every fp8 value is an fp16 value): the MoA layers run
    # in the file's dtype, and matmuls have no fp8 kernels.
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    tensors = {k: v.half() if v.dtype in fp8 else v for k, v in file.read(expected).items()}
    model.load_state_dict({state_key: tensors[k] for k, (state_key, _) in expected.items()}, assign=True)
    model.base_family, model.metadata = metadata.get("moa.base_family"), metadata
    return model


def check_against_model(
    moa_model: MoAModel, expected: dict[str, tuple[int, int]], base_family: str | None, path=None
) -> None:
    """Check a MoA model against the host model's attention layers, expected =
    {layer id: (dim, context_dim)}. Layers the file does not cover stay the prior; file
    layers the model lacks, other widths or another base family are a WeightFileError."""
    if moa_model.base_family and base_family and moa_model.base_family != base_family:
        raise WeightFileError(path, f"was made for {moa_model.base_family!r} models, this model is {base_family!r}")
    wrong = []
    for layer_id, shape in moa_model.shapes().items():
        if layer_id not in expected:
            wrong.append(f"{layer_id}: no such attention layer in this model")
        elif tuple(expected[layer_id]) != (shape.dim, shape.context_dim):
            dim, context_dim = expected[layer_id]
            wrong.append(
                f"{layer_id}: file has dim {shape.dim}, context {shape.context_dim}; model has dim {dim}, context {context_dim}"
            )
    if wrong:
        raise WeightFileError(
            path,
            f"does not fit this model's attention layers ({len(wrong)} of {len(moa_model.layer_ids)} "
            "layers differ; made for another model family?)",
            wrong,
        )

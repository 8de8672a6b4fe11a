"""FastComposer's published weights as MoA weights: the one conversion, used by the command
(training/convert_fastcomposer.py, which writes files) and by Load MoA Router (which reads
FastComposer's pytorch_model.bin from models/moa and caches the result).

FastComposer (Xiao et al. 2023, github.com/mit-han-lab/fastcomposer, MIT license) publishes one
file, pytorch_model.bin: the state dict of its FastComposerModel (fastcomposer/model.py), keys
``unet.*`` (diffusers UNet2DConditionModel, SD1.5, fine-tuned), ``text_encoder.*`` (frozen),
``vae.*`` (frozen), ``image_encoder.vision_model.*`` / ``image_encoder.visual_projection.weight``
(CLIP ViT-L/14, its last two layers fine-tuned) and ``postfuse_module.*``
(FastComposerPostfuseModule). What becomes what:

* every UNet attention's to_q/to_k/to_v/to_out.0 (diffusers names, 32 on SD1.5) -> the
  personalized attention of the MoA layer of the same module (the pack's SAI layer ids);
* postfuse_module.* -> the MoA file's fusion (moa.fusion "fastcomposer");
* image_encoder.* -> a clip_vision state dict (transformers CLIPVisionModelWithProjection layout,
  the layout Load CLIP Vision reads); the MoA file names it and carries its fingerprint;
* no router was trained: the file's router is "attention" (the training-free router of
  mixture_core.moa_router, reading the maps of FastComposer's localization layers) or "constant".

Not used: the UNet's other fine-tuned layers (MoA keeps the base model's, the prior), the text
encoder and the VAE (FastComposer did not train them: ComfyUI's SD1.5 ones are the same).

The .bin is a pickle: it is read with torch.load(weights_only=True), which only rebuilds tensors
and plain containers and refuses anything else (as ComfyUI's own loader reads .ckpt/.pt files).
A .safetensors copy of the same state dict is read as well.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import WeightFileError
from .moa import AttentionShape, MoAModel, RouterConfig
from .moa_files import save_moa_file, vision_encoder_fingerprint
from .safetensors_io import SafetensorsFile
from .unet_names import SD15
from .unet_names import attention_layers as unet_attention_layers

# SD1.5's attention heads and text width (FastComposer's UNet is SD1.5's).
TEXT_WIDTH, HEADS = SD15.context_dim, 8
# FastComposer's localization layers: unet_store_cross_attention_scores(unet, ..., layers=5)
# keeps the cross-attentions of the 5 middle entries of its UNET_LAYER_NAMES (model.py l. 287-299).
LOCALIZATION_BLOCKS = ("down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2")
# FastComposer's run_training.sh: --image_encoder_trainable_layers 2 (the last two of 24).
IMAGE_ENCODER_TRAINED_LAYERS = (22, 23)
VISION = {"width": 1024, "layers": 24, "mlp": 4096, "patch": 14, "positions": 257, "projection": 768}
POSTFUSE = ("mlp1.layernorm", "mlp1.fc1", "mlp1.fc2", "mlp2.layernorm", "mlp2.fc1", "mlp2.fc2", "layer_norm")
# Prefixes of the published file that are read but not converted (see the module docstring).
UNUSED_PREFIXES = ("unet.", "text_encoder.", "vae.")
# A buffer older transformers versions saved with the weights; ComfyUI's CLIP vision has none.
UNUSED_KEYS = ("image_encoder.vision_model.embeddings.position_ids",)
DEFAULT_ENCODER_FILE = "fastcomposer_image_encoder.safetensors"
# The router a conversion gets unless told otherwise (the command's option defaults too): the
# constant router's share, the attention router's quantile, and FastComposer's delayed subject
# conditioning (10 of 50 steps run the prior alone).
ROUTER_DEFAULTS = {"share": 0.5, "quantile": 0.98, "prior_steps": 0.2}


def attention_layers() -> dict[str, tuple[str, AttentionShape]]:
    """{SAI layer id: (diffusers module path, shape)} of SD1.5's 32 attentions, in UNet order
    (the names from mixture_core.unet_names, the pack's one map of UNet layer names)."""
    return {
        layer.sai: (layer.diffusers, AttentionShape(layer.dim, layer.context_dim, HEADS, layer.dim // HEADS))
        for layer in unet_attention_layers(SD15)
    }


def map_layers() -> tuple[str, ...]:
    """The cross-attentions of FastComposer's localization blocks: the attention router's maps."""
    return tuple(
        layer.sai
        for layer in unet_attention_layers(SD15)
        if layer.attn == "attn2" and layer.diffusers_block in LOCALIZATION_BLOCKS
    )


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every key the converter reads, with its shape (SD1.5, CLIP ViT-L/14, embed_dim 768)."""
    shapes = {}
    for _, (diffusers, s) in attention_layers().items():
        base = f"unet.{diffusers}"
        shapes |= {
            f"{base}.to_q.weight": (s.inner, s.dim),
            f"{base}.to_k.weight": (s.inner, s.context_dim),
            f"{base}.to_v.weight": (s.inner, s.context_dim),
            f"{base}.to_out.0.weight": (s.dim, s.inner),
            f"{base}.to_out.0.bias": (s.dim,),
        }
    d = TEXT_WIDTH  # FastComposerPostfuseModule(embed_dim): mlp1 = MLP(2d, d, d), mlp2 = MLP(d, d, d)
    ins = {"mlp1.layernorm": 2 * d, "mlp1.fc1": 2 * d, "mlp2.layernorm": d, "mlp2.fc1": d, "layer_norm": d}
    for name in POSTFUSE:
        if name.endswith(("fc1", "fc2")):  # Linear(in, d): weight (d, in), bias (d,)
            shapes[f"postfuse_module.{name}.weight"] = (d, ins[name] if name.endswith("fc1") else d)
            shapes[f"postfuse_module.{name}.bias"] = (d,)
        else:  # LayerNorm(in): weight and bias (in,)
            shapes[f"postfuse_module.{name}.weight"] = shapes[f"postfuse_module.{name}.bias"] = (ins[name],)
    w, v = VISION["width"], "image_encoder.vision_model"
    shapes |= {
        f"{v}.embeddings.class_embedding": (w,),
        f"{v}.embeddings.patch_embedding.weight": (w, 3, VISION["patch"], VISION["patch"]),
        f"{v}.embeddings.position_embedding.weight": (VISION["positions"], w),
        f"{v}.pre_layrnorm.weight": (w,),
        f"{v}.pre_layrnorm.bias": (w,),
        f"{v}.post_layernorm.weight": (w,),
        f"{v}.post_layernorm.bias": (w,),
        "image_encoder.visual_projection.weight": (VISION["projection"], w),
    }
    for i in range(VISION["layers"]):
        layer = f"{v}.encoder.layers.{i}"
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{layer}.self_attn.{p}.weight": (w, w), f"{layer}.self_attn.{p}.bias": (w,)}
        for norm in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{layer}.{norm}.weight": (w,), f"{layer}.{norm}.bias": (w,)}
        shapes |= {
            f"{layer}.mlp.fc1.weight": (VISION["mlp"], w),
            f"{layer}.mlp.fc1.bias": (VISION["mlp"],),
            f"{layer}.mlp.fc2.weight": (w, VISION["mlp"]),
            f"{layer}.mlp.fc2.bias": (w,),
        }
    return shapes


# ---- reading ----------------------------------------------------------------------------------


def find_source(path) -> Path:
    """The weight file: the path itself, or pytorch_model.bin / model.safetensors in a folder."""
    path = Path(path)
    if path.is_dir():
        for name in ("pytorch_model.bin", "model.safetensors"):
            if (path / name).is_file():
                return path / name
        raise WeightFileError(path, "holds no pytorch_model.bin (FastComposer's file) or model.safetensors")
    if not path.is_file():
        raise WeightFileError(path, "file not found")
    return path


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The state dict of a FastComposer file: safetensors, or a torch pickle read with
    weights_only=True (memory-mapped when the file allows); anything else is refused."""
    path = find_source(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) > 8 and head[8:9] == b"{":
        sf = SafetensorsFile(path)
        return sf.read(sf.keys)
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a legacy (non-zip) pickle cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightFileError(
            path,
            "needs more than tensors and plain containers to load (torch.load(weights_only=True) "
            f"refused it): it is not a plain state dict, and this converter runs no pickled code ({e})",
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for files that are not torch pickles
        raise WeightFileError(
            path, f"is neither a safetensors file nor a torch state dict ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightFileError(
            path,
            f"holds a {type(state).__name__}, not a state dict of tensors (FastComposer's pytorch_model.bin is one)",
        )
    return state


# ---- converting -------------------------------------------------------------------------------


def check_keys(state: dict[str, torch.Tensor], path=None) -> None:
    """Every key the conversion needs is present with its shape and a floating dtype; every
    other key is one of the parts not used (UNUSED_PREFIXES / UNUSED_KEYS)."""
    expected = expected_shapes()
    missing = [k for k in expected if k not in state]
    if missing:
        raise WeightFileError(
            path, f"is not FastComposer's SD1.5 state dict: {len(missing)} key(s) are missing", missing
        )
    wrong = [
        f"{k}: {tuple(state[k].shape)} {str(state[k].dtype).removeprefix('torch.')}, expected {shape} floating point"
        for k, shape in expected.items()
        if tuple(state[k].shape) != shape or not state[k].is_floating_point()
    ]
    if wrong:
        raise WeightFileError(path, f"{len(wrong)} key(s) have the wrong shape or dtype", wrong)
    unknown = sorted(
        k for k in state if k not in expected and k not in UNUSED_KEYS and not k.startswith(UNUSED_PREFIXES)
    )
    if unknown:
        raise WeightFileError(path, f"holds {len(unknown)} key(s) FastComposer's model does not have", unknown)


def convert(
    state: dict[str, torch.Tensor],
    router: RouterConfig | None = None,
    dtype=torch.float16,
    path=None,
    progress: Callable[[int, int], None] | None = None,
):
    """(MoAModel, clip_vision state dict) from a FastComposer state dict; progress(done, total),
    if given, is called as the layers are converted (Load MoA Router shows it as a progress bar)."""
    check_keys(state, path)
    router = router or RouterConfig("attention", **ROUTER_DEFAULTS, map_layers=map_layers())
    layers = attention_layers()
    with torch.device("meta"):
        moa = MoAModel(
            {sai: shape for sai, (_, shape) in layers.items()},
            fusion_hidden=TEXT_WIDTH,
            fusion="fastcomposer",
            router=router,
            image_preprocess="fastcomposer",
        )
    total = len(layers) + 2  # the layers, the fusion, the image encoder
    done = 0

    def step():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).contiguous()

    values = {}
    for i, (_, (diffusers, _)) in enumerate(layers.items()):
        base = f"unet.{diffusers}"
        values |= {
            f"layers.{i}.to_q.weight": cast(state[f"{base}.to_q.weight"]),
            f"layers.{i}.to_k.weight": cast(state[f"{base}.to_k.weight"]),
            f"layers.{i}.to_v.weight": cast(state[f"{base}.to_v.weight"]),
            f"layers.{i}.to_out.weight": cast(state[f"{base}.to_out.0.weight"]),
            f"layers.{i}.to_out.bias": cast(state[f"{base}.to_out.0.bias"]),
        }
        step()
    values |= {
        f"fusion.{k[len('postfuse_module.') :]}": cast(v) for k, v in state.items() if k.startswith("postfuse_module.")
    }
    moa.load_state_dict(values, assign=True, strict=True)
    step()
    vision = {
        k[len("image_encoder.") :]: cast(v)
        for k, v in state.items()
        if k.startswith("image_encoder.") and k not in UNUSED_KEYS
    }
    step()
    return moa, vision


def conversion_metadata(vision: dict, source_name: str, encoder_file: str = DEFAULT_ENCODER_FILE) -> dict[str, str]:
    """The MoA file's metadata: where it came from and the image encoder it needs (its fingerprint)."""
    return {
        "description": "FastComposer (mit-han-lab/fastcomposer, MIT license) converted to MoA by "
        "mixture_core.fastcomposer: "
        "its UNet attentions as the personalized attentions, its postfuse module as the fusion, no trained router",
        "moa.source": "fastcomposer",
        "moa.source_file": source_name,
        "moa.image_encoder_file": encoder_file,
        "moa.image_encoder_layers": ",".join(map(str, IMAGE_ENCODER_TRAINED_LAYERS)),
        "moa.image_encoder_fingerprint": vision_encoder_fingerprint(vision, IMAGE_ENCODER_TRAINED_LAYERS),
    }


def write(moa: MoAModel, vision: dict, out=None, clip_vision_out=None, source_name: str = "pytorch_model.bin") -> str:
    """The clip_vision file and the MoA file (those asked for), each written whole or not at
    all; returns the image encoder's fingerprint."""
    encoder_file = Path(clip_vision_out).name if clip_vision_out else DEFAULT_ENCODER_FILE
    metadata = conversion_metadata(vision, source_name, encoder_file)
    if clip_vision_out:
        write_encoder(clip_vision_out, vision)
    if out:
        atomic_write(out, lambda tmp: save_moa_file(tmp, moa, "sd15", metadata))
    return metadata["moa.image_encoder_fingerprint"]


def write_encoder(path, vision: dict) -> None:
    atomic_write(
        path,
        lambda tmp: save_file(
            vision,
            tmp,
            {"description": "FastComposer's CLIP ViT-L/14 image encoder (layers 22-23 fine-tuned)", "format": "pt"},
        ),
    )


def read_encoder(path) -> dict[str, torch.Tensor]:
    """A clip_vision state dict written by write_encoder, checked to be FastComposer's layout."""
    file = SafetensorsFile(path)
    expected = {k[len("image_encoder.") :]: s for k, s in expected_shapes().items() if k.startswith("image_encoder.")}
    wrong = sorted(set(file.keys).symmetric_difference(expected))
    wrong += [k for k in expected if k in file.keys and file.shape(k) != expected[k]]
    if wrong:
        raise WeightFileError(path, "is not FastComposer's image encoder", wrong)
    return file.read(file.keys)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write_to: Callable[[str], None]) -> None:
    """write_to(temporary path) then a rename: the file is whole or absent. It gets the usual
    permissions (0666 less the umask, as any other program's files): safetensors' writer
    creates its files 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_to(str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

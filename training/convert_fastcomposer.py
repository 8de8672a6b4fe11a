"""Convert FastComposer's published weights into a MoA file (and its image encoder into a clip_vision file).

    python -m training.convert_fastcomposer model/fastcomposer/pytorch_model.bin \\
        --out models/moa/fastcomposer.safetensors \\
        --clip-vision-out models/clip_vision/fastcomposer_image_encoder.safetensors

(--out and --clip-vision-out may also be given in two separate runs.)

FastComposer (Xiao et al. 2023, github.com/mit-han-lab/fastcomposer, MIT license) publishes one
file, pytorch_model.bin: the state dict of its FastComposerModel (fastcomposer/model.py), keys
``unet.*`` (diffusers UNet2DConditionModel, SD1.5, fine-tuned), ``text_encoder.*`` (frozen),
``vae.*`` (frozen), ``image_encoder.vision_model.*`` / ``image_encoder.visual_projection.weight``
(CLIP ViT-L/14, its last two layers fine-tuned) and ``postfuse_module.*``
(FastComposerPostfuseModule). What becomes what:

* every UNet attention's to_q/to_k/to_v/to_out.0 (diffusers names, 32 on SD1.5) -> the
  personalized attention of the MoA layer of the same module (the pack's SAI layer ids);
* postfuse_module.* -> the MoA file's fusion (moa.fusion "fastcomposer");
* image_encoder.* -> a clip_vision file (transformers CLIPVisionModelWithProjection layout, the
  layout Load CLIP Vision reads); the MoA file names it and carries its fingerprint;
* no router was trained: the file's router is "attention" (the training-free router of
  mixture_core.moa_router, reading the maps of FastComposer's localization layers) or "constant".

Not used: the UNet's other fine-tuned layers (MoA keeps the base model's, the prior), the text
encoder and the VAE (FastComposer did not train them: ComfyUI's SD1.5 ones are the same).

The .bin is a pickle: it is read with torch.load(weights_only=True), which only rebuilds tensors
and plain containers and refuses anything else. A .safetensors copy of the same state dict is
read as well.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here] + [str(_here.parent)]
    __package__ = "training"

import torch
from safetensors.torch import save_file

from mixture_core.errors import WeightFileError
from mixture_core.moa import AttentionShape, MoAModel, RouterConfig
from mixture_core.moa_files import save_moa_file, vision_encoder_fingerprint
from mixture_core.safetensors_io import SafetensorsFile

# SD1.5's UNet (diffusers UNet2DConditionModel): (diffusers block, SAI block, width) of every
# spatial transformer; each holds transformer_blocks.0 with attn1 (self) and attn2 (cross).
TEXT_WIDTH, HEADS = 768, 8
_TRANSFORMERS = (
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


def attention_layers() -> dict[str, tuple[str, AttentionShape]]:
    """{SAI layer id: (diffusers module path, shape)} of the 32 attentions."""
    out = {}
    for diffusers, sai, width in _TRANSFORMERS:
        for attn, context in (("attn1", width), ("attn2", TEXT_WIDTH)):
            out[f"{sai}.transformer_blocks.0.{attn}"] = (
                f"{diffusers}.transformer_blocks.0.{attn}",
                AttentionShape(width, context, HEADS, width // HEADS),
            )
    return out


def map_layers() -> tuple[str, ...]:
    return tuple(
        sai
        for sai, (diffusers, _) in attention_layers().items()
        if diffusers.endswith("attn2") and diffusers.startswith(LOCALIZATION_BLOCKS)
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


def convert(state: dict[str, torch.Tensor], router: RouterConfig | None = None, dtype=torch.float16, path=None):
    """(MoAModel, clip_vision state dict, metadata) from a FastComposer state dict."""
    check_keys(state, path)
    router = router or RouterConfig("attention", quantile=0.98, prior_steps=0.2, map_layers=map_layers())
    layers = attention_layers()
    with torch.device("meta"):
        moa = MoAModel(
            {sai: shape for sai, (_, shape) in layers.items()},
            fusion_hidden=TEXT_WIDTH,
            fusion="fastcomposer",
            router=router,
            image_preprocess="fastcomposer",
        )
    values = {}
    for i, (_, (diffusers, _)) in enumerate(layers.items()):
        base = f"unet.{diffusers}"
        values |= {
            f"layers.{i}.to_q.weight": state[f"{base}.to_q.weight"],
            f"layers.{i}.to_k.weight": state[f"{base}.to_k.weight"],
            f"layers.{i}.to_v.weight": state[f"{base}.to_v.weight"],
            f"layers.{i}.to_out.weight": state[f"{base}.to_out.0.weight"],
            f"layers.{i}.to_out.bias": state[f"{base}.to_out.0.bias"],
        }
    values |= {
        f"fusion.{k[len('postfuse_module.') :]}": v for k, v in state.items() if k.startswith("postfuse_module.")
    }
    moa.load_state_dict({k: v.to(dtype).contiguous() for k, v in values.items()}, assign=True, strict=True)
    vision = {
        k[len("image_encoder.") :]: v.to(dtype).contiguous()
        for k, v in state.items()
        if k.startswith("image_encoder.") and k not in UNUSED_KEYS
    }
    return moa, vision


def write(moa: MoAModel, vision: dict, out=None, clip_vision_out=None, source_name: str = "pytorch_model.bin") -> str:
    """The clip_vision file and the MoA file (those asked for), each written whole or not at
    all; returns the image encoder's fingerprint."""
    encoder_file = Path(clip_vision_out).name if clip_vision_out else DEFAULT_ENCODER_FILE
    metadata = {
        "description": "FastComposer (mit-han-lab/fastcomposer, MIT license) converted to MoA by "
        "training.convert_fastcomposer: "
        "its UNet attentions as the personalized attentions, its postfuse module as the fusion, no trained router",
        "moa.source": "fastcomposer",
        "moa.source_file": source_name,
        "moa.image_encoder_file": encoder_file,
        "moa.image_encoder_layers": ",".join(map(str, IMAGE_ENCODER_TRAINED_LAYERS)),
        "moa.image_encoder_fingerprint": vision_encoder_fingerprint(vision, IMAGE_ENCODER_TRAINED_LAYERS),
    }
    if clip_vision_out:
        _atomic(
            clip_vision_out,
            lambda tmp: save_file(
                vision,
                tmp,
                {"description": "FastComposer's CLIP ViT-L/14 image encoder (layers 22-23 fine-tuned)", "format": "pt"},
            ),
        )
    if out:
        _atomic(out, lambda tmp: save_moa_file(tmp, moa, "sd15", metadata))
    return metadata["moa.image_encoder_fingerprint"]


def _atomic(path, write_to) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_to(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m training.convert_fastcomposer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="FastComposer's pytorch_model.bin (or a folder holding it, or a .safetensors copy)")
    p.add_argument("--out", help="the MoA file to write (models/moa/....safetensors)")
    p.add_argument(
        "--clip-vision-out",
        help="also write FastComposer's image encoder as a clip_vision file "
        "(models/clip_vision/....safetensors); MoA Subject Inject needs it",
    )
    p.add_argument(
        "--router",
        choices=("attention", "constant"),
        default="attention",
        help="attention: per pixel from the subject tokens' cross-attention maps (default); "
        "constant: --share everywhere",
    )
    p.add_argument("--share", type=float, default=0.5, help="the constant router's personal share (0..1)")
    p.add_argument("--quantile", type=float, default=0.98, help="the attention router's normalizing quantile")
    p.add_argument(
        "--prior-steps",
        type=float,
        default=0.2,
        help="fraction of sampling run by the prior alone (FastComposer delays the subject: 10 of 50 steps)",
    )
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="dtype of the written tensors")
    args = p.parse_args(argv)
    if not args.out and not args.clip_vision_out:
        p.error("give --out (the MoA file), --clip-vision-out (the image encoder) or both")
    for name in ("out", "clip_vision_out"):
        value = getattr(args, name)
        if value and not value.endswith(".safetensors"):
            p.error(f"--{name.replace('_', '-')} must be a .safetensors file, not {value}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        router = RouterConfig(
            args.router,
            share=args.share,
            quantile=args.quantile,
            prior_steps=args.prior_steps,
            map_layers=map_layers() if args.router == "attention" else (),
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        source = find_source(args.source)
        state = read_state_dict(source)
        moa, vision = convert(state, router, torch.float16 if args.dtype == "fp16" else torch.float32, source)
    except WeightFileError as e:
        raise SystemExit(f"error: {e}") from None
    fingerprint = write(moa, vision, args.out, args.clip_vision_out, source.name)
    expected = expected_shapes()
    unused = sorted({k.split(".")[0] for k in state if k not in expected and k not in UNUSED_KEYS})
    if args.out:
        print(
            f"wrote {args.out}: {len(moa.layer_ids)} MoA layers, FastComposer fusion, {router.kind} router "
            f"(image encoder fingerprint {fingerprint})"
        )
    if args.clip_vision_out:
        print(
            f"wrote {args.clip_vision_out}: FastComposer's CLIP ViT-L/14 image encoder ({len(vision)} tensors, "
            f"fingerprint {fingerprint})"
        )
    else:
        print(
            f"note: MoA Subject Inject needs FastComposer's image encoder too; write it with --clip-vision-out "
            f"models/clip_vision/{DEFAULT_ENCODER_FILE}"
        )
    print(f"not used (as intended): the rest of {', '.join(unused) or 'nothing'} (see --help)")


if __name__ == "__main__":
    main()

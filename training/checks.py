"""Checks of a script's inputs that run before any model loads (seconds, not the minutes and
gigabytes of loading a base model first): files that exist and are safetensors files, the
checkpoint's model family and prediction type read from its header, the experts' files.

Each check stops the script with ``error: <flag> <file>: <what is wrong>`` (SystemExit), never a
traceback. A script calls them after its data folder is scanned and before load_base.
"""

from __future__ import annotations

from pathlib import Path

from mixture_core import unet_names


def first_cross_attention_to_k(layout: unet_names.Layout) -> str:
    """The checkpoint key of the first cross-attention's to_k: its input width is the text width."""
    first = next(a for a in unet_names.attention_layers(layout) if a.attn == "attn2")
    return f"{unet_names.CHECKPOINT_PREFIX}{first.sai}.to_k.weight"


# attn2.to_k of the first cross-attention of SD1.x/SD2.x (input_blocks.1) and of SDXL (its first
# level has none: input_blocks.4): its input width is the text-embedding width.
_TO_K = tuple(first_cross_attention_to_k(layout) for layout in (unet_names.SD15, unet_names.SDXL))
_FAMILIES = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
_FAMILY_NAMES = {"sd15": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
# Keys ComfyUI's model detection reads as "not epsilon prediction" (comfy/supported_models.py).
_NOT_EPS_KEYS = ("v_pred", "edm_vpred.sigma_max", "edm_mean")


def fail(flag: str, path, message: str):
    """flag: "--checkpoint", or "--experts face=" (then the path follows without a space)."""
    raise SystemExit(f"error: {flag}{'' if flag.endswith('=') else ' '}{path}: {message}")


def require_file(path, flag: str, suffix: str = ".safetensors") -> Path:
    """The file at `path`, which must exist and end in `suffix`."""
    p = Path(path)
    if p.is_dir():
        fail(flag, path, f"is a folder; give the {suffix} file")
    if not p.is_file():
        fail(flag, path, "not found")
    if suffix and p.suffix.lower() != suffix:
        fail(flag, path, f"must be a {suffix} file")
    return p


def safetensors_header(path, flag: str) -> tuple[dict[str, list[int]], dict[str, str]]:
    """({tensor name: shape}, metadata) from the file's header alone (no tensor is read)."""
    from safetensors import safe_open

    p = require_file(path, flag)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # the library raises SafetensorError, OSError or others on a bad header
        with open(p, "rb") as f:
            head = f.read(2)
        kind = " (it looks like a pickled .ckpt/.pt file)" if head[:1] == b"\x80" or head == b"PK" else ""
        fail(flag, path, f"is not a readable safetensors file{kind}: {e}")


def checkpoint_family(path, flag: str = "--checkpoint") -> str:
    """ "sd15", "sd2" or "sdxl" from a single-file checkpoint's header, refusing files that are not
    a single-file Stable Diffusion checkpoint or that predict something other than the noise."""
    shapes, metadata = safetensors_header(path, flag)
    if not any(k.startswith(unet_names.CHECKPOINT_PREFIX) for k in shapes):
        fail(
            flag,
            path,
            "holds no model.diffusion_model.* tensors: not a single-file checkpoint "
            "(a LoRA, a VAE, a UNet-only file?); give the file Load Checkpoint loads",
        )
    not_eps = [k for k in _NOT_EPS_KEYS if k in shapes]
    prediction = str(metadata.get("modelspec.prediction_type", "epsilon")).lower()
    if not_eps or prediction not in ("epsilon", "eps"):
        found = not_eps[0] if not_eps else f"modelspec.prediction_type = {prediction}"
        fail(flag, path, f"is not an epsilon-prediction model ({found}); the scripts train epsilon prediction only")
    for key in _TO_K:
        shape = shapes.get(key)
        if shape is not None and len(shape) == 2:
            family = _FAMILIES.get(shape[1])
            if family is None:
                break
            return family
    fail(
        flag,
        path,
        "is not an SD1.x or SDXL checkpoint (no cross-attention of text width 768 or 2048 where they have it)",
    )


def require_family(path, allowed: tuple[str, ...], flag: str = "--checkpoint") -> str:
    family = checkpoint_family(path, flag)
    if family not in allowed:
        names = " or ".join(_FAMILY_NAMES[f] for f in allowed)
        fail(flag, path, f"is an {_FAMILY_NAMES[family]} checkpoint; this script trains on {names}")
    return family


def lora_file(path, flag: str) -> dict[str, list[int]]:
    """A LoRA file's header: it must hold kohya-style lora_down/lora_up tensors."""
    shapes, _ = safetensors_header(path, flag)
    if not any(".lora_down." in k or ".lora_A." in k for k in shapes):
        kinds = "a checkpoint" if any(k.startswith(unet_names.CHECKPOINT_PREFIX) for k in shapes) else "not a LoRA"
        fail(
            flag,
            path,
            f"holds no lora_down/lora_up tensors ({kinds}); give a LoRA file such as the stage-2 script writes",
        )
    return shapes

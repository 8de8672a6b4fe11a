"""The ComfyUI host for the training scripts: importing it (through comfyui_host, the
repository's one way of finding it), the pack's node-side helpers, and forgetting a run's models.

The model library of every script is the host's ``comfy`` package: checkpoints load with the same
loader and file ComfyUI uses, and the UNet trained is ComfyUI's own module tree.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import sys
from pathlib import Path

import comfyui_host


def import_host() -> Path:
    """The host first on sys.path and initialised (comfyui_host.import_host); a missing host
    stops the script with the reason."""
    try:
        return comfyui_host.import_host()
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from e


def import_pack():
    """This repository as the package ComfyUI loads from custom_nodes/ (for the node-side
    helpers: ComfyUI's LoRA key map, the model family)."""
    import_host()
    return comfyui_host.import_pack()


def node_helpers():
    """The pack's nodes.unet_layers (ComfyUI's LoRA key map, model family, module widths)."""
    return importlib.import_module(f"{import_pack().__name__}.nodes.unet_layers")


@contextlib.contextmanager
def host_session():
    """Free ComfyUI's references to the models a run loaded when it ends (in-process runs)."""
    try:
        yield
    finally:
        gc.collect()
        if "comfy.model_management" in sys.modules:
            mm = sys.modules["comfy.model_management"]
            mm.cleanup_models_gc()
            mm.soft_empty_cache()
        gc.collect()

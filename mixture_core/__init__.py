"""Framework-free math and file formats for MoLE and MoA.

Only torch, einops and safetensors are imported here: never ComfyUI. The pack's
``nodes/`` adapt these pieces to ComfyUI's ModelPatcher; ``training/`` reuses them.

Every module is imported with the package, so that the pack's ``__init__.py`` can make its
``mixture_core`` the same module objects as the top-level one (one identity per process;
tests/host/test_module_identity.py). A new module goes in this list (tests/core/test_import_graph.py
fails otherwise).
"""

from . import (  # noqa: F401
    ddim,
    errors,
    fastcomposer,
    lora_format,
    moa,
    moa_files,
    moa_router,
    mole,
    mole_files,
    recording,
    safetensors_io,
    subject_images,
    subjects,
    unet_names,
)
from .errors import WeightFileError

__all__ = ["WeightFileError"]

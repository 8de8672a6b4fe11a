"""Framework-free math and file formats for MoLE and MoA.

Only torch, einops and safetensors are imported here: never ComfyUI. The pack's
``nodes/`` adapt these pieces to ComfyUI's ModelPatcher; ``training/`` reuses them.
"""

from .errors import WeightFileError

__all__ = ["WeightFileError"]

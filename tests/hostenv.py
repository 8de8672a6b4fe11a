"""The tests' name for comfyui_host (the repository's one way of finding and importing the
ComfyUI host and this pack), kept so that tests, benchmarks and tools import `hostenv`."""

import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.append(_REPO)  # last: ComfyUI's own `nodes` module must never be shadowed by the pack's nodes/

from comfyui_host import PACK_MODULE, REPO, find_host, import_host, import_pack  # noqa: E402

__all__ = ["PACK_MODULE", "REPO", "find_host", "import_host", "import_pack"]

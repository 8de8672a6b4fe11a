"""Finding and importing the ComfyUI host and this pack: the one way the training scripts, the
tests, the benchmarks and the tools do it (tests/hostenv.py re-exports it for the tests).

The host is found, in order, through COMFYUI_PATH, the ComfyUI whose custom_nodes/ holds this
pack, or ~/comfy/ComfyUI. Nothing here is a stand-in for ComfyUI: it only puts the real one first
on sys.path and loads the pack as ComfyUI would, as a package. Not imported by the pack itself
(ComfyUI loads the pack's __init__.py, which never needs it).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
PACK_MODULE = "comfyui_mole_moa"


def find_host() -> tuple[Path | None, str]:
    """(host path, reason): the path of a usable ComfyUI checkout, or None and why not."""
    tried = []
    env = os.environ.get("COMFYUI_PATH")
    if env:
        tried.append(("COMFYUI_PATH", Path(env)))
    if REPO.parent.name == "custom_nodes":
        tried.append(("the ComfyUI holding this pack", REPO.parent.parent))
    tried.append(("the default", Path.home() / "comfy" / "ComfyUI"))
    for _, path in tried:
        if (path / "comfy" / "model_patcher.py").is_file() and (path / "nodes.py").is_file():
            return path.resolve(), ""
    looked = "; ".join(f"{why}: {path}" for why, path in tried)
    return None, f"no ComfyUI host found (looked at {looked}). Install it as the README says, or set COMFYUI_PATH."


def import_host() -> Path:
    """Put the host first on sys.path (its top-level `nodes` module must win over this pack's
    `nodes/` package, which running from the repository root puts on the path) and initialise
    what ComfyUI's main.py would before nodes are used (no argv parsing; --cpu without CUDA)."""
    host, reason = find_host()
    if host is None:
        raise RuntimeError(reason)
    shadow = sys.modules.get("nodes")
    if shadow is not None and Path(getattr(shadow, "__file__", "") or "").resolve().parent == REPO / "nodes":
        raise RuntimeError("this repository's nodes/ package was imported as the top-level 'nodes' module; "
                           "import the host first (comfyui_host.import_host())")
    if str(host) in sys.path:
        sys.path.remove(str(host))
    sys.path.insert(0, str(host))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import torch
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True  # as `main.py --cpu`: this machine has no accelerator
    import comfy.model_management  # noqa: F401  (selects the device)
    return host


def import_pack():
    """Import this repository as the package ComfyUI would load from custom_nodes/."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    import_host()
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module

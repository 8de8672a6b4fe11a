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


HOST_RECORD = REPO / ".comfyui_host"  # written by scripts/run_comfyui.sh when it links the pack


def holding_hosts() -> list[Path]:
    """ComfyUI folders whose custom_nodes/ holds this pack: the checkout itself lying in
    custom_nodes/ (git clone there), the folder it was entered through ($PWD, when that is
    custom_nodes/<link> to this checkout), and the ComfyUI scripts/run_comfyui.sh linked it into."""
    found = []
    if REPO.parent.name == "custom_nodes":
        found.append(REPO.parent.parent)
    logical = Path(os.environ.get("PWD", "."))
    for folder in (logical, *logical.parents):
        if folder.parent.name == "custom_nodes" and folder.resolve() == REPO:
            found.append(folder.parent.parent)
            break
    try:
        recorded = Path(HOST_RECORD.read_text().strip())
    except OSError:
        recorded = None
    if recorded is not None and any(entry.resolve() == REPO for entry in (recorded / "custom_nodes").glob("*")):
        found.append(recorded)
    return found


def find_host() -> tuple[Path | None, str]:
    """(host path, reason): the path of a usable ComfyUI checkout, or None and why not."""
    tried = []
    env = os.environ.get("COMFYUI_PATH")
    if env:
        tried.append(("COMFYUI_PATH", Path(env)))
    for holder in holding_hosts():
        tried.append(("the ComfyUI holding this pack", holder))
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
        raise RuntimeError(
            "this repository's nodes/ package was imported as the top-level 'nodes' module; "
            "import the host first (comfyui_host.import_host())"
        )
    if str(host) in sys.path:
        sys.path.remove(str(host))
    sys.path.insert(0, str(host))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import torch
    from comfy.cli_args import args

    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        args.cpu = True  # as `main.py --cpu`: this machine has no accelerator
    import comfy.model_management  # noqa: F401  (selects the device)

    return host


def import_pack():
    """Import this repository as the package ComfyUI would load from custom_nodes/."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    import_host()
    # Loaded by ComfyUI from custom_nodes/ already: the same modules. Only ComfyUI's own record
    # counts: pytest also imports the repository's __init__.py as a package named after the folder.
    loaded_dirs = getattr(sys.modules.get("nodes"), "LOADED_MODULE_DIRS", {})
    for folder in loaded_dirs.values():
        module = sys.modules.get(folder.replace(".", "_x_"))  # the name nodes.load_custom_node gives a folder
        if module is not None and Path(folder).resolve() == REPO:
            return module
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module

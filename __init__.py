"""ComfyUI-MoLE-MoA: MoLE (Mixture of Low-rank Experts) and MoA (Mixture-of-Attention) nodes.

ComfyUI loads this package from custom_nodes/ and calls comfy_entrypoint (V3 node API).
The math lives in mixture_core/ (no ComfyUI imports); nodes/ adapts it to ComfyUI. Host
imports happen inside comfy_entrypoint, so importing the package alone (as test runners
do) needs no ComfyUI.
"""


def _one_core() -> None:
    """The core is one set of module objects per process: training, tests and benchmarks import it
    as the top-level package ``mixture_core`` (the repository root on their sys.path); where that
    package is importable, this package's ``mixture_core`` (the nodes' relative imports) is made the
    very same modules, so an object the training scripts make is an instance of the class the nodes
    check against. Inside ComfyUI the root is not on sys.path and the pack's own copy is the only one."""
    import sys
    from pathlib import Path

    if "__path__" not in globals():  # imported as a plain module (pytest does so with a rootdir's __init__.py)
        return
    try:
        import mixture_core  # imports all of its modules (mixture_core/__init__.py)
    except ImportError:
        return
    folder = Path(__file__).resolve().parent / "mixture_core"
    if Path(mixture_core.__file__).resolve().parent != folder:
        raise ImportError(f"another mixture_core ({mixture_core.__file__}) is imported; this pack's is {folder}")
    for name, module in list(sys.modules.items()):
        if name == "mixture_core" or name.startswith("mixture_core."):
            sys.modules[f"{__name__}.{name}"] = module
    globals()["mixture_core"] = mixture_core


_one_core()

# The editor-side part (web/fit_labels.js): nodes wide enough that no widget label is cut.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import MixtureExpertsExtension

    return MixtureExpertsExtension()

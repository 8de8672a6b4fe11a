"""ComfyUI-MoLE-MoA: MoLE (Mixture of Low-rank Experts) and MoA (Mixture-of-Attention) nodes.

ComfyUI loads this package from custom_nodes/ and calls comfy_entrypoint (V3 node API).
The math lives in mixture_core/ (no ComfyUI imports); nodes/ adapts it to ComfyUI. Host
imports happen inside comfy_entrypoint, so importing the package alone (as test runners
do) needs no ComfyUI.
"""


def _one_core() -> None:
    """The core is one set of module objects per process, named ``mixture_core``: training, tests
    and benchmarks import it by that name (the repository root on their sys.path), and this package's
    ``mixture_core`` (the nodes' relative imports) is made the very same modules, so an object the
    training scripts make is an instance of the class the nodes check against. Inside ComfyUI, whose
    sys.path does not hold this folder, the core is loaded from here under that name."""
    import importlib
    import importlib.util
    import pkgutil
    import sys
    from pathlib import Path

    if "__path__" not in globals():  # imported as a plain module (pytest does so with a rootdir's __init__.py)
        return
    folder = Path(__file__).resolve().parent / "mixture_core"
    core = sys.modules.get("mixture_core")
    if core is None:
        spec = importlib.util.spec_from_file_location(
            "mixture_core", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        core = importlib.util.module_from_spec(spec)
        sys.modules["mixture_core"] = core
        try:
            spec.loader.exec_module(core)
        except BaseException:
            del sys.modules["mixture_core"]
            raise
    elif Path(core.__file__).resolve().parent != folder:
        raise ImportError(f"another mixture_core ({core.__file__}) is already imported; this pack's is {folder}")
    modules = [core] + [importlib.import_module(m.name) for m in pkgutil.walk_packages(core.__path__, "mixture_core.")]
    for module in modules:
        sys.modules[f"{__name__}.{module.__name__}"] = module
    globals()["mixture_core"] = core


_one_core()

# The editor-side part (web/fit_labels.js): nodes wide enough that no widget label is cut.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import MixtureExpertsExtension

    return MixtureExpertsExtension()

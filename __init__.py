"""ComfyUI-MoLE-MoA: MoLE (Mixture of Low-rank Experts) and MoA (Mixture-of-Attention) nodes.

ComfyUI loads this package from custom_nodes/ and calls comfy_entrypoint (V3 node API).
The math lives in mixture_core/ (no ComfyUI imports); nodes/ adapts it to ComfyUI. Host
imports happen inside comfy_entrypoint, so importing the package alone (as test runners
do) needs no ComfyUI.
"""

# The editor-side part (web/fit_labels.js): nodes wide enough that no widget label is cut.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import MixtureExpertsExtension

    return MixtureExpertsExtension()

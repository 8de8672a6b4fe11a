"""The pack's ComfyUI extension: the node list ComfyUI registers."""

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from . import ddim_nodes, moa_nodes, mole_nodes, visualize_nodes


class MixtureExpertsExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*mole_nodes.NODES, *moa_nodes.NODES, *ddim_nodes.NODES, *visualize_nodes.NODES]

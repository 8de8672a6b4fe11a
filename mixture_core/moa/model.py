"""A MoA model: every MoA layer of a UNet, keyed by layer id, and the fusion."""

from __future__ import annotations

import torch
from torch import nn

from .binding import SubjectIndex, bind_indexed
from .config import (
    DEFAULT_ROUTER,
    FUSION_HIDDEN,
    FUSION_KINDS,
    IMAGE_DIM,
    ROUTER_HIDDEN,
    SPACETIME_DIM,
    TEXT_DIM,
    AttentionShape,
    RouterConfig,
    is_moa_target,
)
from .fusion import FastComposerFusion, MultimodalFusion, SpacetimeEncoding
from .layer import MoALayer


class MoAModel(nn.Module):
    """All MoA layers of a UNet, keyed by the attention module's path (SAI naming, such as
    ``input_blocks.1.1.transformer_blocks.0.attn1``), and the multimodal fusion. A layer's
    index for the spacetime encoding is its position in the layer list."""

    def __init__(
        self,
        shapes: dict[str, AttentionShape],
        router_hidden: int = ROUTER_HIDDEN,
        fusion_hidden: int = FUSION_HIDDEN,
        spacetime_dim: int = SPACETIME_DIM,
        text_dim: int = TEXT_DIM,
        image_dim: int = IMAGE_DIM,
        fusion: str = "moa",
        router: RouterConfig = DEFAULT_ROUTER,
        image_preprocess: str = "clip",
    ):
        super().__init__()
        if not shapes:
            raise ValueError("a MoA model needs at least one layer")
        if fusion not in FUSION_KINDS:
            raise ValueError(f"fusion kind {fusion!r} is not one of {FUSION_KINDS}")
        unknown = sorted(set(router.map_layers) - set(shapes))
        if unknown:
            raise ValueError(f"the router reads maps of layers the model does not have: {unknown[:3]}")
        self.layer_ids = list(shapes)
        self._index = {layer_id: i for i, layer_id in enumerate(self.layer_ids)}
        self.router_config, self.fusion_kind, self.image_preprocess = router, fusion, image_preprocess
        self.router_hidden = router_hidden if router.kind == "learned" else 0
        # A list rather than a ModuleDict: module names cannot hold the dots of the layer ids.
        self.layers = nn.ModuleList(MoALayer(shape, self.router_hidden) for shape in shapes.values())
        if fusion == "moa":
            self.fusion = MultimodalFusion(text_dim, image_dim, fusion_hidden, spacetime_dim, len(shapes))
        else:
            self.fusion = FastComposerFusion(text_dim, image_dim, fusion_hidden)
        self.base_family: str | None = None  # set by load_moa_file
        self.metadata: dict[str, str] = {}

    @property
    def spacetime(self) -> SpacetimeEncoding | None:
        return getattr(self.fusion, "spacetime", None)

    def layer_index(self, layer_id: str) -> int:
        try:
            return self._index[layer_id]
        except KeyError:
            raise KeyError(f"no MoA layer {layer_id!r} (this model has {len(self.layer_ids)} layers)") from None

    def __getitem__(self, layer_id: str) -> MoALayer:
        return self.layers[self.layer_index(layer_id)]

    def bind(
        self, context: torch.Tensor, index: SubjectIndex, timestep: torch.Tensor | float, layer_index: int
    ) -> torch.Tensor:
        """The personalized branch's context of one layer call: bind_indexed with this model's fusion."""
        return bind_indexed(context, index, self.fusion, timestep, layer_index)

    def shapes(self) -> dict[str, AttentionShape]:
        return {layer_id: layer.shape for layer_id, layer in zip(self.layer_ids, self.layers)}

    @classmethod
    def from_prior(cls, prior: dict[str, dict], **hyper) -> MoAModel:
        """A model whose personalized attentions start as copies of the prior's, for training.
        prior: {layer_id: {"to_q": W, "to_k": W, "to_v": W, "to_out": (W, b), "heads": int}}, as
        prior_weights(unet) reads them."""
        shapes = {}
        for layer_id, p in prior.items():
            try:
                shapes[layer_id] = AttentionShape.from_weights(p["to_q"], p["to_k"], int(p["heads"]))
            except ValueError as e:
                raise ValueError(f"{layer_id}: {e}") from None
        model = cls(shapes, **hyper).to(next(iter(prior.values()))["to_q"].dtype)
        with torch.no_grad():
            for layer_id, p in prior.items():
                params = dict(model[layer_id].named_parameters())
                values = {
                    "to_q.weight": p["to_q"],
                    "to_k.weight": p["to_k"],
                    "to_v.weight": p["to_v"],
                    "to_out.weight": p["to_out"][0],
                    "to_out.bias": p["to_out"][1],
                }
                for name, value in values.items():
                    if params[name].shape != value.shape:
                        raise ValueError(
                            f"{layer_id}: prior {name} has shape {tuple(value.shape)}, expected {tuple(params[name].shape)}"
                        )
                    params[name].copy_(value)
        return model


def prior_weights(unet: nn.Module) -> dict[str, dict]:
    """A UNet's own attention weights (every MoA target module, keyed by its path in SAI naming)
    in the form MoAModel.from_prior takes, float32 on the CPU."""
    prior = {}
    for path, m in unet.named_modules():
        if is_moa_target(path) and hasattr(m, "to_q"):
            out = m.to_out[0]
            prior[path] = {
                "to_q": m.to_q.weight.detach().float().cpu(),
                "to_k": m.to_k.weight.detach().float().cpu(),
                "to_v": m.to_v.weight.detach().float().cpu(),
                "to_out": (out.weight.detach().float().cpu(), out.bias.detach().float().cpu()),
                "heads": m.heads,
            }
    return prior

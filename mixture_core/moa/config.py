"""MoA's sizes, target layers, attention shapes and router/fusion kinds: the settings every part reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# The attention modules that become MoA layers (attn1 and attn2 of every transformer block), from the
# one map of UNet layer names.
from ..unet_names import MOA_TARGET, is_moa_target  # noqa: F401  (re-exported)

TEXT_DIM = IMAGE_DIM = 768  # CLIP ViT-L/14 text width and projected image embedding on SD1.5
ROUTER_HIDDEN = 128
FUSION_HIDDEN = 1024
SPACETIME_DIM = 256
PRIOR_LOGIT = 4.0  # fresh router: R1 = 1 / (1 + e^4), about 0.018
ROUTER_INIT_SCALE = 0.1  # shrinks the router's last weights so PRIOR_LOGIT dominates at init
MAX_PERIOD = 10000  # the UNet's timestep sinusoid


Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
# Receives the prior's weight R0' = 1 - strength * R1 per token (B, T) of one layer call, for
# pictures of the routers at work (as mole.Observer for MoLE's gates).
RouterObserver = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class AttentionShape:
    dim: int  # query (hidden state) width, also the output width
    context_dim: int  # key/value input width: dim for attn1, the text width for attn2
    heads: int
    dim_head: int

    @property
    def inner(self) -> int:
        return self.heads * self.dim_head

    @classmethod
    def from_weights(cls, to_q: torch.Tensor, to_k: torch.Tensor, heads: int) -> AttentionShape:
        """The shape of an attention with these (out, in) projection weights."""
        if to_q.ndim != 2 or to_k.ndim != 2:
            raise ValueError(
                f"projection weights must be (out, in) matrices, not {tuple(to_q.shape)} and {tuple(to_k.shape)}"
            )
        inner, dim = to_q.shape
        if to_k.shape[0] != inner:
            raise ValueError(f"to_q has {inner} output features but to_k {to_k.shape[0]}")
        if heads <= 0 or inner % heads:
            raise ValueError(f"an inner width of {inner} does not split into {heads} heads")
        return cls(dim, to_k.shape[1], heads, inner // heads)


ROUTER_KINDS = ("learned", "constant", "attention")
FUSION_KINDS = ("moa", "fastcomposer")


@dataclass(frozen=True)
class RouterConfig:
    """How a MoA model splits each pixel between the prior and the personalized attention.

    learned: each layer's router MLP. constant: personal share `share` everywhere.
    attention: training-free (mixture_core.moa_router): per pixel, max over subjects of
    clamp(A_s / quantile(A_s), 0, 1), A_s the subject token's personalized cross-attention map
    averaged over heads and over `map_layers` at the previous step. The first `prior_steps`
    of sampling (a fraction of the schedule, as start_percent) run the prior alone."""

    kind: str = "learned"
    share: float = 1.0
    quantile: float = 0.98
    prior_steps: float = 0.0
    map_layers: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"router kind {self.kind!r} is not one of {ROUTER_KINDS}")
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"the constant router's share must be in [0, 1], not {self.share}")
        if not 0.0 < self.quantile <= 1.0:
            raise ValueError(f"the attention router's quantile must be in (0, 1], not {self.quantile}")
        if not 0.0 <= self.prior_steps <= 1.0:
            raise ValueError(f"prior_steps must be in [0, 1], not {self.prior_steps}")
        if self.kind == "attention" and not self.map_layers:
            raise ValueError("the attention router needs the cross-attention layers whose maps it reads (map_layers)")


DEFAULT_ROUTER = RouterConfig()  # a learned router per layer

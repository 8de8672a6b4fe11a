"""One MoA layer: the personalized attention and its router, mixed with the prior's output."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import PRIOR_LOGIT, ROUTER_HIDDEN, ROUTER_INIT_SCALE, Attention, AttentionShape, RouterObserver
from .ops import MLP, cast_like, linear, scaled_dot_product_attention


class MoALayer(nn.Module):
    """The personalized attention and the router of one attention layer. router_hidden 0: no
    learned router (the personal share is given to forward by a constant or attention router)."""

    def __init__(self, shape: AttentionShape, router_hidden: int = ROUTER_HIDDEN):
        super().__init__()
        self.shape, self.heads = shape, shape.heads
        self.to_q = nn.Linear(shape.dim, shape.inner, bias=False)
        self.to_k = nn.Linear(shape.context_dim, shape.inner, bias=False)
        self.to_v = nn.Linear(shape.context_dim, shape.inner, bias=False)
        self.to_out = nn.Linear(shape.inner, shape.dim)
        self.router = MLP(shape.dim, router_hidden, 2, F.silu) if router_hidden > 0 else None
        if self.router is not None:
            with torch.no_grad():
                self.router.fc2.weight.mul_(ROUTER_INIT_SCALE)
                self.router.fc2.bias.copy_(torch.tensor([PRIOR_LOGIT, 0.0]))

    def route(self, h: torch.Tensor) -> torch.Tensor:
        """Per-pixel weights (prior, personal), (B, T, 2), summing to 1."""
        if self.router is None:
            raise ValueError("this MoA layer has no learned router (its file's router is constant or attention)")
        return torch.softmax(self.router(h), dim=-1)

    def subject_attention(
        self, h: torch.Tensor, context: torch.Tensor, token_index: torch.Tensor | Sequence[int]
    ) -> torch.Tensor:
        """The personalized cross-attention probabilities of the given context tokens, averaged
        over heads: (B, T, n). token_index: (n,) positions shared by every row, or (B, n) per row
        (training's padded subjects: pad slots read any token, the caller masks them). Computed in
        at least float32 with autocast off, so that training's localization loss and inference's
        attention router read the same numbers. A tensor index made once per model call keeps this
        free of host copies."""
        dtype = torch.promote_types(h.dtype, torch.float32)
        with torch.autocast(h.device.type, enabled=False):
            h32 = h.to(dtype)
            q, k = linear(h32, self.to_q), linear(cast_like(context, h32), self.to_k)
            q, k = (rearrange(t, "b t (h d) -> b h t d", h=self.heads) for t in (q, k))
            probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1).mean(1)  # (B, T, S)
        index = torch.as_tensor(token_index, dtype=torch.long).to(probs.device, non_blocking=True)
        if index.ndim == 1:
            return probs.index_select(-1, index)
        if index.shape[0] != probs.shape[0]:
            raise ValueError(f"token_index has {index.shape[0]} rows for a batch of {probs.shape[0]}")
        return probs.gather(2, index[:, None, :].expand(-1, probs.shape[1], -1))

    def personal(
        self, h: torch.Tensor, context: torch.Tensor | None = None, attention: Attention | None = None
    ) -> torch.Tensor:
        """The personalized attention's output, (B, T, dim); context None means self-attention."""
        context = h if context is None else cast_like(context, h)
        q, k, v = linear(h, self.to_q), linear(context, self.to_k), linear(context, self.to_v)
        return linear((attention or scaled_dot_product_attention)(q, k, v, self.heads), self.to_out)

    def forward(
        self,
        h: torch.Tensor,
        prior_out: torch.Tensor,
        context: torch.Tensor | None = None,
        strength: float = 1.0,
        attention: Attention | None = None,
        observer: RouterObserver | None = None,
        share: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """R0' * prior_out + R1' * personal(h, context), in prior_out's dtype. observer, if given,
        receives this call's prior weight R0' = 1 - strength * R1 per token, (B, T) (with its
        gradient: training's router loss reads it). share: the personal share R1 per pixel
        ((B, T, 1) or a number) from a router that is not learned; None: this layer's learned
        router. attention: the kernel of the personalized attention (the host's, at inference)."""
        if strength < 0:
            raise ValueError(f"MoA strength must be >= 0, not {strength}")
        if strength == 0:
            return prior_out  # the router forced to the prior: nothing to compute
        if share is None:
            share = cast_like(self.route(h)[..., 1:], prior_out)  # softmax may come back float32 under autocast
        elif isinstance(share, torch.Tensor):
            share = cast_like(share, prior_out)
        else:  # a number: the same share at every pixel, as a (B, T, 1) map like a router's
            share = prior_out.new_full((*prior_out.shape[:-1], 1), float(share))
        personal_weight = strength * share
        if observer is not None:
            observer(1.0 - personal_weight[..., 0])
        # R0' * prior + R1' * personal with R0' = 1 - R1', written as one lerp.
        return prior_out + personal_weight * (self.personal(h, context, attention) - prior_out)

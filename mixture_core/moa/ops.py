"""Weight-casting building blocks: every MoA weight is cast to the input's device and dtype per call,
so offloaded weights and other compute dtypes work (a no-op when they already match)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def cast_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # A no-op when already on the input's device in its dtype; otherwise the per-call copy
    # that ComfyUI's own casts make for offloaded weights or another compute dtype.
    return t.to(device=like.device, dtype=like.dtype, non_blocking=True)


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    bias = None if layer.bias is None else cast_like(layer.bias, x)
    return F.linear(x, cast_like(layer.weight, x), bias)


class MLP(nn.Module):
    """Linear -> activation -> Linear, with weights cast to the input per call."""

    def __init__(self, d_in: int, hidden: int, d_out: int, activation: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.activation(linear(x, self.fc1)), self.fc2)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, cast_like(norm.weight, x), cast_like(norm.bias, x), norm.eps)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention on (B, T, heads*d) tensors, the calling convention of ComfyUI's
    optimized_attention so that the host's kernel can be passed in its place."""
    split = lambda t: rearrange(t, "b t (h d) -> b h t d", h=heads)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return rearrange(out, "b h t d -> b t (h d)")

"""The multimodal fusion of a subject token with the subject's image embedding: MoA's learned one
(with a timestep/layer encoding) and FastComposer's postfuse."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import FUSION_HIDDEN, IMAGE_DIM, MAX_PERIOD, SPACETIME_DIM, TEXT_DIM
from .ops import MLP, cast_like, layer_norm, linear


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """The UNet's timestep embedding (cos, then sin) of timesteps on the 0..999 scale;
    computed in at least float32 because fp16 cannot resolve t near 999."""
    dtype = torch.promote_types(timestep.dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=dtype, device=timestep.device) / half)
    args = timestep.to(dtype)[:, None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class SpacetimeEncoding(nn.Module):
    """(timestep, layer index) -> a dim vector: the subject token may change with both."""

    def __init__(self, n_layers: int, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"the spacetime width must be even (cos and sin halves), not {dim}")
        self.n_layers, self.dim = n_layers, dim
        self.layer_embedding = nn.Embedding(n_layers, dim)
        self.mlp = MLP(2 * dim, dim, dim, F.silu)

    def forward(self, timestep: torch.Tensor, layer_index: int) -> torch.Tensor:
        """(N,) timesteps of one layer -> (N, dim), in at least float32."""
        if not 0 <= layer_index < self.n_layers:
            raise IndexError(f"layer index {layer_index} is outside 0..{self.n_layers - 1}")
        time = timestep_sinusoid(timestep, self.dim)
        layer = cast_like(self.layer_embedding.weight[layer_index], time).expand(len(time), -1)
        return self.mlp(torch.cat([time, layer], dim=-1))


class MultimodalFusion(nn.Module):
    """fused = text + MLP([text, image, spacetime(t, layer)]); the last layer starts at zero
    so an untrained fusion leaves the text embedding exactly as it is."""

    def __init__(
        self,
        text_dim: int = TEXT_DIM,
        image_dim: int = IMAGE_DIM,
        hidden_dim: int = FUSION_HIDDEN,
        spacetime_dim: int = SPACETIME_DIM,
        n_layers: int = 32,
    ):
        super().__init__()
        self.text_dim, self.image_dim, self.hidden_dim = text_dim, image_dim, hidden_dim
        self.spacetime = SpacetimeEncoding(n_layers, spacetime_dim)
        self.mlp = MLP(text_dim + image_dim + spacetime_dim, hidden_dim, text_dim, F.gelu)
        nn.init.zeros_(self.mlp.fc2.weight)
        nn.init.zeros_(self.mlp.fc2.bias)

    def forward(
        self, text: torch.Tensor, image: torch.Tensor, timestep: torch.Tensor, layer_index: int
    ) -> torch.Tensor:
        """(N, text_dim) tokens, (N, image_dim) image embeddings, (N,) timesteps -> (N, text_dim)."""
        spacetime = cast_like(self.spacetime(timestep.to(text.device), layer_index), text)
        return text + self.mlp(torch.cat([text, cast_like(image, text), spacetime], dim=-1))


class FastComposerMLP(nn.Module):
    """FastComposer's MLP (fastcomposer/model.py, class MLP): LayerNorm -> Linear -> GELU ->
    Linear, plus the input when use_residual. Same parameter names, so its weights load as they are."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, use_residual: bool):
        super().__init__()
        if use_residual and in_dim != out_dim:
            raise ValueError(f"a residual MLP needs equal input and output widths, not {in_dim} and {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1, self.fc2 = nn.Linear(in_dim, hidden_dim), nn.Linear(hidden_dim, out_dim)
        self.use_residual = use_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(F.gelu(linear(layer_norm(x, self.layernorm), self.fc1)), self.fc2)
        return y + x if self.use_residual else y


class FastComposerFusion(nn.Module):
    """FastComposer's postfuse (FastComposerPostfuseModule.fuse_fn): the fused token is
    layer_norm(mlp2(mlp1([text, image]) + text)); it replaces the subject token (no timestep or
    layer input: the same token in every layer and step)."""

    def __init__(self, text_dim: int = TEXT_DIM, image_dim: int = IMAGE_DIM, hidden_dim: int = TEXT_DIM):
        super().__init__()
        self.text_dim, self.image_dim, self.hidden_dim = text_dim, image_dim, hidden_dim
        self.mlp1 = FastComposerMLP(text_dim + image_dim, text_dim, hidden_dim, use_residual=False)
        self.mlp2 = FastComposerMLP(text_dim, text_dim, hidden_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(text_dim)

    def forward(self, text: torch.Tensor, image: torch.Tensor, timestep=None, layer_index=None) -> torch.Tensor:
        """(N, text_dim) tokens, (N, image_dim) image embeddings -> (N, text_dim); timestep and
        layer_index are accepted (bind_subjects passes them) and not used."""
        fused = self.mlp1(torch.cat([text, cast_like(image, text)], dim=-1)) + text
        return layer_norm(self.mlp2(fused), self.layer_norm)

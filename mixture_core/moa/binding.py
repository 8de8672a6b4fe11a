"""Subjects bound into the context: the fused subject token at its prompt position, and the
norm-keeping interpolations of embeddings (morphing, time lapse)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .fusion import MultimodalFusion
from .ops import cast_like


@dataclass
class SubjectBinding:
    """One subject bound to one prompt token."""

    token_index: int  # position in the (77-token) context
    image_embedding: torch.Tensor  # (image_dim,)
    weight: float = 1.0  # 0: the plain text token, 1: fully fused, lerp in between


def _per_row(timestep: torch.Tensor | float, rows: int) -> torch.Tensor:
    timestep = torch.as_tensor(timestep).reshape(-1)
    if timestep.numel() == 1:
        return timestep.expand(rows)
    if timestep.numel() != rows:
        raise ValueError(f"{timestep.numel()} timesteps for a batch of {rows}")
    return timestep


def bind_subjects(
    context: torch.Tensor,
    bindings: Sequence[SubjectBinding],
    fusion: MultimodalFusion,
    timestep: torch.Tensor | float,
    layer_index: int,
) -> torch.Tensor:
    """A copy of context (B, S, C) whose bound token rows hold the fused subject tokens;
    every other row is bit-identical. Returns context itself when no binding has weight."""
    tokens = [b.token_index for b in bindings]
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"two subjects are bound to the same token ({tokens}); each subject goes into its own token")
    for b in bindings:
        if not 0 <= b.token_index < context.shape[1]:
            raise ValueError(f"token index {b.token_index} is outside the {context.shape[1]}-token context")
        if tuple(b.image_embedding.shape) != (fusion.image_dim,):
            raise ValueError(
                f"a subject image embedding has shape {tuple(b.image_embedding.shape)}, expected ({fusion.image_dim},)"
            )
        if b.weight < 0:
            raise ValueError(f"subject weight must be >= 0, not {b.weight}")
    active = [b for b in bindings if b.weight != 0]
    if not active:
        return context
    rows, n = context.shape[0], len(active)
    index = torch.tensor([b.token_index for b in active], device=context.device)
    text = context[:, index]  # (B, n, C): a copy (advanced indexing)
    images = torch.stack([cast_like(b.image_embedding, context) for b in active]).expand(rows, n, -1)
    times = _per_row(timestep, rows).to(context.device).repeat_interleave(n)
    # All subjects and rows through the fusion in one call.
    fused = fusion(text.flatten(0, 1), images.flatten(0, 1), times, layer_index).unflatten(0, (rows, n))
    weights = torch.tensor([b.weight for b in active], dtype=context.dtype, device=context.device)[:, None]
    out = context.clone()
    out[:, index] = torch.lerp(text, fused, weights)
    return out


def bind_subjects_where(
    context: torch.Tensor,
    is_cond: torch.Tensor,
    bindings: Sequence[SubjectBinding],
    fusion: MultimodalFusion,
    timestep: torch.Tensor | float,
    layer_index: int,
) -> torch.Tensor:
    """bind_subjects on the rows where is_cond (B,) is true; unconditional rows keep their
    plain (null-text) context, bit-identical."""
    is_cond = is_cond.to(device=context.device, dtype=torch.bool)
    times = _per_row(timestep, context.shape[0]).to(context.device)
    out = context.clone()
    out[is_cond] = bind_subjects(context[is_cond], bindings, fusion, times[is_cond], layer_index)
    return out


def _lerp_keep_norm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """lerp(a, b) rescaled to lerp(|a|, |b|) along the last dim: a plain lerp of two
    non-parallel vectors shrinks mid-way (a chord), and the encoders' outputs carry meaning
    in their norm. The endpoints are returned exactly."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"interpolation alpha must be in [0, 1], not {alpha}")
    if alpha == 0.0:
        return a.clone()
    if alpha == 1.0:
        return b.clone()
    mixed = torch.lerp(a, b, alpha)
    norm = torch.lerp(a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True), alpha)
    return mixed * (norm / mixed.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(mixed.dtype).tiny))


def morph_embeddings(emb_a: torch.Tensor, emb_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Subject morphing: an image embedding alpha of the way from subject a to subject b,
    with the norm interpolated too (see _lerp_keep_norm)."""
    return _lerp_keep_norm(emb_a, emb_b, alpha)


def timelapse_tokens(tok_a: torch.Tensor, tok_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Time lapse: a token embedding alpha of the way between two words' ("person" -> "kid"),
    norm-preserving like morph_embeddings."""
    return _lerp_keep_norm(tok_a, tok_b, alpha)

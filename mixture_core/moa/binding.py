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


def check_bindings(bindings: Sequence[SubjectBinding], image_dim: int) -> None:
    """ValueError for two subjects on one token, a wrong embedding shape or a negative weight."""
    tokens = [b.token_index for b in bindings]
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"two subjects are bound to the same token ({tokens}); each subject goes into its own token")
    for b in bindings:
        if b.token_index < 0:
            raise ValueError(f"token index {b.token_index} is negative")
        if tuple(b.image_embedding.shape) != (image_dim,):
            raise ValueError(
                f"a subject image embedding has shape {tuple(b.image_embedding.shape)}, expected ({image_dim},)"
            )
        if b.weight < 0:
            raise ValueError(f"subject weight must be >= 0, not {b.weight}")


@dataclass(frozen=True)
class SubjectIndex:
    """Where subjects bind in a batch, as index tensors made once per model call from what the
    host knows, so that every layer call binds with a gather and an index_put: no host read, no
    shape that depends on tensor values (issue 22: no host-device sync per layer call).

    Entry i puts embeds[i] fused with the text token context[rows[i], tokens[i]]. rows, tokens:
    (N,) long on the model's device; embeds (N, image_dim); weights (N,) or None (all 1: the fused
    token replaces the text token, as in training). batch and max_token are host ints, checked
    against the context without reading it.

    Inference (every subject into the rows of the marked conditioning)::

        index = SubjectIndex.for_rows(bindings, rows=[1, 3], batch=4, device=x.device, image_dim=768)

    Training (a padded batch: sample b's subject j at token_index[b, j] where valid[b, j])::

        index = SubjectIndex.from_padded(token_index, valid, embeds)  # token_index, valid on the CPU
    """

    rows: torch.Tensor
    tokens: torch.Tensor
    embeds: torch.Tensor
    weights: torch.Tensor | None
    batch: int
    max_token: int = -1

    @property
    def empty(self) -> bool:
        return self.rows.shape[0] == 0  # a shape: known on the host

    @classmethod
    def for_rows(
        cls, bindings: Sequence[SubjectBinding], rows: Sequence[int], batch: int, device, image_dim: int
    ) -> SubjectIndex:
        """Every binding with a weight into each of `rows` (row-major: row, then subject)."""
        check_bindings(bindings, image_dim)
        active = [b for b in bindings if b.weight != 0]
        rows = [int(r) for r in rows]
        if any(not 0 <= r < batch for r in rows):
            raise ValueError(f"rows {rows} are outside a batch of {batch}")
        pairs = [(r, b) for r in rows for b in active]
        if not pairs:
            return cls._empty(batch, device, image_dim)
        embeds = torch.stack([b.image_embedding for b in active]).to(device, non_blocking=True)
        weights = None
        if any(b.weight != 1 for b in active):
            weights = torch.tensor([b.weight for _, b in pairs], dtype=torch.float32).to(device, non_blocking=True)
        return cls(
            rows=torch.tensor([r for r, _ in pairs], dtype=torch.long).to(device, non_blocking=True),
            tokens=torch.tensor([b.token_index for _, b in pairs], dtype=torch.long).to(device, non_blocking=True),
            embeds=embeds.repeat(len(rows), 1),
            weights=weights,
            batch=batch,
            max_token=max(b.token_index for b in bindings),
        )

    @classmethod
    def from_padded(
        cls,
        token_index: torch.Tensor,
        valid: torch.Tensor,
        embeds: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> SubjectIndex:
        """Training's padded form: token_index (B, n) long, valid (B, n) bool, embeds (B, n, D)
        (gradients flow through it), weights (B, n) or None. token_index and valid are read on
        the host: pass them as built, on the CPU (a device tensor costs one sync here, once per
        model call). The index tensors go to embeds' device."""
        if token_index.shape != valid.shape or tuple(embeds.shape[:2]) != tuple(valid.shape):
            raise ValueError(
                f"token_index {tuple(token_index.shape)}, valid {tuple(valid.shape)} and embeds "
                f"{tuple(embeds.shape)} must share their (batch, subjects) shape"
            )
        flags, positions = valid.tolist(), token_index.tolist()
        pairs = [(b, j) for b, row in enumerate(flags) for j, ok in enumerate(row) if ok]
        device = embeds.device
        if not pairs:
            return cls._empty(len(flags), device, embeds.shape[-1])
        tokens = [positions[b][j] for b, j in pairs]
        if min(tokens) < 0:
            raise ValueError(f"a valid subject has a negative token index ({min(tokens)})")
        rows = torch.tensor([b for b, _ in pairs], dtype=torch.long).to(device, non_blocking=True)
        cols = torch.tensor([j for _, j in pairs], dtype=torch.long).to(device, non_blocking=True)
        return cls(
            rows=rows,
            tokens=torch.tensor(tokens, dtype=torch.long).to(device, non_blocking=True),
            embeds=embeds[rows, cols],
            weights=None if weights is None else weights.to(device)[rows, cols],
            batch=len(flags),
            max_token=max(tokens),
        )

    @classmethod
    def _empty(cls, batch: int, device, image_dim: int) -> SubjectIndex:
        none = torch.zeros(0, dtype=torch.long, device=device)
        return cls(none, none, torch.zeros(0, image_dim, device=device), None, batch)


def bind_indexed(
    context: torch.Tensor,
    index: SubjectIndex,
    fusion: MultimodalFusion,
    timestep: torch.Tensor | float,
    layer_index: int,
) -> torch.Tensor:
    """A copy of context (B, S, C) with the fused subject tokens at index's (row, token) entries;
    every other entry is bit-identical. Returns context itself when index is empty. timestep:
    (B,) per row or one for all. The one binding of training and inference: gathers and one
    index_put on index tensors, nothing read on the host."""
    if index.empty:
        return context
    if index.batch != context.shape[0]:
        raise ValueError(f"a subject index made for a batch of {index.batch} used on a batch of {context.shape[0]}")
    if index.max_token >= context.shape[1]:
        raise ValueError(f"token index {index.max_token} is outside the {context.shape[1]}-token context")
    times = _per_row(timestep, context.shape[0]).to(context.device)
    text = context[index.rows, index.tokens]  # (N, C): a copy (advanced indexing)
    # All subjects of all rows through the fusion in one call.
    fused = fusion(text, index.embeds, times[index.rows], layer_index).to(context.dtype)
    if index.weights is not None:
        fused = torch.lerp(text, fused, cast_like(index.weights, context)[:, None])
    return context.index_put((index.rows, index.tokens), fused)


def bind_subjects(
    context: torch.Tensor,
    bindings: Sequence[SubjectBinding],
    fusion: MultimodalFusion,
    timestep: torch.Tensor | float,
    layer_index: int,
) -> torch.Tensor:
    """A copy of context (B, S, C) whose bound token rows hold the fused subject tokens in every
    row; every other entry is bit-identical. Returns context itself when no binding has weight."""
    index = SubjectIndex.for_rows(bindings, range(context.shape[0]), context.shape[0], context.device, fusion.image_dim)
    return bind_indexed(context, index, fusion, timestep, layer_index)


def bind_subjects_where(
    context: torch.Tensor,
    is_cond: torch.Tensor,
    bindings: Sequence[SubjectBinding],
    fusion: MultimodalFusion,
    timestep: torch.Tensor | float,
    layer_index: int,
) -> torch.Tensor:
    """bind_subjects on the rows where is_cond (B,) is true; unconditional rows keep their
    plain (null-text) context, bit-identical. Reads is_cond on the host: per-layer callers make
    a SubjectIndex once per model call instead."""
    rows = [i for i, flag in enumerate(is_cond.reshape(-1).tolist()) if flag]
    index = SubjectIndex.for_rows(bindings, rows, context.shape[0], context.device, fusion.image_dim)
    return bind_indexed(context, index, fusion, timestep, layer_index)


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

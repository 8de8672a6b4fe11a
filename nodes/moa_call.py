"""What one model call holds for a MoA patch, worked out once per call on the host.

Which rows carry the subjects: MoA Subject Inject marks every entry of the conditioning it
outputs with a ``SubjectsMark`` (a conditioning key, which ComfyUI's conditioning nodes copy
along: Combine, Concat, Set Area, Set Timestep Range, Average keep it on the entries they
derive). At sampling time ComfyUI gives each conditioning entry a uuid and lists the uuids of
a model call's chunks in ``transformer_options["uuids"]`` (with ``cond_or_uncond``); the
patch's ``calc_cond_batch`` wrapper lists the (cond list, uuid) of its marked entries
(``marked_chunks``) and its ``diffusion_model`` wrapper turns them, with the call's batch, into
a ``ModelCall``: host ints and index tensors made once, so that the 32 layer calls bind, record
and share with gathers and index_put only (no host read, no data-dependent shape: on a GPU
each would stall the stream). No tensor values are compared, and everything lives in that
call's options only, so several samplers can share one patched model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..mixture_core.moa import SubjectBinding, SubjectIndex
from ..mixture_core.moa_router import SubjectMaps

# The conditioning key of the mark MoA Subject Inject puts on the entries it outputs.
SUBJECTS_KEY = "mole_moa_subjects"


@dataclass(frozen=True)
class SubjectsMark:
    """Put on the conditioning MoA Subject Inject outputs: the patch with the same key binds
    its subjects in the rows of those entries. A plain value (a string key), so copies of the
    conditioning, deep or shallow, keep it."""

    key: str
    words: tuple[str, ...] = ()  # for messages and debugging


def mark_conditioning(conditioning: list, mark: SubjectsMark) -> list:
    """The conditioning with every entry marked (new entry dicts; the input is not changed)."""
    return [[c[0], {**c[1], SUBJECTS_KEY: mark}] for c in conditioning]


def marked_chunks(conds: Sequence, mark: SubjectsMark) -> frozenset:
    """The (cond list index, uuid) of each conditioning entry carrying `mark`, in any cond list
    (a marked negative binds too: it is what the user wired).

    A uuid already seen in an earlier list is skipped: for a positive entry with an area,
    ComfyUI adds to the negative list a copy of that entry (its keys, uuid and mark included)
    holding the negative's conditioning (samplers.create_cond_with_same_area_if_none)."""
    seen, rows = set(), set()
    for index, cond in enumerate(conds):
        for c in cond or ():
            entry_mark = c.get(SUBJECTS_KEY)
            if entry_mark is not None and entry_mark.key == mark.key and c.get("uuid") not in seen:
                rows.add((index, c.get("uuid")))
        seen |= {c.get("uuid") for c in cond or ()}
    return frozenset(rows)


@dataclass(frozen=True)
class ModelCall:
    """One model call as a MoA patch's layers need it. Host values: sigma, the marked rows, the
    images per chunk; device tensors made once: the subject index of the marked rows, those
    rows, the subject tokens and the image each row shows (for the attention router)."""

    batch: int
    sigma: float | None  # None outside a sampler
    rows: tuple[int, ...]  # the rows whose conditioning carries this patch's subjects
    per_chunk: int  # images per cond/uncond chunk
    images: torch.Tensor  # (B,) long: the image each row shows (its place in its chunk)
    timesteps: torch.Tensor | None  # (B,) on the 0..999 scale; None outside a sampler
    subjects: SubjectIndex | None  # the bindings in `rows`; None: nothing to fuse
    row_index: torch.Tensor | None  # (R,) long: `rows` on the device
    positions: torch.Tensor | None  # (S,) long: the subjects' token positions
    maps: SubjectMaps | None  # the sampling run's attention-router maps (None: no run state)


def chunk_flags(marked, chunks: list, batch: int, warn: Callable[..., None]) -> list[bool] | None:
    """Per row, whether its chunk is marked; None when the batch does not split into the chunks."""
    if batch % len(chunks):
        warn(
            "rows",
            "cannot split a batch of %d rows into %d conditioning chunks: subjects are not fused",
            batch,
            len(chunks),
        )
        return None
    return [chunk in marked for chunk in chunks for _ in range(batch // len(chunks))]


def plan_call(
    options: dict,
    marked: frozenset | None,
    batch: int,
    device,
    bindings: Sequence[SubjectBinding],
    image_dim: int,
    timesteps: torch.Tensor | None,
    maps: SubjectMaps | None,
    warn: Callable[..., None],
) -> ModelCall:
    """The ModelCall of transformer options `options` (ComfyUI's: cond_or_uncond, uuids, sigmas)
    for a batch of `batch` rows, `marked` being marked_chunks' answer for this sampler (None: not
    called through a sampler). timesteps: (B,) on the 0..999 scale, None outside a sampler.
    Reads the sigma on the host: the one sync per model call."""
    sigmas = options.get("sigmas")
    sigma = None if sigmas is None else float(sigmas.reshape(-1)[0])
    chunk_ids = list(zip(options.get("cond_or_uncond") or (), options.get("uuids") or ()))
    n_chunks = len(options.get("uuids") or options.get("cond_or_uncond") or [0])
    per_chunk = batch // n_chunks if batch % n_chunks == 0 else batch
    images = torch.arange(batch, device=device) % per_chunk
    rows: tuple[int, ...] = ()
    if marked is None or not chunk_ids:
        if marked is None and bindings:
            warn(
                "unmarked",
                "the model was called outside a sampler (no conditioning uuids): subjects "
                "are not fused, the personalized branch reads the plain text",
            )
    elif marked:
        flags = chunk_flags(marked, chunk_ids, batch, warn)
        rows = tuple(i for i, flag in enumerate(flags or ()) if flag)
    subjects = row_index = positions = None
    if rows and bindings:
        row_index = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
        positions = torch.tensor([b.token_index for b in bindings], dtype=torch.long).to(device, non_blocking=True)
        if timesteps is not None:
            subjects = SubjectIndex.for_rows(bindings, rows, batch, device, image_dim)
    return ModelCall(batch, sigma, rows, per_chunk, images, timesteps, subjects, row_index, positions, maps)


def row_timesteps(model_sampling, sigmas: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
    """(B,) timesteps (0..999) of a batch's rows from the call's sigmas; None outside a sampler
    (for calls that do not come through the diffusion model wrapper, which has them)."""
    if sigmas is None:
        return None
    t = model_sampling.timestep(sigmas.reshape(-1)).reshape(-1).float()
    if t.numel() == batch:
        pass
    elif t.numel() == 1:
        t = t.expand(batch)
    elif batch % t.numel() == 0:
        t = t.repeat(batch // t.numel())  # one chunk's sigmas, the same for every chunk
    else:
        t = t[:1].expand(batch)
    return t.to(device)


def per_row(timesteps: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """The diffusion model's timesteps as (B,) float; None when they do not fit the batch."""
    if timesteps is None:
        return None
    timesteps = timesteps.reshape(-1).float()
    timesteps = timesteps.expand(batch) if timesteps.numel() == 1 else timesteps
    return timesteps if timesteps.numel() == batch else None

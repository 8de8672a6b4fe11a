"""MoA on a ComfyUI model: the host adapter.

The prior expert is the model's own attention, computed by the host exactly as it would be
without MoA (its kernel, LoRA weight patches, other packs' attention *replace* patches such
as IPAdapter's, MoLE's forward patches...). MoA never replaces it. It uses four of the
*list* patches of ComfyUI's transformer options, which chain with other packs' patches:

* ``attn1_patch`` / ``attn2_patch``, called before each attention with
  ``(n, context, value, extra_options)``: returned unchanged; MoA keeps ``n`` (the normed
  hidden states: the router's and the personalized attention's input) and, for attn2, the
  text context;
* ``attn1_output_patch`` / ``attn2_output_patch``, called with ``(out, extra_options)`` after
  the attention's ``to_out``: ``MoALayer.forward(n, out, context, strength)`` mixes the prior
  output ``out`` with the personalized attention per pixel.

What the input patch keeps is stored in ``extra_options`` itself, under a key of this patch
and attention: ComfyUI builds that dict anew for every transformer block call and hands the
same dict to the block's input and output patches, so the stash is per layer and per call
by construction (nothing outlives the block call, nothing is shared between calls or
threads). The output patch also takes it out of the dict as it uses it.

Which rows carry the subjects: MoA Subject Inject marks every entry of the conditioning it
outputs with a ``SubjectsMark`` (a conditioning key, which ComfyUI's conditioning nodes copy
along: Combine, Concat, Set Area, Set Timestep Range, Average keep it on the entries they
derive). At sampling time ComfyUI gives each conditioning entry a uuid and lists the uuids of
a model call's chunks in ``transformer_options["uuids"]``; a ``calc_cond_batch`` wrapper of
this patch reads the marks of the sampler's conditioning and passes the uuids of its own
marked entries down in the transformer options. The personalized branch of those rows reads
the multimodal context (subject tokens fused with the subject's image embedding, the timestep
and the layer index); every other row (uncond, another prompt) reads its plain context. No
tensor values are compared, and the mapping lives in that sampler call's options only, so
several samplers can share one patched model.

Routers (the MoA file's): a learned router mixes per pixel from h; a constant one with a fixed
share; the training-free attention router (mixture_core.moa_router) with the subject tokens'
personalized cross-attention maps of the previous step: in the file's map layers the output
patch records those maps for the marked rows (also before start_percent and in the file's
prior_steps, so that the first active step has them), and every layer mixes with the share
derived from them. That router keeps the maps of the running sampling (a SubjectMaps, reset
when a sampling run starts again from a higher sigma).
"""

from __future__ import annotations

import copy
import functools
import logging
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import comfy.patcher_extension
import torch

from ..mixture_core.moa import MoALayer, MoAModel, SubjectBinding, bind_subjects_where, is_moa_target
from ..mixture_core.moa_router import SubjectMaps
from ..mixture_core.recording import token_grid
from .patching import attach_patcher

log = logging.getLogger(__name__)

_DIFFUSION = "diffusion_model"
# input_blocks.<i>.<j>.transformer_blocks.<k>.attn<1|2>, output_blocks.<i>..., middle_block.<j>...
_LAYER_PATH = re.compile(
    r"^(?:(?P<kind>input|output)_blocks\.(?P<block>\d+)|middle_block)\.(?P<sub>\d+)\.transformer_blocks\.(?P<index>\d+)\.(?P<attn>attn[12])$"
)
# The conditioning key of the mark MoA Subject Inject puts on the entries it outputs.
SUBJECTS_KEY = "mole_moa_subjects"
_PATCH_LISTS = ("attn1_patch", "attn1_output_patch", "attn2_patch", "attn2_output_patch")
# Receives (layer index, layer id, prior weight (B, T)) of each MoA layer call.
LayerObserver = Callable[[int, str, torch.Tensor], None]


def attention_modules(model_patcher) -> dict[str, torch.nn.Module]:
    """{layer id: attention module} of the attentions MoA can mix (attn1/attn2 of every
    transformer block), layer ids being the UNet module paths in SAI naming."""
    unet = model_patcher.get_model_object(_DIFFUSION)
    return {path: module for path, module in unet.named_modules() if is_moa_target(path) and hasattr(module, "to_q")}


def attention_shapes(model_patcher) -> dict[str, tuple[int, int]]:
    """{layer id: (dim, context_dim)} of the model's attentions, as check_against_model expects."""
    return {
        path: (int(m.to_q.weight.shape[1]), int(m.to_k.weight.shape[1]))
        for path, m in attention_modules(model_patcher).items()
    }


def block_locations(layer_ids) -> dict[tuple, str]:
    """{(block, block_index, "attn1"|"attn2"): layer id}, block being ComfyUI's
    transformer_options["block"] (("input", i), ("middle", 0), ("output", i)) and block_index
    the transformer block's index inside the block's spatial transformer.

    The spatial transformer's position inside its UNet block (the ``1`` of
    ``input_blocks.1.1.transformer_blocks.0``) does not appear in ComfyUI's block id; a block
    holding two spatial transformers would make the id ambiguous, so such layers (none in
    SD1.5) are left out, with a warning."""
    found: dict[tuple, list[str]] = {}
    for layer_id in layer_ids:
        m = _LAYER_PATH.match(layer_id)
        if m is None:
            continue
        block = (m["kind"], int(m["block"])) if m["kind"] else ("middle", 0)
        found.setdefault((block, int(m["index"]), m["attn"]), []).append(layer_id)
    ambiguous = sorted(x for ids in found.values() if len(ids) > 1 for x in ids)
    if ambiguous:
        log.warning(
            "MoA: %d attention layers share a ComfyUI block id and stay the prior: %s", len(ambiguous), ambiguous[:4]
        )
    return {key: ids[0] for key, ids in found.items() if len(ids) == 1}


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


@dataclass
class MoASettings:
    """What the patch needs besides the weights, fixed when the node runs."""

    strength: float
    sigma_start: float  # MoA is active for sigma_end <= sigma <= sigma_start
    sigma_end: float
    bindings: Sequence[SubjectBinding]
    model_sampling: object  # sigma -> timestep (0..999) for the spacetime encoding
    mark: SubjectsMark = field(default_factory=lambda: SubjectsMark(uuid.uuid4().hex))


@dataclass
class _State:
    """Flags for warnings given once per patched model."""

    warned: set = field(default_factory=set)


class MoAPatch:
    """The four list patches of one MoA application. ComfyUI deep-copies model_options on
    every ModelPatcher.clone(); the patches return themselves from __deepcopy__, so clones
    share the MoA weights (which ComfyUI manages as an additional model) instead of copying
    them and the model sampling object they refer to. They keep no per-call state.

    ``observer``, if set, receives the prior's weight of every MoA layer call (see
    ``observe_moa``, which installs a copy of the patch with one on a clone)."""

    def __init__(self, moa: MoAModel, settings: MoASettings, locations: dict[tuple, str]):
        self.moa, self.settings = moa, settings
        # (block, block_index, attn) -> (MoALayer, layer index for the spacetime encoding)
        self.layers: dict[tuple, tuple[MoALayer, int]] = {
            key: (moa[layer_id], moa.layer_index(layer_id))
            for key, layer_id in locations.items()
            if layer_id in moa.layer_ids
        }
        self.state = _State()
        router = moa.router_config
        self.maps = SubjectMaps(router.quantile) if router.kind == "attention" else None
        # (block, block_index, "attn2") of the layers whose maps the attention router reads
        self.map_keys = {key for key, layer_id in locations.items() if layer_id in router.map_layers}
        self.observer: LayerObserver | None = None
        self._key = f"moa_stash_{id(self):x}"
        # transformer_options key of the uuids of the rows that carry this patch's subjects
        self.rows_key = f"mole_moa.subject_rows.{settings.mark.key}"
        self.sigma_key = f"mole_moa.sigma.{settings.mark.key}"

    def __deepcopy__(self, memo):
        return self

    def with_observer(self, observer: LayerObserver | None) -> MoAPatch:
        """The same patch (weights, settings, keys) reporting to observer."""
        twin = copy.copy(self)
        twin.observer = observer
        return twin

    # -- the four patches and the sampling wrapper -----------------------------------------

    def attn1_patch(self):
        return _InputPatch(self, "attn1")

    def attn2_patch(self):
        return _InputPatch(self, "attn2")

    def attn1_output_patch(self):
        return _OutputPatch(self, "attn1")

    def attn2_output_patch(self):
        return _OutputPatch(self, "attn2")

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        """The CALC_COND_BATCH wrapper: the (cond list, uuid) of each conditioning entry this
        patch marked (in any cond list: a marked negative binds too, it is what the user
        wired), handed to the attention patches of this call through its transformer options.

        A uuid already seen in an earlier list is skipped: for a positive entry with an area,
        ComfyUI adds to the negative list a copy of that entry (its keys, uuid and mark
        included) holding the negative's conditioning (samplers.create_cond_with_same_area_if_none)."""
        mark, seen, rows = self.settings.mark, set(), set()
        for index, cond in enumerate(conds):
            uuids = {c.get("uuid") for c in cond or ()}
            for c in cond or ():
                entry_mark = c.get(SUBJECTS_KEY)
                if entry_mark is not None and entry_mark.key == mark.key and c.get("uuid") not in seen:
                    rows.add((index, c.get("uuid")))
            seen |= uuids
        options = dict(model_options)
        options["transformer_options"] = {
            **model_options.get("transformer_options", {}),
            self.rows_key: frozenset(rows),
            # Read once per model call here: every layer call asks for it, and on a GPU each
            # read of a device tensor waits for the queued work.
            self.sigma_key: float(timestep.reshape(-1)[0]),
        }
        return executor(model, conds, x_in, timestep, options)

    # -- helpers ---------------------------------------------------------------------------

    def warn_once(self, what: str, message: str, *args) -> None:
        if what not in self.state.warned:
            self.state.warned.add(what)
            log.warning("MoA: " + message, *args)

    def layer_for(self, extra_options: dict, attn: str):
        block = extra_options.get("block")
        if block is None:
            return None
        return self.layers.get((tuple(block), extra_options.get("block_index", 0), attn))

    def sigma(self, extra_options: dict) -> float | None:
        """This call's sigma (None outside a sampler): the float the wrapper read, else the tensor."""
        sigma = extra_options.get(self.sigma_key)
        if sigma is None:
            sigmas = extra_options.get("sigmas")
            sigma = None if sigmas is None else float(sigmas.reshape(-1)[0])
        return sigma

    def active(self, extra_options: dict) -> bool:
        sigma = self.sigma(extra_options)
        if sigma is None:
            return True  # called outside a sampler: no schedule to follow
        s = self.settings
        return s.sigma_end <= sigma <= s.sigma_start

    def records(self, extra_options: dict, attn: str) -> bool:
        """Whether this layer call records subject maps for the attention router: a map layer,
        inside a sampler, before end_percent (the maps of one step serve the next)."""
        if self.maps is None or attn != "attn2" or not self.settings.bindings:
            return False
        block, sigma = extra_options.get("block"), self.sigma(extra_options)
        if (
            block is None
            or sigma is None
            or (tuple(block), extra_options.get("block_index", 0), attn) not in self.map_keys
        ):
            return False
        return sigma >= self.settings.sigma_end

    def attention_share(
        self, layer: MoALayer, h: torch.Tensor, context: torch.Tensor | None, extra_options: dict, record: bool
    ) -> torch.Tensor | None:
        """The attention router's personal share (B, T, 1) for this layer call, from the previous
        step's maps (None: none yet, the prior alone); records this call's maps when `record`."""
        sigma, shape = self.sigma(extra_options), extra_options.get("original_shape")
        if sigma is None or shape is None:
            return None
        latent = tuple(shape[-2:])
        grid = token_grid(h.shape[1], *latent)
        if grid is None:
            return None
        self.maps.step(sigma)
        batch = h.shape[0]
        chunks = len(extra_options.get("uuids") or extra_options.get("cond_or_uncond") or [0])
        per_chunk = batch // chunks if batch % chunks == 0 else batch
        images = torch.arange(batch, device=h.device) % per_chunk  # the image each row shows
        if record and context is not None:
            rows = self.subject_rows(extra_options, batch, h.device)
            if rows is not None:
                positions = [b.token_index for b in self.settings.bindings]
                probs = layer.subject_attention(h[rows], context[rows], positions)  # (R, T, S)
                self.maps.add(probs.transpose(1, 2).unflatten(-1, grid), images[rows], per_chunk, latent)
        return self.maps.share(images, grid)

    def subject_rows(self, extra_options: dict, batch: int, device) -> torch.Tensor | None:
        """(B,) bool: the rows of this call whose conditioning carries this patch's mark; None
        when the call holds no such rows. A chunk is known by (its cond list, its entry's
        uuid), as ComfyUI lists them in cond_or_uncond and uuids."""
        marked = extra_options.get(self.rows_key)
        chunks = list(zip(extra_options.get("cond_or_uncond") or (), extra_options.get("uuids") or ()))
        if not marked or not chunks:
            if marked is None:
                self.warn_once(
                    "unmarked",
                    "the model was called outside a sampler (no conditioning uuids): subjects "
                    "are not fused, the personalized branch reads the plain text",
                )
            return None
        if batch % len(chunks):
            self.warn_once(
                "rows",
                "cannot split a batch of %d rows into %d conditioning chunks: subjects are not fused",
                batch,
                len(chunks),
            )
            return None
        flags = [chunk in marked for chunk in chunks]
        if not any(flags):  # decided on the host: no device sync per layer call
            return None
        return torch.tensor(flags, device=device).repeat_interleave(batch // len(chunks))

    def timesteps(self, extra_options: dict, batch: int, device) -> torch.Tensor | None:
        """(B,) timesteps (0..999) of the rows of a batch; None outside a sampler."""
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return None
        t = self.settings.model_sampling.timestep(sigmas.reshape(-1)).reshape(-1).float()
        if t.numel() == batch:
            pass
        elif t.numel() == 1:
            t = t.expand(batch)
        elif batch % t.numel() == 0:
            t = t.repeat(batch // t.numel())  # one chunk's sigmas, the same for every chunk
        else:
            t = t[:1].expand(batch)
        return t.to(device)

    def personal_context(self, context: torch.Tensor, extra_options: dict, layer_index: int) -> torch.Tensor:
        """The cross-attention context of the personalized branch: the marked rows with the
        subject tokens fused, every other row plain."""
        s = self.settings
        if not s.bindings:
            return context
        rows = self.subject_rows(extra_options, context.shape[0], context.device)
        if rows is None:
            return context
        timesteps = self.timesteps(extra_options, context.shape[0], context.device)
        if timesteps is None:
            return context
        if max(b.token_index for b in s.bindings) >= context.shape[1]:
            self.warn_once(
                "short",
                "the marked conditioning holds %d tokens, fewer than the subject positions %s: subjects are not fused",
                context.shape[1],
                [b.token_index for b in s.bindings],
            )
            return context
        return bind_subjects_where(context, rows, s.bindings, self.moa.fusion, timesteps, layer_index)


class _PatchBase:
    def __init__(self, patch: MoAPatch, attn: str):
        self.patch, self.attn = patch, attn
        self.key = f"{patch._key}_{attn}"

    def __deepcopy__(self, memo):
        return self


class _InputPatch(_PatchBase):
    """Before the attention: keep its input (and attn2's context) for the output patch."""

    def __call__(self, n, context, value, extra_options):
        p = self.patch
        if p.layer_for(extra_options, self.attn) is not None and (
            p.active(extra_options) or p.records(extra_options, self.attn)
        ):
            extra_options[self.key] = (n, context if self.attn == "attn2" else None)
        return n, context, value


class _OutputPatch(_PatchBase):
    """After the attention's to_out: mix the prior output with the personalized branch."""

    def __call__(self, out, extra_options):
        stashed = extra_options.pop(self.key, None)
        if stashed is None:
            return out  # not a MoA layer, outside start..end, or the input patch did not run
        p = self.patch
        found = p.layer_for(extra_options, self.attn)
        if found is None:
            return out
        layer, layer_index = found
        h, context = stashed
        if h.shape[:2] != out.shape[:2]:
            p.warn_once(
                "shape",
                "another patch changed the tokens of %s (input %s, output %s): MoA leaves such layers to the prior",
                self.attn,
                tuple(h.shape),
                tuple(out.shape),
            )
            return out
        if self.attn == "attn2":
            context = p.personal_context(context, extra_options, layer_index)
        share, router = None, p.moa.router_config
        if router.kind == "attention":
            share = p.attention_share(layer, h, context, extra_options, p.records(extra_options, self.attn))
            if share is None or not p.active(extra_options):
                # No maps yet, or only recording (before start / in the prior steps): the prior
                # alone, which a recording observer sees as prior weight 1 at every token.
                if p.observer is not None:
                    p.observer(layer_index, p.moa.layer_ids[layer_index], out.new_ones(out.shape[:2]))
                return out
        elif router.kind == "constant":
            share = router.share
        import comfy.ldm.modules.attention as host_attention

        precision = extra_options.get("attn_precision")

        def attention(q, k, v, heads):
            return host_attention.optimized_attention(q, k, v, heads, attn_precision=precision)

        observer = None
        if p.observer is not None:
            observer = functools.partial(p.observer, layer_index, p.moa.layer_ids[layer_index])
        return layer(
            h, out, context=context, strength=p.settings.strength, attention=attention, observer=observer, share=share
        )


def apply_moa(model, moa: MoAModel, weights_patcher, settings: MoASettings):
    """A clone of `model` with MoA on the attention layers the MoA model covers; `model`
    itself is not changed. weights_patcher is the one ModelPatcher of the loaded MoA file
    (shared by every model it patches, so ComfyUI tracks one object per file). The caller has
    checked the MoA model against `model`."""
    locations = block_locations(attention_modules(model))
    patch = MoAPatch(moa, settings, locations)
    patched = model.clone()
    for name in _PATCH_LISTS:
        patched.set_model_patch(getattr(patch, name)(), name)
    patched.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, patch.rows_key, patch.calc_cond_batch
    )
    attach_patcher(patched, "moa", weights_patcher)
    log.info(
        "MoA: %d attention layers mixed, %d subject(s), strength %g",
        len(patch.layers),
        len(settings.bindings),
        settings.strength,
    )
    return patched


def find_moa_patches(model) -> list[MoAPatch]:
    """The MoA patches on a model (one per MoA Subject Inject in its chain), in the order
    they were applied."""
    patches = model.model_options.get("transformer_options", {}).get("patches", {})
    found = []
    for p in patches.get("attn2_output_patch", []):
        if isinstance(p, _OutputPatch) and p.patch not in found:
            found.append(p.patch)
    return found


def find_moa_patch(model) -> MoAPatch | None:
    """The MoA patch applied last on a model, None if it has none."""
    found = find_moa_patches(model)
    return found[-1] if found else None


def observe_moa(model, patch: MoAPatch, observer: LayerObserver):
    """A clone of `model` whose MoA patch `patch` reports every layer call to observer; the
    rest of the chain (other packs' patches, other MoA patches) stays as it is."""
    observed = patch.with_observer(observer)
    patched = model.clone()
    patches = patched.model_options["transformer_options"]["patches"]  # the clone's own lists
    for name in _PATCH_LISTS:
        patches[name] = [
            getattr(observed, name)() if isinstance(p, _PatchBase) and p.patch is patch else p
            for p in patches.get(name, [])
        ]
    return patched

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

The input patch keeps them in ``extra_options``, which ComfyUI builds anew for every transformer
block call and hands to the block's input and output patches: per layer and per call by
construction (the output patch takes them out as it uses them).

Three wrappers (which chain with other packs' wrappers) carry what is not per layer:
``outer_sample`` makes the sampling run's state (the attention router's maps) in that run's
own options; ``calc_cond_batch`` lists the conditioning entries this patch marked
(nodes.moa_call); ``diffusion_model`` turns them, once per model call, into a ``ModelCall`` of
host values and index tensors. So the patch object keeps no per-run or per-call state (only
which warnings it gave), clones and concurrent samplers are independent, and a layer call
reads nothing on the host: the one sync per model call is the sigma read in the
``diffusion_model`` wrapper.

Routers (the MoA file's): a learned router mixes per pixel from h; a constant one with a fixed
share; the training-free attention router (mixture_core.moa_router) with the subject tokens'
personalized cross-attention maps of the previous step, recorded in the file's map layers for
the marked rows (also before start_percent and in prior_steps, so the first active step has them).
"""

from __future__ import annotations

import copy
import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import comfy.ldm.modules.attention as host_attention
import comfy.patcher_extension
import torch

from ..mixture_core.moa import MoALayer, MoAModel, SubjectBinding
from ..mixture_core.moa_router import SubjectMaps
from ..mixture_core.recording import token_grid
from .moa_call import (  # noqa: F401  (SUBJECTS_KEY, SubjectsMark, mark_conditioning: re-exported)
    SUBJECTS_KEY,
    ModelCall,
    SubjectsMark,
    mark_conditioning,
    marked_chunks,
    per_row,
    plan_call,
    row_timesteps,
)
from .moa_layers import attention_modules, attention_shapes, block_locations  # noqa: F401  (re-exported)
from .patching import attach_patcher

log = logging.getLogger(__name__)

_PATCH_LISTS = ("attn1_patch", "attn1_output_patch", "attn2_patch", "attn2_output_patch")
# Receives (layer index, layer id, prior weight (B, T)) of each MoA layer call.
LayerObserver = Callable[[int, str, torch.Tensor], None]


@dataclass
class MoASettings:
    """What the patch needs besides the weights, fixed when the node runs."""

    strength: float
    sigma_start: float  # MoA is active for sigma_end <= sigma <= sigma_start
    sigma_end: float
    bindings: Sequence[SubjectBinding]
    model_sampling: object  # sigma -> timestep (0..999), for layer calls outside the wrappers
    mark: SubjectsMark = field(default_factory=lambda: SubjectsMark(uuid.uuid4().hex))


class MoAPatch:
    """The four list patches and three wrappers of one MoA application. ComfyUI deep-copies
    model_options on every ModelPatcher.clone(); the patches return themselves from
    __deepcopy__, so clones share the MoA weights (which ComfyUI manages as an additional model)
    instead of copying them. That is safe because the patch keeps no state of a sampling run
    or a model call: those live in the run's and the call's transformer options.

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
        self.warned: set[str] = set()  # warnings given once per patched model
        router = moa.router_config
        # (block, block_index, "attn2") of the layers whose maps the attention router reads
        self.map_keys = {key for key, layer_id in locations.items() if layer_id in router.map_layers}
        self.observer: LayerObserver | None = None
        self._key = f"moa_stash_{id(self):x}"
        # transformer_options keys: the marked chunks of a sampler call, the ModelCall, the run's maps
        self.rows_key = f"mole_moa.subject_rows.{settings.mark.key}"
        self.call_key = f"mole_moa.call.{settings.mark.key}"
        self.run_key = f"mole_moa.run.{settings.mark.key}"

    def __deepcopy__(self, memo):
        return self

    def with_observer(self, observer: LayerObserver | None) -> MoAPatch:
        """The same patch (weights, settings, keys) reporting to observer."""
        twin = copy.copy(self)
        twin.observer = observer
        return twin

    # -- the four patches and the wrappers ---------------------------------------------------

    def attn1_patch(self):
        return _InputPatch(self, "attn1")

    def attn2_patch(self):
        return _InputPatch(self, "attn2")

    def attn1_output_patch(self):
        return _OutputPatch(self, "attn1")

    def attn2_output_patch(self):
        return _OutputPatch(self, "attn2")

    def outer_sample(self, executor, *args, **kwargs):
        """The OUTER_SAMPLE wrapper: a sampling run's own state (the attention router's maps),
        put in the run's model options (the guider's per-run copy), gone with the run."""
        options = getattr(executor.class_obj, "model_options", None)
        if options is None or self.moa.router_config.kind != "attention":
            return executor(*args, **kwargs)
        options.setdefault("transformer_options", {})[self.run_key] = SubjectMaps(self.moa.router_config.quantile)
        try:
            return executor(*args, **kwargs)
        finally:
            options["transformer_options"].pop(self.run_key, None)

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        """The CALC_COND_BATCH wrapper: the (cond list, uuid) of each conditioning entry this
        patch marked, handed to this call's diffusion_model wrapper in its transformer options."""
        options = dict(model_options)
        options["transformer_options"] = {
            **model_options.get("transformer_options", {}),
            self.rows_key: marked_chunks(conds, self.settings.mark),
        }
        return executor(model, conds, x_in, timestep, options)

    def diffusion_model(self, executor, x, *args, **kwargs):
        """The DIFFUSION_MODEL wrapper: this model call's ModelCall, made once for its layers."""
        args = list(args)  # (timesteps, context, y, control, transformer_options), as UNetModel.forward
        options = args[4] if len(args) > 4 else kwargs.get("transformer_options") or {}
        timesteps = per_row(args[0] if args else kwargs.get("timesteps"), x.shape[0])
        options = {**options, self.call_key: self.plan(options, x.shape[0], x.device, timesteps)}
        if len(args) > 4:
            args[4] = options
        else:
            kwargs["transformer_options"] = options
        return executor(x, *args, **kwargs)

    # -- per model call ----------------------------------------------------------------------

    def plan(self, options: dict, batch: int, device, timesteps: torch.Tensor | None) -> ModelCall:
        return plan_call(
            options,
            options.get(self.rows_key),
            batch,
            device,
            self.settings.bindings,
            self.moa.fusion.image_dim,
            timesteps,
            options.get(self.run_key),
            self.warn_once,
        )

    def call(self, extra_options: dict, batch: int, device) -> ModelCall:
        """This layer call's ModelCall: the wrapper's, else (a layer called outside the wrappers)
        one made here and kept in the block's options for its output patch."""
        call = extra_options.get(self.call_key)
        if call is None or call.batch != batch:
            sigmas = extra_options.get("sigmas")
            timesteps = row_timesteps(self.settings.model_sampling, sigmas, batch, device)
            call = self.plan(extra_options, batch, device, timesteps)
            extra_options[self.call_key] = call
        return call

    def warn_once(self, what: str, message: str, *args) -> None:
        if what not in self.warned:
            self.warned.add(what)
            log.warning("MoA: " + message, *args)

    def layer_for(self, extra_options: dict, attn: str):
        block = extra_options.get("block")
        if block is None:
            return None
        return self.layers.get((tuple(block), extra_options.get("block_index", 0), attn))

    def active(self, call: ModelCall) -> bool:
        if call.sigma is None:
            return True  # called outside a sampler: no schedule to follow
        s = self.settings
        return s.sigma_end <= call.sigma <= s.sigma_start

    def records(self, call: ModelCall, extra_options: dict, attn: str) -> bool:
        """Whether this layer call records subject maps for the attention router: a map layer,
        inside a sampling run, before end_percent (the maps of one step serve the next)."""
        if call.maps is None or attn != "attn2" or not self.settings.bindings or call.sigma is None:
            return False
        block = extra_options.get("block")
        if block is None or (tuple(block), extra_options.get("block_index", 0), attn) not in self.map_keys:
            return False
        return call.sigma >= self.settings.sigma_end

    def attention_share(
        self, layer: MoALayer, h: torch.Tensor, context: torch.Tensor | None, call: ModelCall, shape, record: bool
    ) -> torch.Tensor | None:
        """The attention router's personal share (B, T, 1) for this layer call, from the previous
        step's maps (None: none yet, the prior alone); records this call's maps when `record`."""
        if call.maps is None or call.sigma is None or shape is None:
            return None
        latent = tuple(shape[-2:])
        grid = token_grid(h.shape[1], *latent)
        if grid is None:
            return None
        call.maps.step(call.sigma)
        if record and context is not None and call.row_index is not None:
            rows = call.row_index
            probs = layer.subject_attention(h.index_select(0, rows), context.index_select(0, rows), call.positions)
            images = call.images.index_select(0, rows)
            call.maps.add(probs.transpose(1, 2).unflatten(-1, grid), images, call.per_chunk, latent)
        return call.maps.share(call.images, grid, call.per_chunk)

    def subject_rows(self, extra_options: dict, batch: int, device) -> torch.Tensor | None:
        """(B,) bool: the rows of this call whose conditioning carries this patch's mark; None
        when the call holds no such rows (for tests and tools: layer calls use the ModelCall)."""
        rows = self.call(extra_options, batch, device).rows
        if not rows:
            return None
        flags = torch.zeros(batch, dtype=torch.bool)
        flags[list(rows)] = True
        return flags.to(device)

    def personal_context(
        self, context: torch.Tensor, extra_options: dict, layer_index: int, call: ModelCall | None = None
    ) -> torch.Tensor:
        """The cross-attention context of the personalized branch: the marked rows with the
        subject tokens fused, every other row plain."""
        call = call or self.call(extra_options, context.shape[0], context.device)
        subjects = call.subjects
        if subjects is None or subjects.empty:
            return context
        if subjects.max_token >= context.shape[1]:
            self.warn_once(
                "short",
                "the marked conditioning holds %d tokens, fewer than the subject positions %s: subjects are not fused",
                context.shape[1],
                [b.token_index for b in self.settings.bindings],
            )
            return context
        return self.moa.bind(context, subjects, call.timesteps, layer_index)


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
        if p.layer_for(extra_options, self.attn) is not None:
            call = p.call(extra_options, n.shape[0], n.device)
            if p.active(call) or p.records(call, extra_options, self.attn):
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
        call = p.call(extra_options, h.shape[0], h.device)
        if self.attn == "attn2":
            context = p.personal_context(context, extra_options, layer_index, call)
        share, router = None, p.moa.router_config
        if router.kind == "attention":
            record = p.records(call, extra_options, self.attn)
            share = p.attention_share(layer, h, context, call, extra_options.get("original_shape"), record)
            if share is None or not p.active(call):
                # No maps yet, or only recording (before start / in the prior steps): the prior
                # alone, which a recording observer sees as prior weight 1 at every token.
                if p.observer is not None:
                    p.observer(layer_index, p.moa.layer_ids[layer_index], out.new_ones(out.shape[:2]))
                return out
        elif router.kind == "constant":
            share = router.share
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
    wrappers = comfy.patcher_extension.WrappersMP
    for kind, wrapper in (
        (wrappers.OUTER_SAMPLE, patch.outer_sample),
        (wrappers.CALC_COND_BATCH, patch.calc_cond_batch),
        (wrappers.DIFFUSION_MODEL, patch.diffusion_model),
    ):
        patched.add_wrapper_with_key(kind, patch.rows_key, wrapper)
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

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

Rows of a batch: ComfyUI batches conditional and unconditional chunks in one call and lists
them in ``extra_options["cond_or_uncond"]`` (0 = cond, 1 = uncond), each chunk ``batch`` rows
long; ``extra_options["sigmas"]`` holds the chunk's sigmas. In cross-attention the
personalized branch of cond rows reads the multimodal context (subject tokens fused with the
subject's image embedding, the timestep and the layer index); uncond rows read their plain
(null-text) context.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..mixture_core.moa import MoALayer, MoAModel, SubjectBinding, bind_subjects_where, is_moa_target
from .patching import attach_weights, conditional_rows

log = logging.getLogger(__name__)

_DIFFUSION = "diffusion_model"
# input_blocks.<i>.<j>.transformer_blocks.<k>.attn<1|2>, output_blocks.<i>..., middle_block.<j>...
_LAYER_PATH = re.compile(
    r"^(?:(?P<kind>input|output)_blocks\.(?P<block>\d+)|middle_block)\.(?P<sub>\d+)\.transformer_blocks\.(?P<index>\d+)\.(?P<attn>attn[12])$"
)
# The relative tolerance of the check that the cond context is the prompt MoA bound subjects
# in: above fp16/bf16 rounding of the context (the model casts it to its compute dtype).
_CONTEXT_RTOL = 1e-2


def attention_modules(model_patcher) -> dict[str, torch.nn.Module]:
    """{layer id: attention module} of the attentions MoA can mix (attn1/attn2 of every
    transformer block), layer ids being the UNet module paths in SAI naming."""
    unet = model_patcher.get_model_object(_DIFFUSION)
    return {path: module for path, module in unet.named_modules() if is_moa_target(path) and hasattr(module, "to_q")}


def attention_shapes(model_patcher) -> dict[str, tuple[int, int]]:
    """{layer id: (dim, context_dim)} of the model's attentions, as check_against_model expects."""
    return {path: (int(m.to_q.weight.shape[1]), int(m.to_k.weight.shape[1])) for path, m in attention_modules(model_patcher).items()}


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
        log.warning("MoA: %d attention layers share a ComfyUI block id and stay the prior: %s", len(ambiguous), ambiguous[:4])
    return {key: ids[0] for key, ids in found.items() if len(ids) == 1}


@dataclass
class MoASettings:
    """What the patch needs besides the weights, fixed when the node runs."""

    strength: float
    sigma_start: float  # MoA is active for sigma_end <= sigma <= sigma_start
    sigma_end: float
    bindings: Sequence[SubjectBinding]
    # The prompt's text embedding (CLIP output) at the bound positions, (n, C): cond rows whose
    # context differs there were not encoded from this prompt and get no fusion.
    bound_text: torch.Tensor | None
    model_sampling: object  # sigma -> timestep (0..999) for the spacetime encoding


@dataclass
class _State:
    """Flags for warnings given once per patched model."""

    warned: set = field(default_factory=set)


class MoAPatch:
    """The four list patches of one MoA application. ComfyUI deep-copies model_options on
    every ModelPatcher.clone(); the patches return themselves from __deepcopy__, so clones
    share the MoA weights (which ComfyUI manages as an additional model) instead of copying
    them and the model sampling object they refer to. They keep no per-call state."""

    def __init__(self, moa: MoAModel, settings: MoASettings, locations: dict[tuple, str]):
        self.moa, self.settings = moa, settings
        # (block, block_index, attn) -> (MoALayer, layer index for the spacetime encoding)
        self.layers: dict[tuple, tuple[MoALayer, int]] = {
            key: (moa[layer_id], moa.layer_index(layer_id)) for key, layer_id in locations.items() if layer_id in moa.layer_ids
        }
        self.state = _State()
        self._key = f"moa_stash_{id(self):x}"

    def __deepcopy__(self, memo):
        return self

    # -- the four patches -----------------------------------------------------------------

    def attn1_patch(self):
        return _InputPatch(self, "attn1")

    def attn2_patch(self):
        return _InputPatch(self, "attn2")

    def attn1_output_patch(self):
        return _OutputPatch(self, "attn1")

    def attn2_output_patch(self):
        return _OutputPatch(self, "attn2")

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

    def active(self, extra_options: dict) -> bool:
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return True  # called outside a sampler: no schedule to follow
        sigma = float(sigmas.reshape(-1)[0])
        s = self.settings
        return s.sigma_end <= sigma <= s.sigma_start

    def rows(self, extra_options: dict, batch: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(is_cond (B,) bool, timesteps (B,) or None) of the rows of a batch."""
        chunks = extra_options.get("cond_or_uncond")
        is_cond = conditional_rows(chunks, batch, device)
        if is_cond is None:
            if chunks:
                self.warn_once("rows", "cannot split a batch of %d rows into the chunks %s; every row is taken as conditional", batch, chunks)
            is_cond = torch.ones(batch, dtype=torch.bool, device=device)
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return is_cond, None
        t = self.settings.model_sampling.timestep(sigmas.reshape(-1)).reshape(-1).float()
        if t.numel() == batch:
            pass
        elif t.numel() == 1:
            t = t.expand(batch)
        elif batch % t.numel() == 0:
            t = t.repeat(batch // t.numel())  # one chunk's sigmas, the same for every chunk
        else:
            t = t[:1].expand(batch)
        return is_cond, t.to(device)

    def personal_context(self, context: torch.Tensor, extra_options: dict, layer_index: int) -> torch.Tensor:
        """The cross-attention context of the personalized branch: cond rows with the subject
        tokens fused, uncond rows (and rows of another prompt) plain."""
        s = self.settings
        if not s.bindings:
            return context
        is_cond, timesteps = self.rows(extra_options, context.shape[0], context.device)
        if timesteps is None:
            self.warn_once("sigmas", "no sigmas in the transformer options (the model was called outside a sampler): "
                                     "subjects are not fused, the personalized branch reads the plain text")
            return context
        if s.bound_text is not None and is_cond.any():
            positions = [b.token_index for b in s.bindings]
            if max(positions) >= context.shape[1]:
                matches = torch.zeros_like(is_cond)
            else:
                seen = context[:, positions].float()
                bound = s.bound_text.to(device=context.device, dtype=torch.float32)
                tolerance = _CONTEXT_RTOL * max(1.0, float(bound.abs().max()))
                matches = (seen - bound).abs().flatten(1).amax(dim=1) <= tolerance
            if bool((is_cond & ~matches).any()):
                self.warn_once("context", "the positive conditioning is not the prompt MoA Subject Inject encoded (wire its "
                                          "CONDITIONING output to the sampler's positive): subjects are not fused in those rows")
            is_cond = is_cond & matches
        if not bool(is_cond.any()):
            return context
        return bind_subjects_where(context, is_cond, s.bindings, self.moa.fusion, timesteps, layer_index)


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
        if p.layer_for(extra_options, self.attn) is not None and p.active(extra_options):
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
            p.warn_once("shape", "another patch changed the tokens of %s (input %s, output %s): MoA leaves such layers to the prior",
                        self.attn, tuple(h.shape), tuple(out.shape))
            return out
        if self.attn == "attn2":
            context = p.personal_context(context, extra_options, layer_index)
        import comfy.ldm.modules.attention as host_attention

        precision = extra_options.get("attn_precision")

        def attention(q, k, v, heads):
            return host_attention.optimized_attention(q, k, v, heads, attn_precision=precision)

        return layer(h, out, context=context, strength=p.settings.strength, attention=attention)


def apply_moa(model, moa: MoAModel, settings: MoASettings):
    """A clone of `model` with MoA on the attention layers the MoA model covers; `model`
    itself is not changed. The caller has checked the MoA model against `model`."""
    locations = block_locations(attention_modules(model))
    patch = MoAPatch(moa, settings, locations)
    patched = model.clone()
    patched.set_model_attn1_patch(patch.attn1_patch())
    patched.set_model_attn1_output_patch(patch.attn1_output_patch())
    patched.set_model_attn2_patch(patch.attn2_patch())
    patched.set_model_attn2_output_patch(patch.attn2_output_patch())
    attach_weights(patched, "moa", moa)
    log.info("MoA: %d attention layers mixed, %d subject(s), strength %g", len(patch.layers), len(settings.bindings), settings.strength)
    return patched

"""MoA: Mixture-of-Attention for personalized generation (Ostashev et al. 2024).

Every attention layer (attn1 and attn2 of each transformer block; 32 on SD1.5) mixes two
experts per pixel:

    R   = softmax(router(h))                     (B, T, 2), h = the attention's input
    R1' = strength * R1,   R0' = 1 - R1'
    out = R0' * prior(h, c) + R1' * personal(h, c')

``prior`` is the frozen model's own attention, computed by the host and passed in.
``personal`` has its own to_q, to_k, to_v (no bias) and to_out (with bias), the prior's
shapes. Strength 0 returns the prior output itself: no work, bit-identical.

In cross-attention the personalized branch reads a multimodal context c': at each subject
token the text embedding is fused with the subject's CLIP image embedding (ViT-L/14
projected CLS, as FastComposer) and an encoding of (timestep, layer index); other tokens
are the plain text. Unconditional rows keep the plain (null-text) context.

Architecture choices (the paper's equations are not available to us):
* router: Linear(dim, hidden) -> SiLU -> Linear(hidden, 2), SiLU as in the UNet's own
  blocks. Its last layer starts small with bias (PRIOR_LOGIT, 0), so a fresh router gives
  the personalized expert about 2% per pixel: generation starts as the prior's while every
  router weight already receives gradients.
* fusion: fused = text + MLP([text, image, spacetime]) with GELU (as CLIP/FastComposer's
  MLPs) and a zero-initialised last layer, so an untrained fusion is the identity.
* spacetime: [sinusoid(timestep), layer_embedding[layer]] -> Linear -> SiLU -> Linear,
  the UNet's timestep-embedding recipe with the layer's learned vector concatenated.
All weights are cast to the input's device and dtype per call, so offloaded weights and
other compute dtypes work (a no-op when they already match).

Besides this learned design, a MoA model may carry (file format version 2):
* FastComposer's fusion (FastComposerFusion: its postfuse MLPs with LayerNorms, no
  timestep/layer encoding; the fused token replaces the subject token as FastComposer's
  ``fuse_object_embeddings`` does), converted from its published weights;
* a router that is not learned (RouterConfig): ``constant`` (a fixed personal share) or
  ``attention`` (training-free: the personal share follows the subject tokens' cross-attention
  maps of the previous step, see mixture_core.moa_router).

One MoA for training and inference: both call the same three pieces per layer call, with what
depends on the batch (which rows carry which subjects at which tokens) made once per model call
as index tensors, so a layer call reads nothing on the host (no GPU stall, issue 22):

* ``SubjectIndex`` (made once per model call: ``for_rows`` at inference, ``from_padded`` in
  training) and ``bind_indexed`` / ``MoAModel.bind``: the personalized branch's context;
* ``MoALayer.forward``: router softmax, strength, and the prior/personal mix; the observer gets R0';
* ``MoALayer.subject_attention``: the subject tokens' personalized cross-attention, (B, T, n).

A training patch's attention output patch, for example::

    index = SubjectIndex.from_padded(token_index, valid, embeds)   # once per UNet call
    ...                                                            # per layer call:
    if attn == "attn2":
        context = moa.bind(context, index, timesteps, layer_index)
    out = layer(h, out, context if attn == "attn2" else None, observer=record.router.append)
    maps = layer.subject_attention(h, context, token_index_on_device)  # (B, T, n)

One set of precision rules for both: the MoA weights are cast to the hidden states' device and
dtype per call; the router, the personalized attention and the fusion run in the input's dtype
(the fusion's timestep sinusoid in at least float32); the mix comes back in the prior output's
dtype (a float32 softmax under autocast is cast down first); the subject attention
probabilities are computed in at least float32 with autocast off.

The package, one job per module: config (sizes, target layers, shapes, router/fusion kinds),
ops (weight-casting building blocks), layer (MoALayer), fusion (MoA's and FastComposer's),
binding (subjects into the context, embedding interpolations), model (MoAModel).
"""

from .binding import (
    SubjectBinding,
    SubjectIndex,
    bind_indexed,
    bind_subjects,
    bind_subjects_where,
    check_bindings,
    morph_embeddings,
    timelapse_tokens,
)
from .config import (
    FUSION_HIDDEN,
    FUSION_KINDS,
    IMAGE_DIM,
    MAX_PERIOD,
    MOA_TARGET,
    PRIOR_LOGIT,
    ROUTER_HIDDEN,
    ROUTER_INIT_SCALE,
    ROUTER_KINDS,
    SPACETIME_DIM,
    TEXT_DIM,
    Attention,
    AttentionShape,
    RouterConfig,
    RouterObserver,
    is_moa_target,
)
from .fusion import FastComposerFusion, FastComposerMLP, MultimodalFusion, SpacetimeEncoding, timestep_sinusoid
from .layer import MoALayer
from .model import MoAModel, prior_weights
from .ops import MLP, cast_like, layer_norm, linear, scaled_dot_product_attention

__all__ = [
    "FUSION_HIDDEN",
    "FUSION_KINDS",
    "IMAGE_DIM",
    "MAX_PERIOD",
    "MLP",
    "MOA_TARGET",
    "PRIOR_LOGIT",
    "ROUTER_HIDDEN",
    "ROUTER_INIT_SCALE",
    "ROUTER_KINDS",
    "SPACETIME_DIM",
    "TEXT_DIM",
    "Attention",
    "AttentionShape",
    "FastComposerFusion",
    "FastComposerMLP",
    "MoALayer",
    "MoAModel",
    "MultimodalFusion",
    "RouterConfig",
    "RouterObserver",
    "SpacetimeEncoding",
    "SubjectBinding",
    "SubjectIndex",
    "bind_indexed",
    "bind_subjects",
    "bind_subjects_where",
    "cast_like",
    "check_bindings",
    "is_moa_target",
    "layer_norm",
    "linear",
    "morph_embeddings",
    "prior_weights",
    "scaled_dot_product_attention",
    "timelapse_tokens",
    "timestep_sinusoid",
]

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
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

TEXT_DIM = IMAGE_DIM = 768  # CLIP ViT-L/14 text width and projected image embedding on SD1.5
ROUTER_HIDDEN = 128
FUSION_HIDDEN = 1024
SPACETIME_DIM = 256
PRIOR_LOGIT = 4.0  # fresh router: R1 = 1 / (1 + e^4), about 0.018
ROUTER_INIT_SCALE = 0.1  # shrinks the router's last weights so PRIOR_LOGIT dominates at init
MAX_PERIOD = 10000  # the UNet's timestep sinusoid

# The attention modules that become MoA layers: attn1 and attn2 of every transformer block.
MOA_TARGET = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn[12]$")

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
# Receives the prior's weight R0' = 1 - strength * R1 per token (B, T) of one layer call, for
# pictures of the routers at work (as mole.Observer for MoLE's gates).
RouterObserver = Callable[[torch.Tensor], None]


def is_moa_target(module_path: str) -> bool:
    """True for the UNet module path (SAI naming) of an attention module MoA mixes."""
    return MOA_TARGET.search(module_path) is not None


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


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention on (B, T, heads*d) tensors, the calling convention of ComfyUI's
    optimized_attention so that the host's kernel can be passed in its place."""
    split = lambda t: rearrange(t, "b t (h d) -> b h t d", h=heads)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return rearrange(out, "b h t d -> b t (h d)")


@dataclass(frozen=True)
class AttentionShape:
    dim: int  # query (hidden state) width, also the output width
    context_dim: int  # key/value input width: dim for attn1, the text width for attn2
    heads: int
    dim_head: int

    @property
    def inner(self) -> int:
        return self.heads * self.dim_head

    @classmethod
    def from_weights(cls, to_q: torch.Tensor, to_k: torch.Tensor, heads: int) -> AttentionShape:
        """The shape of an attention with these (out, in) projection weights."""
        if to_q.ndim != 2 or to_k.ndim != 2:
            raise ValueError(
                f"projection weights must be (out, in) matrices, not {tuple(to_q.shape)} and {tuple(to_k.shape)}"
            )
        inner, dim = to_q.shape
        if to_k.shape[0] != inner:
            raise ValueError(f"to_q has {inner} output features but to_k {to_k.shape[0]}")
        if heads <= 0 or inner % heads:
            raise ValueError(f"an inner width of {inner} does not split into {heads} heads")
        return cls(dim, to_k.shape[1], heads, inner // heads)


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

    def subject_attention(self, h: torch.Tensor, context: torch.Tensor, token_indices: Sequence[int]) -> torch.Tensor:
        """The personalized cross-attention probabilities of the given context tokens, averaged
        over heads: (B, T, len(token_indices)), computed in at least float32."""
        dtype = torch.promote_types(h.dtype, torch.float32)
        h32 = h.to(dtype)
        q, k = linear(h32, self.to_q), linear(cast_like(context, h32), self.to_k)
        q, k = (rearrange(t, "b t (h d) -> b h t d", h=self.heads) for t in (q, k))
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1).mean(1)  # (B, T, S)
        return probs[..., list(token_indices)]

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
        """observer, if given, receives this call's prior weight R0' per token, (B, T). share: the
        personal share R1 per pixel ((B, T, 1) or a number) from a router that is not learned;
        None: this layer's learned router."""
        if strength < 0:
            raise ValueError(f"MoA strength must be >= 0, not {strength}")
        if strength == 0:
            return prior_out  # the router forced to the prior: nothing to compute
        if share is None:
            share = self.route(h)[..., 1:]
        elif isinstance(share, torch.Tensor):
            share = cast_like(share, prior_out)
        else:  # a number: the same share at every pixel, as a (B, T, 1) map like a router's
            share = prior_out.new_full((*prior_out.shape[:-1], 1), float(share))
        personal_weight = strength * share
        if observer is not None:
            observer(1.0 - personal_weight[..., 0])
        # R0' * prior + R1' * personal with R0' = 1 - R1', written as one lerp.
        return prior_out + personal_weight * (self.personal(h, context, attention) - prior_out)


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


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, cast_like(norm.weight, x), cast_like(norm.bias, x), norm.eps)


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


ROUTER_KINDS = ("learned", "constant", "attention")
FUSION_KINDS = ("moa", "fastcomposer")


@dataclass(frozen=True)
class RouterConfig:
    """How a MoA model splits each pixel between the prior and the personalized attention.

    learned: each layer's router MLP. constant: personal share `share` everywhere.
    attention: training-free (mixture_core.moa_router): per pixel, max over subjects of
    clamp(A_s / quantile(A_s), 0, 1), A_s the subject token's personalized cross-attention map
    averaged over heads and over `map_layers` at the previous step. The first `prior_steps`
    of sampling (a fraction of the schedule, as start_percent) run the prior alone."""

    kind: str = "learned"
    share: float = 1.0
    quantile: float = 0.98
    prior_steps: float = 0.0
    map_layers: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"router kind {self.kind!r} is not one of {ROUTER_KINDS}")
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"the constant router's share must be in [0, 1], not {self.share}")
        if not 0.0 < self.quantile <= 1.0:
            raise ValueError(f"the attention router's quantile must be in (0, 1], not {self.quantile}")
        if not 0.0 <= self.prior_steps <= 1.0:
            raise ValueError(f"prior_steps must be in [0, 1], not {self.prior_steps}")
        if self.kind == "attention" and not self.map_layers:
            raise ValueError("the attention router needs the cross-attention layers whose maps it reads (map_layers)")


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


class MoAModel(nn.Module):
    """All MoA layers of a UNet, keyed by the attention module's path (SAI naming, such as
    ``input_blocks.1.1.transformer_blocks.0.attn1``), and the multimodal fusion. A layer's
    index for the spacetime encoding is its position in the layer list."""

    def __init__(
        self,
        shapes: dict[str, AttentionShape],
        router_hidden: int = ROUTER_HIDDEN,
        fusion_hidden: int = FUSION_HIDDEN,
        spacetime_dim: int = SPACETIME_DIM,
        text_dim: int = TEXT_DIM,
        image_dim: int = IMAGE_DIM,
        fusion: str = "moa",
        router: RouterConfig = RouterConfig(),
        image_preprocess: str = "clip",
    ):
        super().__init__()
        if not shapes:
            raise ValueError("a MoA model needs at least one layer")
        if fusion not in FUSION_KINDS:
            raise ValueError(f"fusion kind {fusion!r} is not one of {FUSION_KINDS}")
        unknown = sorted(set(router.map_layers) - set(shapes))
        if unknown:
            raise ValueError(f"the router reads maps of layers the model does not have: {unknown[:3]}")
        self.layer_ids = list(shapes)
        self._index = {layer_id: i for i, layer_id in enumerate(self.layer_ids)}
        self.router_config, self.fusion_kind, self.image_preprocess = router, fusion, image_preprocess
        self.router_hidden = router_hidden if router.kind == "learned" else 0
        # A list rather than a ModuleDict: module names cannot hold the dots of the layer ids.
        self.layers = nn.ModuleList(MoALayer(shape, self.router_hidden) for shape in shapes.values())
        if fusion == "moa":
            self.fusion = MultimodalFusion(text_dim, image_dim, fusion_hidden, spacetime_dim, len(shapes))
        else:
            self.fusion = FastComposerFusion(text_dim, image_dim, fusion_hidden)
        self.base_family: str | None = None  # set by load_moa_file
        self.metadata: dict[str, str] = {}

    @property
    def spacetime(self) -> SpacetimeEncoding | None:
        return getattr(self.fusion, "spacetime", None)

    def layer_index(self, layer_id: str) -> int:
        try:
            return self._index[layer_id]
        except KeyError:
            raise KeyError(f"no MoA layer {layer_id!r} (this model has {len(self.layer_ids)} layers)") from None

    def __getitem__(self, layer_id: str) -> MoALayer:
        return self.layers[self.layer_index(layer_id)]

    def shapes(self) -> dict[str, AttentionShape]:
        return {layer_id: layer.shape for layer_id, layer in zip(self.layer_ids, self.layers)}

    @classmethod
    def from_prior(cls, prior: dict[str, dict], **hyper) -> MoAModel:
        """A model whose personalized attentions start as copies of the prior's, for training.
        prior: {layer_id: {"to_q": W, "to_k": W, "to_v": W, "to_out": (W, b), "heads": int}}."""
        shapes = {}
        for layer_id, p in prior.items():
            try:
                shapes[layer_id] = AttentionShape.from_weights(p["to_q"], p["to_k"], int(p["heads"]))
            except ValueError as e:
                raise ValueError(f"{layer_id}: {e}") from None
        model = cls(shapes, **hyper).to(next(iter(prior.values()))["to_q"].dtype)
        with torch.no_grad():
            for layer_id, p in prior.items():
                params = dict(model[layer_id].named_parameters())
                values = {
                    "to_q.weight": p["to_q"],
                    "to_k.weight": p["to_k"],
                    "to_v.weight": p["to_v"],
                    "to_out.weight": p["to_out"][0],
                    "to_out.bias": p["to_out"][1],
                }
                for name, value in values.items():
                    if params[name].shape != value.shape:
                        raise ValueError(
                            f"{layer_id}: prior {name} has shape {tuple(value.shape)}, expected {tuple(params[name].shape)}"
                        )
                    params[name].copy_(value)
        return model

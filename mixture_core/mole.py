"""MoLE: a mixture of low-rank experts on one frozen layer.

    y = F(X) + strength * sum_i  w_i * s_i * g_i(X) * E_i(X)

F is the frozen layer, E_i(X) = up_i @ down_i @ X the i-th LoRA expert with its trained
scale s_i = alpha_i / rank_i, w_i a per-expert strength and g_i the soft assignment:

* local gate, per token and independent per expert: ``sigmoid(Linear(d_in, n)(X))``;
* global gate, per sample, in two variants:
  - "released" (the public MoLE code): ``sigmoid(Linear(d_out, 1)_i(mean_tokens(s_i * E_i(X))))``,
    one small head per expert reading that expert's pooled, scaled output;
  - "paper": ``sigmoid(Linear(d_in, n)(mean_tokens(X)))``.

Mode "both" multiplies the two gates; "local" and "global" keep one of them (the paper's
assignment ablation). All experts of a layer are evaluated together: one down-projection
over the concatenated ranks, the gates, one up-projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lora_format import LoRAPair

# The layers MoLE experts adapt: one predicate for the whole pack, with the UNet's names.
from .unet_names import is_mole_target as is_expert_target  # noqa: F401 (importable from here)

GATE_VARIANTS = ("released", "paper")
MODES = ("both", "local", "global")

# Receives the (local, global) gates of one layer call, for pictures of the gates at work.
Observer = Callable[[torch.Tensor | None, torch.Tensor | None], None]


@dataclass
class GateWeights:
    """The gates of one layer. Row i of each matrix belongs to expert i."""

    local_weight: torch.Tensor  # (n, d_in)
    local_bias: torch.Tensor  # (n,)
    global_weight: torch.Tensor  # (n, d_out) for "released", (n, d_in) for "paper"
    global_bias: torch.Tensor  # (n,)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    # Parameters rather than buffers: ComfyUI's loader moves and offloads parameters.
    return nn.Parameter(t.detach().clone(), requires_grad=False)


class MoLELayer(nn.Module):
    """The gated experts of one layer; ``forward(x, base_out)`` returns ``base_out`` plus the
    gated refinement. x is (B, tokens..., d_in) for Linear layers or (B, d_in, H, W) for
    1x1 convolutions, at any H and W."""

    def __init__(
        self,
        experts: list[LoRAPair],
        gates: GateWeights,
        variant: str = "released",
        mode: str = "both",
        expert_strengths: list[float] | None = None,
        strength: float = 1.0,
        trainable_gates: bool = False,
        expert_names: list[str] | None = None,
    ):
        super().__init__()
        if variant not in GATE_VARIANTS:
            raise ValueError(f"gate variant must be one of {GATE_VARIANTS}, not {variant!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        n = len(experts)
        if n == 0:
            raise ValueError("a MoLE layer needs at least one expert")
        d_in, d_out = experts[0].d_in, experts[0].d_out
        for e in experts:
            if (e.d_in, e.d_out) != (d_in, d_out):
                raise ValueError(f"experts disagree on the layer width: {(e.d_in, e.d_out)} vs {(d_in, d_out)}")
        expected = {
            "local_weight": (n, d_in),
            "local_bias": (n,),
            "global_weight": (n, d_out if variant == "released" else d_in),
            "global_bias": (n,),
        }
        for field, shape in expected.items():
            got = tuple(getattr(gates, field).shape)
            if got != shape:
                raise ValueError(
                    f"gate {field} has shape {got}, expected {shape} for {n} experts of width {d_in}->{d_out}"
                )
        strengths = [1.0] * n if expert_strengths is None else [float(s) for s in expert_strengths]
        if len(strengths) != n:
            raise ValueError(f"{len(strengths)} expert strengths for {n} experts")

        self.variant, self.mode, self.is_conv = variant, mode, experts[0].is_conv
        self.n_experts, self.d_in, self.d_out = n, d_in, d_out
        self.expert_names = list(expert_names) if expert_names is not None else [f"expert {i + 1}" for i in range(n)]
        self.ranks = [e.rank for e in experts]
        trained_scales = [e.scale for e in experts]
        gains = [s * w * strength for s, w in zip(trained_scales, strengths)]
        # Nothing to add: the layer returns the base output untouched (bit-identical).
        self.active = any(g != 0.0 for g in gains)

        dtype = experts[0].down.dtype
        # torch.cat makes the one copy the layer keeps (no further clone).
        self.down = nn.Parameter(
            torch.cat([e.down.to(dtype) for e in experts], dim=0), requires_grad=False
        )  # (R, d_in)
        self.up = nn.Parameter(torch.cat([e.up.to(dtype) for e in experts], dim=1), requires_grad=False)  # (d_out, R)
        expand = torch.zeros(n, sum(self.ranks), dtype=dtype)
        start = 0
        for i, r in enumerate(self.ranks):
            expand[i, start : start + r] = 1.0
            start += r
        self.expand = _frozen(expand)  # (n, R): which rank columns belong to which expert
        self.trained_scale = _frozen(torch.tensor(trained_scales, dtype=dtype))
        self.gain = _frozen(torch.tensor(gains, dtype=dtype))
        gate_param = (lambda t: nn.Parameter(t.detach().clone().to(dtype))) if trainable_gates else _frozen
        self.local_weight = gate_param(gates.local_weight)
        self.local_bias = gate_param(gates.local_bias)
        self.global_weight = gate_param(gates.global_weight)
        self.global_bias = gate_param(gates.global_bias)

    def gate_weights(self) -> GateWeights:
        return GateWeights(self.local_weight, self.local_bias, self.global_weight, self.global_bias)

    def _cast(self, p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # A no-op when the weights already sit on the input's device in its dtype; otherwise
        # (offloaded weights, another compute dtype) the per-call copy ComfyUI's casts also make.
        return p.to(device=like.device, dtype=like.dtype, non_blocking=True)

    def delta(self, x: torch.Tensor, observer: Observer | None = None) -> torch.Tensor:
        """The gated refinement alone, in the layout of the layer's output. observer, if
        given, receives this call's gates: (local (B, T, n) or None, global (B, 1, n) or None)."""
        if self.is_conv:
            b, _, h, w = x.shape
            tokens = x.flatten(2).transpose(1, 2)  # (B, HW, d_in): a view, works for any H x W
        else:
            b = x.shape[0]
            tokens = x.reshape(b, -1, x.shape[-1])
        c = lambda p: self._cast(p, tokens)  # noqa: E731
        z = F.linear(tokens, c(self.down))  # (B, T, R): all experts' down-projections at once

        local = global_ = None
        if self.mode != "global":
            local = torch.sigmoid(F.linear(tokens, c(self.local_weight), c(self.local_bias)))  # (B, T, n)
        if self.mode != "local":
            if self.variant == "released":
                # mean_tokens(s_i * up_i @ z_i) = s_i * up_i @ mean_tokens(z_i): pool before the up-projection.
                pooled = z.mean(dim=1).unsqueeze(1) * c(self.expand)  # (B, n, R), expert i's block only
                pooled_out = F.linear(pooled, c(self.up)) * c(self.trained_scale)[:, None]  # (B, n, d_out)
                logits = (pooled_out * c(self.global_weight)).sum(-1) + c(self.global_bias)
            else:
                logits = F.linear(tokens.mean(dim=1), c(self.global_weight), c(self.global_bias))
            global_ = torch.sigmoid(logits).unsqueeze(1)  # (B, 1, n)
        if observer is not None:
            observer(local, global_)

        gate = local if global_ is None else (global_ if local is None else local * global_)
        per_rank = F.linear(gate * c(self.gain), c(self.expand).t())  # (B, T or 1, R)
        out = F.linear(z * per_rank, c(self.up))  # (B, T, d_out)
        if self.is_conv:
            return out.transpose(1, 2).reshape(b, self.d_out, h, w)
        return out.reshape(*x.shape[:-1], self.d_out)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, observer: Observer | None = None) -> torch.Tensor:
        if not self.active:
            return base_out
        return base_out + self.delta(x, observer)


class MoLEForward:
    """A replacement ``forward`` for the frozen module: the base path (whatever was there
    before, so other patches stay in the chain) plus the MoLE refinement. It carries its layer
    so that a host adapter can find the MoLE layers of a patched model and re-wrap them with
    an observer (``with_observer``)."""

    def __init__(self, layer: MoLELayer, base_forward, observer: Observer | None = None):
        self.layer, self.base_forward, self.observer = layer, base_forward, observer

    def __call__(self, x, *args, **kwargs):
        return self.layer(x, self.base_forward(x, *args, **kwargs), self.observer)

    def with_observer(self, observer: Observer | None) -> MoLEForward:
        return MoLEForward(self.layer, self.base_forward, observer)


def wrap_forward(layer: MoLELayer, base_forward, observer: Observer | None = None) -> MoLEForward:
    return MoLEForward(layer, base_forward, observer)

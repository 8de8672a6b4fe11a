"""What MoLE's gates and MoA's routers did during sampling, kept for pictures (MoLE Fig. 7,
MoA Fig. 6), and the torch-only drawing helpers that turn it into images.

A recording is told about each model call (``begin_call``: its sigma, which rows of the batch
are conditional, the latent's height and width) and then about every gated layer of that
call. It keeps only the conditional rows and only running sums, so its memory does not grow
with the number of layers. Calls are grouped by sigma: the conditional and unconditional
calls of one sampling step share their sigma, so each distinct sigma is one "step" (a
sampler that evaluates the model twice per step, such as Heun, shows both evaluations).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_grid(tokens: int, height: int, width: int) -> tuple[int, int] | None:
    """(h, w) of the UNet level whose feature map of a height x width latent has `tokens`
    pixels (each level halves the size, rounding up as the UNet's strided convs do); None
    when the tokens are not pixels (the text tokens that cross-attention's to_k/to_v see)."""
    h, w = height, width
    for _ in range(8):
        if h * w == tokens:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return None


class Recording:
    """Steps (distinct sigmas, in the order sampled) and the layout of the current call."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Forget what was recorded: a new sampling run starts."""
        self.sigmas: list[float] = []
        self.step = -1
        self.cond_rows: torch.Tensor | None = None  # (B,) bool
        self.latent_size: tuple[int, int] | None = None

    def begin_call(self, sigma: float, cond_rows: torch.Tensor, latent_size: tuple[int, int]) -> None:
        if not self.sigmas or not math.isclose(sigma, self.sigmas[-1], rel_tol=1e-6, abs_tol=1e-9):
            self.sigmas.append(float(sigma))
        self.step = len(self.sigmas) - 1
        self.cond_rows, self.latent_size = cond_rows.bool().cpu(), tuple(latent_size)

    def _cond(self, t: torch.Tensor) -> torch.Tensor | None:
        """The conditional rows of a per-row tensor, on the CPU in float32 (None if none)."""
        rows = self.cond_rows
        if rows is None or rows.numel() != t.shape[0]:
            rows = torch.ones(t.shape[0], dtype=torch.bool)  # called outside a sampler: every row counts
        if not bool(rows.any()):
            return None
        return t.detach()[rows.to(t.device)].float().cpu()

    def _to_grid(self, per_token: torch.Tensor) -> torch.Tensor | None:
        """(B, T, ...) per-pixel values as (B, ..., h, w) maps; None if the tokens are not pixels."""
        grid = token_grid(per_token.shape[1], *self.latent_size)
        if grid is None:
            return None
        return per_token.unflatten(1, grid).movedim((1, 2), (-2, -1))


class GateRecording(Recording):
    """MoLE: per step, the global gate of each expert (mean over layers) and the local gate
    maps (mean over the layers whose tokens are pixels, resized to the latent), for the
    conditional rows."""

    def __init__(self, expert_names: list[str]):
        super().__init__()
        self.expert_names = list(expert_names)

    def reset(self) -> None:
        super().reset()
        self.global_sum: dict[int, torch.Tensor] = {}  # step -> (B, n)
        self.global_count: dict[int, int] = {}
        self.local_sum: dict[int, torch.Tensor] = {}  # step -> (B, n, H, W)
        self.local_count: dict[int, int] = {}
        self.layers_seen: set = set()

    def observe(self, layer_key, local: torch.Tensor | None, global_: torch.Tensor | None) -> None:
        """local (B, T, n) and global (B, 1, n) gates of one layer call (None: that gate is off)."""
        if self.step < 0:
            return
        self.layers_seen.add(layer_key)
        if global_ is not None and (g := self._cond(global_[:, 0])) is not None:
            self.global_sum[self.step] = self.global_sum.get(self.step, 0) + g
            self.global_count[self.step] = self.global_count.get(self.step, 0) + 1
        if local is not None and (lo := self._cond(local)) is not None and (grid := self._to_grid(lo)) is not None:
            maps = F.interpolate(grid, size=self.latent_size, mode="bilinear", align_corners=False)
            self.local_sum[self.step] = self.local_sum.get(self.step, 0) + maps
            self.local_count[self.step] = self.local_count.get(self.step, 0) + 1

    def global_gates(self) -> torch.Tensor:
        """(steps, B, n) mean global gate per step; NaN where no global gate was recorded."""
        steps = len(self.sigmas)
        out = None
        for s in range(steps):
            if s in self.global_sum:
                value = self.global_sum[s] / self.global_count[s]
                out = torch.full((steps, *value.shape), float("nan")) if out is None else out
                out[s] = value
        return out if out is not None else torch.empty(steps, 0, 0)

    def local_maps(self, step: int) -> torch.Tensor | None:
        """(B, n, H, W) mean local gate at a step, None if not recorded."""
        if step not in self.local_sum:
            return None
        return self.local_sum[step] / self.local_count[step]


class RouterRecording(Recording):
    """MoA: per step and layer, the prior's weight R0 per pixel for the conditional rows."""

    def reset(self) -> None:
        super().reset()
        self.maps: dict[tuple[int, int], torch.Tensor] = {}  # (step, layer index) -> (B, h, w)
        self.layer_names: dict[int, str] = {}

    def observe(self, layer_index: int, layer_name: str, prior_weight: torch.Tensor) -> None:
        """prior_weight (B, T): R0 of each token of one MoA layer call."""
        if self.step < 0 or (w := self._cond(prior_weight)) is None or (grid := self._to_grid(w)) is None:
            return
        self.layer_names[layer_index] = layer_name
        self.maps[(self.step, layer_index)] = grid

    def layers(self) -> list[int]:
        return sorted(self.layer_names)


# ---- drawing ----------------------------------------------------------------------------

# A perceptual dark-to-bright ramp (anchors of matplotlib's "inferno"), so 0 and 1 read apart.
_RAMP = torch.tensor(
    [
        [0.001, 0.000, 0.014],
        [0.258, 0.039, 0.406],
        [0.578, 0.148, 0.404],
        [0.865, 0.317, 0.226],
        [0.988, 0.645, 0.040],
        [0.988, 0.998, 0.645],
    ]
)


def colorize(values: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Values (..., H, W) mapped from [low, high] onto the ramp: (..., H, W, 3) in [0, 1]."""
    x = ((values.float() - low) / max(high - low, 1e-12)).clamp(0, 1) * (len(_RAMP) - 1)
    i = x.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (x - i).unsqueeze(-1)
    return _RAMP[i] * (1 - frac) + _RAMP[i + 1] * frac


def overlay(
    image: torch.Tensor, values: torch.Tensor, opacity: float = 0.6, low: float = 0.0, high: float = 1.0
) -> torch.Tensor:
    """A heat map of values (h, w) resized over image (H, W, 3): (H, W, 3) in [0, 1]."""
    height, width = image.shape[:2]
    resized = F.interpolate(values.float()[None, None], size=(height, width), mode="bilinear", align_corners=False)[
        0, 0
    ]
    return image.float().cpu() * (1 - opacity) + colorize(resized, low, high) * opacity


def pick_steps(spec: str, steps: int) -> list[int]:
    """Step indices from a comma list such as "first, middle, last" or "0, 10, -1"."""
    named = {"first": 0, "middle": steps // 2, "last": steps - 1}
    picked = []
    for part in (p.strip().lower() for p in spec.split(",")):
        if not part:
            continue
        if part in named:
            index = named[part]
        else:
            try:
                index = int(part)
            except ValueError:
                raise ValueError(
                    f"step {part!r}: use step numbers (0 is the first, -1 the last) or first/middle/last"
                ) from None
            index = index + steps if index < 0 else index
        if not 0 <= index < steps:
            raise ValueError(f"step {part!r} is outside the {steps} recorded steps")
        picked.append(index)
    if not picked:
        raise ValueError("no steps chosen")
    return picked

"""LoRA files as low-rank pairs: kohya (lora_down/lora_up/alpha), peft (lora_A/lora_B)
and older diffusers (lora.down/lora.up) namings.

The kohya scale convention is kept: an expert adds ``(alpha / rank) * up @ down @ x``;
a file without alpha uses alpha = rank (scale 1), as ComfyUI's LoraLoader does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import WeightFileError

# (suffix of the down/A matrix, suffix of the up/B matrix), longest first so that
# "lora_A.default.weight" is not taken for "lora_A.weight".
_PAIR_SUFFIXES = (
    (".lora_A.default.weight", ".lora_B.default.weight"),
    (".lora_down.weight", ".lora_up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
)


@dataclass
class LoRAPair:
    """One adapted layer: y += (alpha / rank) * up @ (down @ x)."""

    down: torch.Tensor  # (rank, d_in)
    up: torch.Tensor  # (d_out, rank)
    alpha: float
    is_conv: bool  # a 1x1 convolution (SD1.5 proj_in/proj_out) rather than a Linear
    keys: tuple[str, str] | None = None  # (down, up) tensor names in the file it came from

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def d_in(self) -> int:
        return self.down.shape[1]

    @property
    def d_out(self) -> int:
        return self.up.shape[0]

    def read(self, read_tensor: Callable[[str], torch.Tensor]) -> LoRAPair:
        """This pair with its matrices read from its file (a pair parsed from a file's
        layout holds meta tensors: shapes only)."""
        down, up = (read_tensor(k).reshape(like.shape) for k, like in zip(self.keys, (self.down, self.up)))
        return LoRAPair(down, up, self.alpha, self.is_conv, self.keys)


def _as_matrix(t: torch.Tensor, key: str, path: str | None) -> tuple[torch.Tensor, bool]:
    if t.ndim == 2:
        return t, False
    if t.ndim == 4 and t.shape[2:] == (1, 1):
        return t.flatten(1), True
    raise WeightFileError(
        path,
        f"tensor {key} has shape {tuple(t.shape)}; MoLE experts adapt Linear and 1x1 conv layers only "
        "(3x3 conv LoRA/LoCon layers cannot be gated per token)",
    )


def parse_lora_state_dict(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike | None = None
) -> dict[str, LoRAPair]:
    """Group a LoRA state dict into LoRAPairs keyed by the layer name as written in the file
    (for example ``lora_unet_down_blocks_0_attentions_0_proj_in`` or
    ``unet.down_blocks.0.attentions.0.proj_in``)."""
    path = None if path is None else os.fspath(path)
    pairs: dict[str, LoRAPair] = {}
    used: set[str] = set()
    for key in state_dict:
        for down_suffix, up_suffix in _PAIR_SUFFIXES:
            if not key.endswith(down_suffix):
                continue
            name = key[: -len(down_suffix)]
            up_key = name + up_suffix
            if up_key not in state_dict:
                raise WeightFileError(path, f"LoRA layer {name} has {key} but no {up_key}")
            down, down_conv = _as_matrix(state_dict[key], key, path)
            up, up_conv = _as_matrix(state_dict[up_key], up_key, path)
            if down.shape[0] != up.shape[1]:
                raise WeightFileError(
                    path, f"LoRA layer {name}: down has rank {down.shape[0]} but up has rank {up.shape[1]}"
                )
            alpha_key = name + ".alpha"
            alpha = float(state_dict[alpha_key]) if alpha_key in state_dict else float(down.shape[0])
            pairs[name] = LoRAPair(down=down, up=up, alpha=alpha, is_conv=down_conv or up_conv, keys=(key, up_key))
            used.update({key, up_key, alpha_key})
            break
    if not pairs:
        sample = sorted(state_dict)[:5]
        raise WeightFileError(
            path,
            "holds no LoRA layers (expected kohya '.lora_down.weight'/'.lora_up.weight' or peft "
            "'.lora_A.weight'/'.lora_B.weight' keys)",
            [f"first keys: {', '.join(sample)}"] if sample else ["the file holds no tensors"],
        )
    return pairs

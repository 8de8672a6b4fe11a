"""Reading weight files safely: safetensors only, with checks a person can act on."""

from __future__ import annotations

import json
import math
import os
import struct

import torch
from safetensors import safe_open

from .errors import WeightFileError

_PICKLE_HINT = (
    "is a pickle-based file (.ckpt/.pt/.bin); pickles can run code when loaded, so only "
    ".safetensors files are accepted. Convert it with safetensors.torch.save_file first."
)


def _read_header(path: str) -> dict:
    """The header entries of a safetensors file, or a WeightFileError saying why it is not one."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
        (header_len,) = struct.unpack("<Q", head[:8]) if len(head) >= 8 else (0,)
        if len(head) < 9 or head[8:9] != b"{" or header_len == 0:
            # Not a safetensors header; only now read the first bytes as another format's
            # signature (a safetensors header length may itself start with 0x80).
            if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
                raise WeightFileError(path, _PICKLE_HINT)
            raise WeightFileError(path, f"is not a safetensors file (its {size} bytes do not start with a safetensors header)")
        if 8 + header_len > size:
            raise WeightFileError(path, "is truncated: its header is larger than the file")
        f.seek(8)
        header = f.read(header_len)
    try:
        entries = json.loads(header)
        data_end = max((e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__"), default=0)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, IndexError):
        raise WeightFileError(path, "is not a safetensors file (its header is not a safetensors JSON header)") from None
    if 8 + header_len + data_end > size:
        raise WeightFileError(path, f"is truncated: it holds {size} bytes but its tensors need {8 + header_len + data_end}")
    return entries


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsFile:
    """A safetensors file, checked on opening (missing, pickle, truncated, foreign): its
    layout comes from the header without reading data, and tensors are read on request.
    Each read maps the file only for its duration: the file's pages are not held mapped
    (and counted in the process's memory) beside what the caller builds from them."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise WeightFileError(self.path, "file not found")
        entries = _read_header(self.path)
        self.metadata = dict(entries.pop("__metadata__", None) or {})
        self._entries = entries
        self.keys = list(entries)

    def layout(self) -> dict[str, torch.Tensor]:
        """Every tensor as a meta tensor of its shape and dtype; single-element tensors (such
        as LoRA alphas) are read for real."""
        scalars = self.read([k for k, e in self._entries.items() if math.prod(e["shape"]) == 1])
        return {
            k: scalars[k] if k in scalars else torch.empty(e["shape"], dtype=_DTYPES.get(e["dtype"], torch.float32), device="meta")
            for k, e in self._entries.items()
        }

    def read(self, keys, check_finite: bool = True) -> dict[str, torch.Tensor]:
        try:
            with safe_open(self.path, framework="pt", device="cpu") as f:
                # clone: the tensors own their memory rather than the file's mapping
                tensors = {k: f.get_tensor(k).clone() for k in keys}
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise WeightFileError(self.path, f"could not be read as safetensors ({e})") from e
        bad = _nonfinite(tensors) if check_finite else []
        if bad:
            raise WeightFileError(self.path, f"{len(bad)} tensor(s) hold NaN or inf values", bad)
        return tensors


def _nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    # One summing pass per tensor (NaN and inf propagate into the sum); the exact
    # per-element check runs only on tensors whose sum is not finite.
    suspects = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t.sum(dtype=torch.float32))]
    return sorted(k for k in suspects if not bool(torch.isfinite(tensors[k]).all()))


def load_safetensors(path: str | os.PathLike, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a safetensors file onto the CPU.

    Raises WeightFileError for a missing file, a pickle, a truncated or foreign file, and
    (with check_finite) for tensors holding NaN or inf.
    """
    f = SafetensorsFile(path)
    return f.read(f.keys, check_finite), f.metadata

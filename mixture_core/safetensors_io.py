"""Reading weight files safely: safetensors only, with checks a person can act on.

The `safetensors` library parses and validates the files (`safe_open`, `get_slice` for shapes
and dtypes without reading data, `metadata()`). The pack adds only what the library cannot
say: limits checked before the library is handed a header (a hostile header costs the
library seconds and gigabytes to parse), and, when the library refuses a file, a look at its
first bytes to tell the person why (a pickle, a truncated file, not a safetensors file).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable

import torch
from safetensors import safe_open

from .errors import WeightFileError

# The largest header read at all; the safetensors library's own limit, checked here from the
# first 8 bytes so that nothing of a larger header is read.
MAX_HEADER_BYTES = 100_000_000
# The most tensors a file may hold. A whole SDXL checkpoint has ~2,500 and a LoRA with every
# layer a few thousand; a million-entry header takes the library ~7 s and ~1.2 GB to parse.
MAX_TENSORS = 100_000

_PICKLE_HINT = (
    "is a pickle-based file (.ckpt/.pt/.bin); pickles can run code when loaded, so only "
    ".safetensors files are accepted. Convert it with safetensors.torch.save_file first."
)

# safetensors dtype names (as get_slice().get_dtype() gives them) -> torch dtypes.
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Dtypes whose CPU kernels cannot sum or compare: cast to float32 for the NaN/inf check.
_CHECK_AS_FLOAT32 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _explain(path: str, size: int, head: bytes) -> str | None:
    """Why a file whose first bytes are `head` is not a readable safetensors file, or None if
    its start looks like one. Only used to explain a refusal."""
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        # Checked only when the 9th byte is not a header's '{': a safetensors header length
        # may itself start with 0x80.
        if head[8:9] != b"{":
            return _PICKLE_HINT
    if len(head) < 9 or head[8:9] != b"{":
        return f"is not a safetensors file (its {size} bytes do not start with a safetensors header)"
    (header_len,) = struct.unpack("<Q", head[:8])
    if 8 + header_len > size:
        return f"is truncated: its header needs {8 + header_len} bytes but the file holds {size}"
    return None


def _explain_library_error(path: str, size: int, head: bytes, error: Exception) -> str:
    found = _explain(path, size, head)
    if found:
        return found
    text = str(error)
    if "IncompleteBuffer" in text or "incomplete" in text.lower():
        return f"is truncated: its {size} bytes end before its tensors do ({text})"
    return f"could not be read as safetensors ({text})"


class SafetensorsFile:
    """A safetensors file, checked on opening (missing, pickle, truncated, foreign, oversized
    header, too many tensors, unknown dtypes): its layout comes from the header without
    reading data, and tensors are read on request. Each read maps the file only for its
    duration: the file's pages are not held mapped (and counted in the process's memory)
    beside what the caller builds from them."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise WeightFileError(self.path, "file not found")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(9)
            self._check_header(f, size, head)
        try:
            with safe_open(self.path, framework="pt", device="cpu") as f:
                self.metadata = dict(f.metadata() or {})
                slices = {k: f.get_slice(k) for k in f.keys()}
                self._entries = {k: (s.get_dtype(), tuple(s.get_shape())) for k, s in slices.items()}
        except Exception as e:  # the library raises its own error types for malformed files
            raise WeightFileError(self.path, _explain_library_error(self.path, size, head, e)) from e
        unknown = sorted(f"{k}: {dtype}" for k, (dtype, _) in self._entries.items() if dtype not in _DTYPES)
        if unknown:
            readable = ", ".join(_DTYPES)
            raise WeightFileError(
                self.path, f"{len(unknown)} tensor(s) have a dtype this pack cannot use (it reads {readable})", unknown
            )
        self.keys = list(self._entries)

    def _check_header(self, f, size: int, head: bytes) -> None:
        """The size limits, from the header's length and bytes, before the library parses it."""
        if len(head) < 9 or head[8:9] != b"{":
            raise WeightFileError(self.path, _explain(self.path, size, head))
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len > MAX_HEADER_BYTES:
            raise WeightFileError(
                self.path,
                f"its header claims {header_len:,} bytes, more than the {MAX_HEADER_BYTES:,} this pack reads "
                "(a damaged file, or not a weight file)",
            )
        if 8 + header_len > size:
            raise WeightFileError(self.path, _explain(self.path, size, head))
        f.seek(8)
        header = f.read(header_len)
        # Every tensor entry holds two JSON arrays (shape, data_offsets), and JSON has no escape
        # for a '[': half the '[' bytes bounds the tensor count without parsing the header.
        if header.count(b"[") > 2 * MAX_TENSORS + 64:
            raise WeightFileError(
                self.path,
                f"its header describes about {header.count(b'[') // 2:,} tensors, more than the {MAX_TENSORS:,} "
                "this pack reads (a damaged file, or not a weight file)",
            )

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._entries[key][0]]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def layout(self) -> dict[str, torch.Tensor]:
        """Every tensor as a meta tensor of its shape and dtype; single-element tensors (such
        as LoRA alphas) are read for real."""
        scalars = self.read([k for k, (_, shape) in self._entries.items() if math.prod(shape) == 1])
        return {
            k: scalars[k] if k in scalars else torch.empty(self.shape(k), dtype=self.dtype(k), device="meta")
            for k in self._entries
        }

    def read(self, keys, check_finite: bool = True) -> dict[str, torch.Tensor]:
        keys = list(keys)
        absent = [k for k in keys if k not in self._entries]
        if absent:
            raise WeightFileError(self.path, f"{len(absent)} tensor(s) asked for are not in the file", absent)
        try:
            with safe_open(self.path, framework="pt", device="cpu") as f:
                # clone: the tensors own their memory rather than the file's mapping
                tensors = {k: f.get_tensor(k).clone() for k in keys}
        except Exception as e:  # the file changed since it was opened, or the library refuses a tensor
            raise WeightFileError(self.path, f"could not be read as safetensors ({e})") from e
        bad = _nonfinite(tensors) if check_finite else []
        if bad:
            raise WeightFileError(self.path, f"{len(bad)} tensor(s) hold NaN or inf values", bad)
        return tensors


def _checkable(t: torch.Tensor):
    """The tensor's values in pieces the CPU can sum: fp8 has no CPU sum, so it is checked as
    float32 a chunk at a time (bounding the extra memory)."""
    if t.dtype not in _CHECK_AS_FLOAT32:
        return [t]
    return [c.float() for c in t.reshape(-1).split(1 << 22)]


def _nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    # One summing pass per tensor (NaN and inf propagate into the sum); the exact
    # per-element check runs only on tensors whose sum is not finite.
    suspects = [
        k
        for k, t in tensors.items()
        if t.is_floating_point() and not all(torch.isfinite(c.sum(dtype=torch.float32)) for c in _checkable(t))
    ]
    return sorted(k for k in suspects if not all(bool(torch.isfinite(c).all()) for c in _checkable(tensors[k])))


def load_safetensors(
    path: str | os.PathLike,
    check_finite: bool = True,
    check_layout: Callable[[dict[str, torch.Tensor], dict[str, str]], object] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a safetensors file onto the CPU.

    ``check_layout(layout, metadata)``, if given, runs on the file's layout (meta tensors, see
    SafetensorsFile.layout) before any tensor is read, so a file with wrong key names or
    shapes is refused without reading its data; it raises to refuse.

    Raises WeightFileError for a missing file, a pickle, a truncated or foreign file, a header
    over the limits, and (with check_finite) for tensors holding NaN or inf.
    """
    f = SafetensorsFile(path)
    if check_layout is not None:
        check_layout(f.layout(), f.metadata)
    return f.read(f.keys, check_finite), f.metadata

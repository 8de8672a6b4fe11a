"""Reading weight files safely: safetensors only, with checks a person can act on."""

from __future__ import annotations

import json
import os
import struct

import torch
from safetensors import safe_open

from .errors import WeightFileError

_PICKLE_HINT = (
    "is a pickle-based file (.ckpt/.pt/.bin); pickles can run code when loaded, so only "
    ".safetensors files are accepted. Convert it with safetensors.torch.save_file first."
)


def _sniff_problem(path: str) -> str | None:
    """Why a file cannot be a safetensors file, read from its first bytes; None if it may be one."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
        (header_len,) = struct.unpack("<Q", head[:8]) if len(head) >= 8 else (0,)
        if len(head) < 9 or head[8:9] != b"{" or header_len == 0:
            # Not a safetensors header; only now read the first bytes as another format's
            # signature (a safetensors header length may itself start with 0x80).
            if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
                return _PICKLE_HINT
            return f"is not a safetensors file (its {size} bytes do not start with a safetensors header)"
        if 8 + header_len > size:
            return "is truncated: its header is larger than the file"
        f.seek(8)
        header = f.read(header_len)
    try:
        entries = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "is not a safetensors file (its header is not JSON)"
    data_end = 0
    for name, entry in entries.items():
        if name != "__metadata__":
            data_end = max(data_end, entry["data_offsets"][1])
    if 8 + header_len + data_end > size:
        return f"is truncated: it holds {size} bytes but its tensors need {8 + header_len + data_end}"
    return None


def load_safetensors(path: str | os.PathLike, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a safetensors file onto the CPU.

    Raises WeightFileError for a missing file, a pickle, a truncated or foreign file, and
    (with check_finite) for tensors holding NaN or inf.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightFileError(path, "file not found")
    problem = _sniff_problem(path)
    if problem:
        raise WeightFileError(path, problem)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise WeightFileError(path, f"could not be read as safetensors ({e})") from e
    if check_finite:
        # One summing pass per tensor (NaN and inf propagate into the sum); the exact
        # per-element check runs only on tensors whose sum is not finite.
        suspects = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t.sum(dtype=torch.float32))]
        bad = [k for k in suspects if not bool(torch.isfinite(tensors[k]).all())]
        if bad:
            raise WeightFileError(path, f"{len(bad)} tensor(s) hold NaN or inf values", sorted(bad))
    return tensors, metadata

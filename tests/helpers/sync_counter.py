"""Counting the operations that would stall a GPU stream until the host knows a value or a size.

On a GPU most work is queued and the host runs ahead; an operation whose result the host must
read (a Python scalar: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``if t:``) or whose
output size depends on the data (``nonzero``, ``masked_select``, ``x[bool_mask]``,
``x[bool_mask] = v``, ``unique``, ``repeat_interleave`` with tensor repeats) waits for the GPU to
catch up. On a CPU nothing waits, but the same aten operations are dispatched, so counting them
under a ``TorchDispatchMode`` tells on any machine how many stalls a GPU would have.

    with SyncCounter() as syncs:
        model(x)
    syncs.total, syncs.by_kind, syncs.sites  # count, {kind: count}, {(kind, file:line): count}

What it cannot see: ``.tolist()`` and ``.numpy()`` read CPU memory without dispatching an aten op
(on a GPU tensor they go through a device-to-host copy, which is counted); host reads of tensors
the code made on the CPU are no syncs and are counted only where they dispatch
``_local_scalar_dense`` (``.item()`` on a CPU tensor counts: the same line on a GPU tensor syncs).
The mode sees the operations below autograd, after CompositeImplicit decompositions, so
``bool(t)`` / ``is_nonzero`` show up as the scalar read they decompose into.
"""

from __future__ import annotations

import collections
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# The kinds, with the aten packets that are always a sync (the ones whose output shape or value
# the host needs, as torch's own tags mark them: Tag.data_dependent_output / dynamic_output_shape).
ALWAYS = {
    aten._local_scalar_dense: "scalar read",  # item(), float(t), int(t), bool(t), is_nonzero
    aten.item: "scalar read",
    aten.is_nonzero: "scalar read",
    aten.equal: "scalar read",  # torch.equal and torch.allclose return a Python bool
    aten.allclose: "scalar read",
    aten.nonzero: "nonzero",
    aten.masked_select: "masked_select",
    aten._unique: "unique",
    aten._unique2: "unique",
    aten.unique_dim: "unique",
    aten.unique_consecutive: "unique",
    aten.bincount: "bincount",
}
KINDS = (
    "scalar read",
    "nonzero",
    "masked_select",
    "bool index",
    "bool index_put",
    "unique",
    "bincount",
    "repeat_interleave",
    "device to host",
)


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def sync_kind(func, args, kwargs) -> str | None:
    """The kind of host-device sync `func(*args, **kwargs)` forces on a GPU, or None."""
    packet = func.overloadpacket
    if packet in ALWAYS:
        return ALWAYS[packet]
    if packet is aten.index:  # x[mask]: the output has as many rows as mask has True entries
        return "bool index" if _has_bool_index(args[1] if len(args) > 1 else kwargs.get("indices")) else None
    if packet in (aten.index_put, aten.index_put_, aten._index_put_impl_):  # x[mask] = v: nonzero inside
        return "bool index_put" if _has_bool_index(args[1] if len(args) > 1 else kwargs.get("indices")) else None
    if func is aten.repeat_interleave.Tensor or func is aten.repeat_interleave.self_Tensor:
        # Without output_size the result's length is repeats.sum(), read on the host.
        return "repeat_interleave" if kwargs.get("output_size") is None else None
    if packet in (aten._to_copy, aten.copy_, aten._copy_from):
        return _device_to_host(packet, args, kwargs)
    return None


def _device_to_host(packet, args, kwargs) -> str | None:
    """A copy from an accelerator into CPU memory (``.cpu()``, ``.to("cpu")``, ``cpu_t.copy_(gpu_t)``)."""
    if packet is aten._to_copy:
        src, dst = args[0], kwargs.get("device")
        dst_type = torch.device(dst).type if dst is not None else src.device.type
    elif packet is aten.copy_:
        dst_type, src = args[0].device.type, args[1]
    else:
        src, dst_type = args[0], args[1].device.type
    src_type = getattr(getattr(src, "device", None), "type", "cpu")
    return "device to host" if src_type not in ("cpu", "meta") and dst_type == "cpu" else None


_HERE = __file__
_LIBRARY_PARTS = ("/torch/", "/site-packages/", "/dist-packages/", "/python3.")


def _caller() -> str:
    """file:line of the innermost frame outside torch and this module: where the sync was asked for."""
    for frame in reversed(traceback.extract_stack(sys._getframe(2))):
        name = frame.filename.replace("\\", "/")
        if name == _HERE or any(part in name for part in _LIBRARY_PARTS):
            continue
        return f"{name}:{frame.lineno}"
    return "?"


class SyncCounter(TorchDispatchMode):
    """A dispatch mode counting the operations that would force a host-device sync on a GPU.

    where=True also records, per sync, the innermost non-library frame (``sites``), at the cost of
    a stack walk per counted operation (not per operation)."""

    def __init__(self, where: bool = True):
        super().__init__()
        self.where = where
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.sites: collections.Counter[tuple[str, str]] = collections.Counter()
        self.ops = 0  # every operation seen, synced or not: a check that the mode saw the work

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        kind = sync_kind(func, args, kwargs)
        if kind is not None:
            self.by_kind[kind] += 1
            if self.where:
                self.sites[(kind, _caller())] += 1
        return func(*args, **kwargs)

    def report(self, limit: int = 12) -> str:
        """The counts and the sites that asked most, for a failing assertion's message."""
        lines = [f"{self.total} syncs in {self.ops} operations: {dict(self.by_kind)}"]
        lines += [f"  {n:5d}  {kind:16s} {site}" for (kind, site), n in self.sites.most_common(limit)]
        return "\n".join(lines)

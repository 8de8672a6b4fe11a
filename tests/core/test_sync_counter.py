"""tests/helpers/sync_counter.py counts each kind of operation that stalls a GPU, and nothing else."""

import pytest
import torch
from helpers.sync_counter import KINDS, SyncCounter

x = torch.arange(12.0).reshape(3, 4)
mask = torch.tensor([True, False, True])
rows = torch.tensor([0, 2])

SYNCING = {
    "scalar read": [
        lambda: x.sum().item(),
        lambda: float(x.max()),
        lambda: int(x.argmax()),
        lambda: bool(x.any()),  # is_nonzero
        lambda: 1 if (x > 3).all() else 0,
        lambda: torch.equal(x, x),
        lambda: torch.allclose(x, x + 1e-9),
    ],
    "nonzero": [lambda: mask.nonzero(), lambda: torch.where(mask), lambda: torch.argwhere(x > 3)],
    "masked_select": [lambda: x.masked_select(x > 3)],
    "bool index": [lambda: x[mask], lambda: x[x > 3]],
    "bool index_put": [lambda: x.clone().__setitem__(mask, 0.0), lambda: x.clone().index_put_((mask,), x[0])],
    "unique": [lambda: torch.unique(rows), lambda: torch.unique_consecutive(rows)],
    "bincount": [lambda: torch.bincount(rows)],
    "repeat_interleave": [lambda: torch.repeat_interleave(x, torch.tensor([1, 2, 1]), dim=0)],
}

SYNC_FREE = [
    lambda: x @ x.t(),
    lambda: x[rows],  # integer index tensors: the output size is the index's, known on the host
    lambda: x.index_select(0, rows),
    lambda: x.clone().index_put_((rows,), x[0]),
    lambda: torch.where(mask[:, None], x, 0.0),  # an arithmetic mask instead of boolean indexing
    lambda: x * mask[:, None],
    lambda: x.masked_fill(x > 3, 0.0),
    lambda: torch.repeat_interleave(x, torch.tensor([1, 2, 1]), dim=0, output_size=4),
    lambda: torch.repeat_interleave(x, 2, dim=0),
    lambda: x.softmax(-1).mean(dim=0),
    lambda: x.to(torch.float64).cpu(),  # CPU to CPU: no device involved
    lambda: torch.nonzero_static(mask, size=2),
]


def test_every_kind_is_exercised():
    assert set(SYNCING) | {"device to host"} == set(KINDS)


@pytest.mark.parametrize(
    "kind,op",
    [(k, op) for k, ops in SYNCING.items() for op in ops],
    ids=[f"{k}-{i}" for k, ops in SYNCING.items() for i in range(len(ops))],
)
def test_counts_each_kind_once(kind, op):
    with SyncCounter() as syncs:
        op()
    assert syncs.by_kind == {kind: 1}, syncs.report()
    ((site_kind, site),) = syncs.sites
    assert site_kind == kind and site.endswith(f"test_sync_counter.py:{op.__code__.co_firstlineno}"), site


@pytest.mark.parametrize("index", range(len(SYNC_FREE)))
def test_sync_free_code_counts_zero(index):
    with SyncCounter() as syncs:
        SYNC_FREE[index]()
    assert syncs.total == 0, syncs.report()
    assert syncs.ops > 0  # the mode saw the work


def test_counts_add_up_and_inference_mode_is_seen():
    with torch.inference_mode(), SyncCounter(where=False) as syncs:
        for _ in range(3):
            x[mask].sum().item()
    assert syncs.by_kind == {"bool index": 3, "scalar read": 3} and syncs.total == 6
    assert not syncs.sites


def test_device_to_host_copies_are_counted_on_an_accelerator():
    """No accelerator here: sync_kind reads only the copy's devices, so a stand-in with a CUDA device will do."""
    from types import SimpleNamespace

    from helpers.sync_counter import sync_kind

    aten, cpu = torch.ops.aten, torch.device("cpu")
    gpu = SimpleNamespace(device=torch.device("cuda"))
    assert sync_kind(aten._to_copy.default, (gpu,), {"device": cpu}) == "device to host"
    assert sync_kind(aten._to_copy.default, (gpu,), {"dtype": torch.float16}) is None  # stays on the device
    assert sync_kind(aten.copy_.default, (torch.empty(2), gpu), {}) == "device to host"
    assert sync_kind(aten.copy_.default, (SimpleNamespace(device=torch.device("cuda")), torch.empty(2)), {}) is None
    assert sync_kind(aten._to_copy.default, (torch.empty(2, device="meta"),), {"device": cpu}) is None
    with SyncCounter() as syncs:
        torch.empty(2).to("cpu", torch.float64)  # CPU to CPU
    assert syncs.total == 0

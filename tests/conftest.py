import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ (hostenv, helpers)
import hostenv  # noqa: E402

# mixture_core and training are imported as top-level packages by the core tests; the repo goes
# last on sys.path so that ComfyUI's own `nodes` module is never shadowed by this pack's `nodes/`.
sys.path.append(str(hostenv.REPO))

HOST, HOST_REASON = hostenv.find_host()


@pytest.fixture(scope="session")
def pack():
    """This pack, imported as ComfyUI imports a custom node package (host on sys.path first)."""
    return hostenv.import_pack()


# Fixtures that take more than ~5 s to set up (a model built, a training script run): a test
# using one is `slow` wherever it lives, so `scripts/test.sh --fast` leaves it out.
SLOW_FIXTURES = {"sdxl", "trained_experts", "micro_run"}
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each (and in the scripts they start) instead of four
    # threads that wait on each other at every barrier.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before -m/-k select on the marks added here, and xdist reads them
def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=HOST_REASON)
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if "/tests/host/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.host)
        if HOST is None and "host" in item.keywords:
            item.add_marker(skip)
    # In a worker, xdist sets option.loadgroup for `--dist loadgroup` (and option.dist to "no").
    if getattr(config.option, "loadgroup", False):
        from helpers.worker_groups import group_for_workers

        group_for_workers(items, hostenv.REPO)


def pytest_collection_finish(session):
    from helpers.fixtures import SharedSDXL

    SharedSDXL.users_left = sum("sdxl" in getattr(item, "fixturenames", ()) for item in session.items)


def pytest_runtest_teardown(item, nextitem):
    if "sdxl" in getattr(item, "fixturenames", ()):
        from helpers.fixtures import SharedSDXL

        SharedSDXL.used_by_one()


def pytest_report_header(config):
    return f"ComfyUI host: {HOST}" if HOST else f"ComfyUI host: none ({HOST_REASON})"

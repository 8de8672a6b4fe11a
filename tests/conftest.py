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
# Fixtures that hold gigabytes or take minutes to make: under pytest-xdist (scripts/test.sh runs
# two workers) every module using one runs on the same worker, so that a session fixture is made
# once. (Putting the workflow module, which loads the full SD1.5 itself, with the sd15_full users
# lowered peak memory from 17 to 15 GB but made that worker the last to finish: 7.2 min.)
SHARED_ON_ONE_WORKER = ("sd15_full", "sdxl", "trained_experts")
# The groups that take a minute or more, handed out first, so that no worker is left with one of
# them at the end while the other idles (a group is one unit of work). The two that read the full
# SD1.5 (2.1 GB) are not handed out together: read at once they took 70 s each from this disk.
LONG_GROUPS = (
    "tests/host/test_workflows_host.py",
    "tests/training/test_resume_and_launch.py",
    "sd15_full",
    "trained_experts",
    "sdxl",
    "tests/training/test_mole_finetune.py",
    "tests/training/test_moa_train.py",
)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each (and in the scripts they start) instead of four
    # threads that wait on each other at every barrier.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _module(item) -> str:
    return str(Path(str(item.fspath)).resolve().relative_to(hostenv.REPO)).replace("\\", "/")


def _worker_groups(items) -> dict[str, str]:
    """{module: xdist group}: the module itself, or the shared fixture its tests use."""
    groups = {}
    for item in items:
        module = _module(item)
        shared = [f for f in SHARED_ON_ONE_WORKER if f in getattr(item, "fixturenames", ())]
        if shared:
            groups[module] = shared[0]
        else:
            groups.setdefault(module, module)
    return groups


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
        groups = _worker_groups(items)
        for item in items:
            item.add_marker(pytest.mark.xdist_group(groups[_module(item)]))
        rank = {group: i for i, group in enumerate(LONG_GROUPS)}
        items.sort(key=lambda item: rank.get(groups[_module(item)], len(rank)))  # stable: order kept within


def pytest_collection_finish(session):
    from helpers.fixtures import SharedSDXL

    SharedSDXL.users_left = sum("sdxl" in getattr(item, "fixturenames", ()) for item in session.items)


def pytest_runtest_teardown(item, nextitem):
    if "sdxl" in getattr(item, "fixturenames", ()):
        from helpers.fixtures import SharedSDXL

        SharedSDXL.used_by_one()


def pytest_report_header(config):
    return f"ComfyUI host: {HOST}" if HOST else f"ComfyUI host: none ({HOST_REASON})"

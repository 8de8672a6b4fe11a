"""How scripts/test.sh's two pytest-xdist workers share the suite (`--dist loadgroup`): each test
gets an `xdist_group` mark, and the long groups are handed out first. Called by tests/conftest.py
in each worker; tested in tests/core/test_worker_groups.py."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    "tests/host/test_quality_host.py",  # two accelerate launches of its own (~85 s)
    "sd15_full",
    "trained_experts",
    "sdxl",
    "tests/training/test_mole_finetune.py",
    "tests/training/test_moa_train.py",
)


def _module(item, repo: Path) -> str:
    return str(Path(str(item.fspath)).resolve().relative_to(repo)).replace("\\", "/")


def _worker_groups(items, repo: Path) -> dict[str, str]:
    """{module: xdist group}: the module itself, or the shared fixture its tests use."""
    groups = {}
    for item in items:
        module = _module(item, repo)
        shared = [f for f in SHARED_ON_ONE_WORKER if f in getattr(item, "fixturenames", ())]
        if shared:
            groups[module] = shared[0]
        else:
            groups.setdefault(module, module)
    return groups


def group_for_workers(items, repo: Path) -> None:
    """Mark every item with its group and order the items so that LONG_GROUPS come first, in that
    order (a stable sort: the collection order is kept within a group)."""
    groups = _worker_groups(items, repo)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[_module(item, repo)]))
    rank = {group: i for i, group in enumerate(LONG_GROUPS)}
    items.sort(key=lambda item: rank.get(groups[_module(item, repo)], len(rank)))

"""scripts/test.sh's xdist grouping (helpers.worker_groups) on stand-in items: a module stays
whole, modules sharing a costly fixture share a group, long groups come first."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from helpers import worker_groups as wg

REPO = Path("/repo")


class Item(SimpleNamespace):
    def add_marker(self, mark):
        self.marks.append(mark)


def item(module: str, name: str, *fixtures: str) -> Item:
    return Item(fspath=REPO / module, fixturenames=list(fixtures), name=name, marks=[])


def test_modules_stay_whole_share_costly_fixtures_and_long_groups_come_first():
    items = [
        item("tests/core/test_a.py", "a1"),
        item("tests/host/test_b.py", "b1", "sd15"),
        item("tests/host/test_b.py", "b2", "sdxl"),  # one sdxl user: the whole module goes with sdxl
        item("tests/host/test_c.py", "c1", "sdxl"),
        item("tests/host/test_workflows_host.py", "w1"),
        item("tests/host/test_d.py", "d1", "sd15_full"),
        item("tests/core/test_a.py", "a2"),
    ]
    wg.group_for_workers(items, REPO)
    group = {i.name: [m.args[0] for m in i.marks if m.name == "xdist_group"] for i in items}
    assert group == {
        "a1": ["tests/core/test_a.py"],
        "a2": ["tests/core/test_a.py"],
        "b1": ["sdxl"],
        "b2": ["sdxl"],
        "c1": ["sdxl"],
        "w1": ["tests/host/test_workflows_host.py"],
        "d1": ["sd15_full"],
    }
    # LONG_GROUPS' order first (workflows, then sd15_full, then sdxl), collection order within the rest.
    assert [i.name for i in items] == ["w1", "d1", "b1", "b2", "c1", "a1", "a2"]

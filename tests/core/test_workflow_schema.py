"""Every shipped editor workflow passes the checks the ComfyUI editor runs when it opens a file
(workflows/schema.py, a port of the frontend's zod workflow schema): no "Invalid workflow against
zod schema" alert. The checker itself is shown to reject what the editor rejects."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from workflows.schema import workflow_errors  # noqa: E402

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_shipped_workflow_opens_without_schema_alert(path):
    errors = workflow_errors(json.loads(path.read_text()))
    assert not errors, f"{path.name} would open with the editor's zod alert:\n" + "\n".join(errors[:20])


def _good():
    return {
        "last_node_id": 2,
        "last_link_id": 1,
        "version": 0.4,
        "config": {},
        "groups": [],
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "links": [[1, 1, 0, 2, 0, "MODEL"]],
        "nodes": [
            {
                "id": 1,
                "type": "A",
                "pos": [0, 0],
                "size": [200, 80],
                "flags": {},
                "order": 0,
                "mode": 0,
                "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1], "slot_index": 0}],
                "properties": {"Node name for S&R": "A"},
                "widgets_values": ["x"],
            },
            {
                "id": 2,
                "type": "B",
                "pos": {"0": 300, "1": 0},
                "size": [200, 80],
                "flags": {},
                "order": 1,
                "mode": 0,
                "inputs": [{"name": "model", "type": "MODEL", "link": 1}, {"name": "w", "type": "INT", "link": None}],
                "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": None}],
                "properties": {},
            },
        ],
    }


def test_checker_accepts_a_valid_workflow():
    assert workflow_errors(_good()) == []


@pytest.mark.parametrize(
    "where, expected",
    [
        (lambda w: w.__setitem__("floatingLinks", None), 'Expected array, received null at "floatingLinks"'),
        (lambda w: w["extra"].__setitem__("reroutes", None), 'Expected array, received null at "extra.reroutes"'),
        (lambda w: w.__setitem__("definitions", None), 'Expected object, received null at "definitions"'),
        (
            lambda w: w["nodes"][0]["outputs"][0].__setitem__("slot_index", None),
            'received null at "nodes[0].outputs[0].slot_index"',
        ),
        (
            lambda w: w["nodes"][1]["inputs"][0].__setitem__("slot_index", None),
            'received null at "nodes[1].inputs[0].slot_index"',
        ),
        (lambda w: w["nodes"][0].__setitem__("flags", None), 'Expected object, received null at "nodes[0].flags"'),
        (lambda w: w["nodes"][0].__setitem__("widgets_values", None), 'received null at "nodes[0].widgets_values"'),
        (
            lambda w: w["nodes"][0]["properties"].__setitem__("Node name for S&R", None),
            'received null at "nodes[0].properties.Node name for S&R"',
        ),
        (lambda w: w["links"][0].__setitem__(2, None), 'received null at "links[0][2]"'),
        (lambda w: w.__setitem__("id", "not-a-uuid"), 'Invalid uuid at "id"'),
        (lambda w: w["nodes"][0].pop("order"), 'Required at "nodes[0].order"'),
    ],
)
def test_checker_rejects_what_the_editor_rejects(where, expected):
    workflow = copy.deepcopy(_good())
    where(workflow)
    errors = workflow_errors(workflow)
    assert any(expected in e for e in errors), errors


def test_nullable_fields_stay_allowed():
    """null is fine where the schema says nullable: input.link, output.links, config, extra."""
    workflow = _good()
    workflow["config"] = None
    workflow["extra"] = None
    assert workflow_errors(workflow) == []

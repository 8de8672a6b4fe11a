"""The checks the ComfyUI editor runs on a workflow file when it opens it, in Python.

A port of the frontend's zod schema (ComfyUI_frontend src/platform/workflow/validation/schemas/
workflowSchema.ts, as shipped in comfyui-frontend-package 1.35.x: `zComfyWorkflow` for version 0.4,
`zComfyWorkflow1` for version 1). A file that breaks one of these rules opens with the editor's
"Invalid workflow against zod schema" alert. Passthrough keys (ones the schema does not name) are
allowed, as zod's `.passthrough()` allows them; every named key is checked for its type, and
`None` (JSON null) only where the schema says `.nullable()` / `.nullish()`.

    python3 -m workflows.schema workflows/*.json
"""

from __future__ import annotations

import re
import sys

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
OPTIONAL, NULLABLE = "optional", "nullable"


class _Checker:
    def __init__(self):
        self.errors: list[str] = []

    def fail(self, path: str, message: str):
        self.errors.append(f'{message} at "{path or "(root)"}"')

    # ---- primitives (each returns False after recording an error) ----

    def number(self, v, path, integer=False):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (not integer or float(v).is_integer())
        if not ok:
            self.fail(path, f"Expected {'integer' if integer else 'number'}, received {_kind(v)}")
        return ok

    def string(self, v, path):
        if not isinstance(v, str):
            self.fail(path, f"Expected string, received {_kind(v)}")
            return False
        return True

    def boolean(self, v, path):
        if not isinstance(v, bool):
            self.fail(path, f"Expected boolean, received {_kind(v)}")

    def uuid(self, v, path):
        if self.string(v, path) and not _UUID.match(v):
            self.fail(path, "Invalid uuid")

    def node_id(self, v, path):  # z.union([z.number().int(), z.string()])
        if not (isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))):
            self.fail(path, f"Expected integer or string node id, received {_kind(v)}")

    def slot_index(self, v, path):  # int, or a string that parses as an int
        if isinstance(v, str):
            if not re.match(r"^\s*[+-]?\d", v):
                self.fail(path, "Invalid number")
        else:
            self.number(v, path, integer=True)

    def data_type(self, v, path):  # string | string[] | number
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return
        if isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            return
        self.fail(path, f"Expected string, string[] or number, received {_kind(v)}")

    def vector2(self, v, path):
        if isinstance(v, list) and len(v) == 2:
            for i, x in enumerate(v):
                self.number(x, f"{path}[{i}]")
        elif isinstance(v, dict) and "0" in v and "1" in v:
            self.number(v["0"], f"{path}.0")
            self.number(v["1"], f"{path}.1")
        else:
            self.fail(path, f"Expected [number, number], received {_kind(v)}")

    def array(self, v, path, item):
        if not isinstance(v, list):
            self.fail(path, f"Expected array, received {_kind(v)}")
            return
        for i, x in enumerate(v):
            item(x, f"{path}[{i}]")

    def obj(self, v, path, fields: dict):
        """fields: name -> (check, *flags) with flags OPTIONAL / NULLABLE."""
        if not isinstance(v, dict):
            self.fail(path, f"Expected object, received {_kind(v)}")
            return
        for name, (check, *flags) in fields.items():
            sub = f"{path}.{name}" if path else name
            if name not in v:
                if OPTIONAL not in flags:
                    self.fail(sub, "Required")
                continue
            value = v[name]
            if value is None:
                if NULLABLE not in flags:
                    check(value, sub)  # reports "Expected ..., received null"
                continue
            check(value, sub)

    # ---- workflow parts ----

    def model_file(self, v, path):
        self.obj(
            v,
            path,
            {
                "name": (self.string,),
                "url": (self.string,),
                "hash": (self.string, OPTIONAL),
                "hash_type": (self.string, OPTIONAL),
                "directory": (self.string,),
            },
        )

    def link_array(self, v, path):  # [id, origin_id, origin_slot, target_id, target_slot, type]
        if not isinstance(v, list) or len(v) != 6:
            self.fail(path, f"Expected a 6-item link array, received {_kind(v)}")
            return
        self.number(v[0], f"{path}[0]")
        self.node_id(v[1], f"{path}[1]")
        self.slot_index(v[2], f"{path}[2]")
        self.node_id(v[3], f"{path}[3]")
        self.slot_index(v[4], f"{path}[4]")
        self.data_type(v[5], f"{path}[5]")

    def link_object(self, v, path):
        self.obj(
            v,
            path,
            {
                "id": (self.number,),
                "origin_id": (self.node_id,),
                "origin_slot": (self.slot_index,),
                "target_id": (self.node_id,),
                "target_slot": (self.slot_index,),
                "type": (self.data_type,),
                "parentId": (self.number, OPTIONAL),
            },
        )

    def reroute(self, v, path):
        self.obj(
            v,
            path,
            {
                "id": (self.number,),
                "parentId": (self.number, OPTIONAL),
                "pos": (self.vector2,),
                "linkIds": (lambda x, p: self.array(x, p, self.number), OPTIONAL, NULLABLE),
                "floating": (lambda x, p: self.obj(x, p, {"slotType": (self.slot_type,)}), OPTIONAL),
            },
        )

    def slot_type(self, v, path):
        if v not in ("input", "output"):
            self.fail(path, "Expected 'input' | 'output'")

    def node_input(self, v, path):
        self.obj(
            v,
            path,
            {
                "name": (self.string,),
                "type": (self.data_type,),
                "link": (self.number, OPTIONAL, NULLABLE),
                "slot_index": (self.slot_index, OPTIONAL),
            },
        )

    def node_output(self, v, path):
        self.obj(
            v,
            path,
            {
                "name": (self.string,),
                "type": (self.data_type,),
                "links": (lambda x, p: self.array(x, p, self.number), OPTIONAL, NULLABLE),
                "slot_index": (self.slot_index, OPTIONAL),
            },
        )

    def flags(self, v, path):
        self.obj(
            v,
            path,
            {
                k: (self.boolean, OPTIONAL)
                for k in ("collapsed", "pinned", "allow_interaction", "horizontal", "skip_repeated_outputs")
            },
        )

    def properties(self, v, path):
        self.obj(
            v,
            path,
            {
                "Node name for S&R": (self.string, OPTIONAL),
                "cnr_id": (self.string, OPTIONAL),
                "aux_id": (self.string, OPTIONAL),
                "ver": (self.string, OPTIONAL),
                "models": (lambda x, p: self.array(x, p, self.model_file), OPTIONAL),
            },
        )

    def widgets_values(self, v, path):
        if not isinstance(v, (list, dict)):
            self.fail(path, f"Expected array or object, received {_kind(v)}")

    def node(self, v, path):
        self.obj(
            v,
            path,
            {
                "id": (self.node_id,),
                "type": (self.string,),
                "pos": (self.vector2,),
                "size": (self.vector2,),
                "flags": (self.flags,),
                "order": (self.number,),
                "mode": (self.number,),
                "inputs": (lambda x, p: self.array(x, p, self.node_input), OPTIONAL),
                "outputs": (lambda x, p: self.array(x, p, self.node_output), OPTIONAL),
                "properties": (self.properties,),
                "widgets_values": (self.widgets_values, OPTIONAL),
                "color": (self.string, OPTIONAL),
                "bgcolor": (self.string, OPTIONAL),
            },
        )

    def group(self, v, path):
        def bounding(x, p):
            if not (isinstance(x, list) and len(x) == 4):
                self.fail(p, f"Expected [number x4], received {_kind(x)}")
                return
            for i, n in enumerate(x):
                self.number(n, f"{p}[{i}]")

        self.obj(
            v,
            path,
            {
                "id": (self.number, OPTIONAL),
                "title": (self.string,),
                "bounding": (bounding,),
                "color": (self.string, OPTIONAL),
                "font_size": (self.number, OPTIONAL),
                "locked": (self.boolean, OPTIONAL),
            },
        )

    def extra(self, v, path):
        self.obj(
            v,
            path,
            {
                "ds": (lambda x, p: self.obj(x, p, {"scale": (self.number,), "offset": (self.vector2,)}), OPTIONAL),
                "frontendVersion": (self.string, OPTIONAL),
                "linkExtensions": (
                    lambda x, p: self.array(
                        x, p, lambda e, q: self.obj(e, q, {"id": (self.number,), "parentId": (self.number,)})
                    ),
                    OPTIONAL,
                ),
                "reroutes": (lambda x, p: self.array(x, p, self.reroute), OPTIONAL),
                "workflowRendererVersion": (self.renderer, OPTIONAL),
            },
        )

    def renderer(self, v, path):
        if v not in ("LG", "Vue"):
            self.fail(path, "Expected 'LG' | 'Vue'")

    def config(self, v, path):
        self.obj(v, path, {"links_ontop": (self.boolean, OPTIONAL), "align_to_grid": (self.boolean, OPTIONAL)})

    def definitions(self, v, path):
        # Subgraph definitions are checked for shape only (this pack ships none).
        self.obj(v, path, {"subgraphs": (lambda x, p: self.array(x, p, lambda s, q: self.obj(s, q, {})),)})

    def workflow(self, v):
        common = {
            "id": (self.uuid, OPTIONAL),
            "revision": (self.number, OPTIONAL),
            "config": (self.config, OPTIONAL, NULLABLE),
            "extra": (self.extra, OPTIONAL, NULLABLE),
            "nodes": (lambda x, p: self.array(x, p, self.node),),
            "floatingLinks": (lambda x, p: self.array(x, p, self.link_object), OPTIONAL),
            "groups": (lambda x, p: self.array(x, p, self.group), OPTIONAL),
            "models": (lambda x, p: self.array(x, p, self.model_file), OPTIONAL),
            "definitions": (self.definitions, OPTIONAL),
            "subgraphs": (lambda x, p: self.array(x, p, lambda s, q: self.obj(s, q, {})), OPTIONAL),
        }
        if not isinstance(v, dict) or not isinstance(v.get("version"), (int, float)) or isinstance(v["version"], bool):
            self.fail("version", "Workflow does not contain a valid version")
            return
        if v["version"] == 1:
            state = {k: (self.number,) for k in ("lastGroupId", "lastNodeId", "lastLinkId", "lastRerouteId")}
            self.obj(
                v,
                "",
                common
                | {
                    "state": (lambda x, p: self.obj(x, p, state),),
                    "links": (lambda x, p: self.array(x, p, self.link_object), OPTIONAL),
                    "reroutes": (lambda x, p: self.array(x, p, self.reroute), OPTIONAL),
                },
            )
        else:  # 0.4 and anything older
            self.obj(
                v,
                "",
                common
                | {
                    "last_node_id": (self.node_id,),
                    "last_link_id": (self.number,),
                    "version": (self.number,),
                    "links": (lambda x, p: self.array(x, p, self.link_array),),
                },
            )


def _kind(v) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(v), type(v).__name__
    )


def workflow_errors(workflow) -> list[str]:
    """The reasons the editor would reject this workflow (empty: it opens without the alert)."""
    checker = _Checker()
    checker.workflow(workflow)
    return checker.errors


def main(argv=None):
    import json

    bad = 0
    for name in argv if argv is not None else sys.argv[1:]:
        with open(name) as f:
            errors = workflow_errors(json.load(f))
        bad += bool(errors)
        for e in errors[:20]:
            print(f"{name}: {e}")
        if len(errors) > 20:
            print(f"{name}: ... {len(errors) - 20} more")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()

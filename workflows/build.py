"""Write the shipped workflow files from workflows/graphs.py (a maintainer's tool).

    python3 -m workflows.build [--api-only] [--only NAME ...] [--port 8199] [--templates-shot PNG]

1. workflows/api/<file>.json: each graph in API format (<file>: the file the graph names).
2. workflows/<file>.json and docs/workflows/<name>.png: the editor's own format and a screenshot
   of the graph, made by the real frontend: a ComfyUI with this pack is started on
   127.0.0.1:PORT, headless Chromium (Playwright, /usr/bin/chromium) loads each API graph with
   the editor's "load API workflow" path, which creates and arranges the nodes; each loader gets
   the download entries of its files (properties.models: the missing-models dialog) and each
   node the pack identification ComfyUI-Manager writes (cnr_id, aux_id, ver); the graph gets a
   Markdown note naming the files it needs, and is saved as the editor saves it.
3. workflows/<file>.jpg: the template browser's card picture, a title card (cards.py).
4. Checks in that browser (browser_checks.py): every file opens without alert or toast; opened
   with no model files, each shows the missing-models dialog listing its downloads; each of the
   pack's nodes, added by hand, shows its widget labels whole; and (full builds) the template
   browser shows the pack's cards in order, titled, with their pictures, each opening cleanly.

Needs `pip install playwright` and Debian's chromium (`apt-get install chromium`), plus the host.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .browser_checks import (
    PACK,
    check_files_open_cleanly,
    check_hand_added_labels,
    check_missing_models,
    check_template_browser,
    open_editor,
    set_setting,
)
from .cards import write_card
from .catalogue import pack_identity
from .graphs import all_graphs
from .schema import workflow_errors

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
API_DIR = HERE / "api"
SHOTS = REPO / "docs" / "workflows"


def write_api(only=None) -> list:
    API_DIR.mkdir(exist_ok=True)
    graphs = [g for g in all_graphs() if not only or g.name in only]
    unknown = sorted(set(only or ()) - {g.name for g in graphs})
    if unknown:
        raise SystemExit(f"error: no workflow named {', '.join(unknown)}")
    for g in graphs:
        (API_DIR / f"{g.file_stem}.json").write_text(json.dumps(g.nodes, indent=2) + "\n")
    if not only:  # a renamed graph leaves no stale template behind (ComfyUI lists every workflows/*.json)
        named = {g.file_stem for g in graphs}
        for stale in [*HERE.glob("*.json"), *HERE.glob("*.jpg"), *API_DIR.glob("*.json")]:
            if stale.stem not in named:
                stale.unlink()
    return graphs


def start_comfyui(port: int, workdir: Path) -> subprocess.Popen:
    import comfyui_host

    host, reason = comfyui_host.find_host()
    if host is None:
        raise SystemExit(f"error: {reason}")
    custom = workdir / "custom_nodes"
    custom.mkdir()
    (workdir / "user").mkdir()
    (custom / PACK).symlink_to(REPO)
    yaml = workdir / "extra.yaml"
    yaml.write_text(f"build:\n  base_path: {workdir}\n  custom_nodes: custom_nodes\n")
    log = open(workdir / "comfyui.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--extra-model-paths-config",
            str(yaml),
            "--disable-auto-launch",
            "--user-directory",
            str(workdir / "user"),
        ],
        cwd=host,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info/MoA_SubjectInject", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"ComfyUI exited; see {workdir / 'comfyui.log'}") from None
            time.sleep(1)
    proc.kill()
    raise SystemExit("ComfyUI did not start in 4 minutes")


LOAD_GRAPH = """
async ([api, note, name, PACK, models, pack, core]) => {
  const app = window.comfyAPI.app.app;
  await app.loadApiJson(api, name + ".json");
  const nodes = app.graph._nodes;
  for (const n of nodes) {
    // The figures compare images at one seed: keep it fixed when the graph is queued again.
    for (const w of n.widgets ?? []) if (w.name === "control_after_generate") w.value = "fixed";
    // What ComfyUI-Manager writes on a node of a pack it knows (the pack: cnr_id, aux_id, ver; core
    // nodes: comfy-core and ComfyUI's version), so a shared graph's missing nodes resolve.
    const module = n.constructor.nodeData?.python_module ?? "";
    if (module.startsWith("custom_nodes.")) Object.assign(n.properties, pack);
    else if (module) Object.assign(n.properties, core);
    if (models[n.id]?.length) n.properties.models = models[n.id];  // the missing-models dialog's downloads
  }
  // Widen nodes whose widgets would show a cut label ("ex… file.safetensors"), with the function
  // the pack's extension (web/fit_labels.js) uses for its own nodes (web/labels.js), then lay the
  // graph out again.
  const { fitLabels } = await import(`/extensions/${PACK}/labels.js`);
  let widened = false;
  for (const n of nodes) widened = fitLabels(n) || widened;
  if (widened) app.graph.arrange();
  let minX = Infinity, minY = Infinity;
  for (const n of nodes) { minX = Math.min(minX, n.pos[0]); minY = Math.min(minY, n.pos[1]); }
  const memo = LiteGraph.createNode("MarkdownNote");
  memo.widgets[0].value = note;
  memo.title = "About this workflow";
  memo.size = [520, 420];
  app.graph.add(memo);
  memo.pos = [minX - 560, minY];
  const ds = app.canvas.ds;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of app.graph._nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  // Leave room for the editor's side bar (left) and tab bar and Run button (top).
  const w = app.canvas.canvas.width - 140, h = app.canvas.canvas.height - 160;
  ds.scale = Math.min(w / (x1 - x0), h / (y1 - y0), 1.0);
  ds.offset = [-x0 + 100 / ds.scale, -y0 + 110 / ds.scale];
  app.canvas.setDirty(true, true);
  // Saved as the editor saves a file (JSON.stringify): keys whose value is undefined are left
  // out. Handing the object to Python instead turns them into null, which the editor's schema
  // refuses on opening (floatingLinks, extra.reroutes, definitions, slot_index, ...).
  return JSON.stringify(app.graph.serialize());
}
"""


def quiet_editor(port: int) -> None:
    """Editor settings for clean screenshots: no first-run templates dialog, no minimap, text at any zoom."""
    set_setting(port, "Comfy.TutorialCompleted", True)
    set_setting(port, "Comfy.Minimap.Visible", False)
    set_setting(port, "Comfy.Workflow.ShowMissingModelsWarning", False)  # browser_checks turns it on
    set_setting(port, "LiteGraph.Canvas.MinFontSizeForLOD", 0)  # node text drawn at any zoom (screenshots)


def check_template_listing(graphs, port: int) -> None:
    """ComfyUI's template browser lists this pack's workflows (top-level workflows/*.json)."""
    listing = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/workflow_templates", timeout=10))
    listed = set(listing.get(PACK, []))
    expected = {g.file_stem for g in graphs}
    if listed != expected:
        raise SystemExit(f"template browser lists {sorted(listed)}, expected {sorted(expected)}")
    print(f"template browser lists the {len(listed)} workflows")


def build_ui(graphs, port: int, templates_shot: Path | None = None) -> None:
    from playwright.sync_api import sync_playwright

    quiet_editor(port)
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser, page = open_editor(p, port)
        identity = pack_identity()
        core = {"cnr_id": "comfy-core", "ver": comfyui_version(port)}
        for g in graphs:
            models = {node_id: g.models(node_id) for node_id in g.nodes}
            ui = json.loads(page.evaluate(LOAD_GRAPH, [g.nodes, g.note(), g.file_stem, PACK, models, identity, core]))
            errors = workflow_errors(ui)
            if errors:
                raise SystemExit(f"{g.name}: the saved graph breaks the editor's schema: {errors[:5]}")
            page.wait_for_timeout(1500)
            (HERE / f"{g.file_stem}.json").write_text(json.dumps(ui, indent=2) + "\n")
            page.screenshot(path=str(SHOTS / f"{g.name}.png"))
            write_card(g, HERE / f"{g.file_stem}.jpg")
            print(f"{g.name}: {len(ui['nodes'])} nodes")
        check_files_open_cleanly(page, graphs)
        check_missing_models(page, graphs)
        check_hand_added_labels(page, port)
        if len(graphs) == len(all_graphs()):  # the browser lists every shipped workflow
            check_template_browser(page, port, graphs, templates_shot)
        browser.close()


def comfyui_version(port: int) -> str:
    stats = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=10))
    return stats["system"]["comfyui_version"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-only", action="store_true")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="build only these workflows (the others' files stay as they are)"
    )
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--templates-shot", type=Path, metavar="PNG", help="save a screenshot of the template browser")
    args = parser.parse_args()
    graphs = write_api(args.only)
    print(f"{len(graphs)} API workflows in {API_DIR}")
    if args.api_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_comfyui(args.port, Path(tmp))
        try:
            build_ui(graphs, args.port, args.templates_shot)
            check_template_listing(all_graphs() if args.only else graphs, args.port)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

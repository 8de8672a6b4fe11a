"""Write the shipped workflow files from workflows/graphs.py (a maintainer's tool).

    python3 -m workflows.build [--api-only] [--only NAME ...] [--port 8199]

1. workflows/api/<name>.json: each graph in API format.
2. workflows/<name>.json and docs/workflows/<name>.png: the editor's own format and a
   screenshot of the graph, made by the real frontend: a ComfyUI with this pack is started on
   127.0.0.1:PORT, headless Chromium (Playwright, /usr/bin/chromium) loads each API graph
   with the editor's "load API workflow" path, which creates and arranges the nodes; the
   graph gets a Markdown note naming the files it needs, and is saved as the editor saves it.

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
        (API_DIR / f"{g.name}.json").write_text(json.dumps(g.nodes, indent=2) + "\n")
    return graphs


def start_comfyui(port: int, workdir: Path) -> subprocess.Popen:
    import comfyui_host

    host, reason = comfyui_host.find_host()
    if host is None:
        raise SystemExit(f"error: {reason}")
    custom = workdir / "custom_nodes"
    custom.mkdir()
    (workdir / "user").mkdir()
    (custom / "ComfyUI-MoLE-MoA").symlink_to(REPO)
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
async ([api, note, name]) => {
  const app = window.comfyAPI.app.app;
  await app.loadApiJson(api, name + ".json");
  const nodes = app.graph._nodes;
  // The figures compare images at one seed: keep it fixed when the graph is queued again.
  for (const n of nodes) for (const w of n.widgets ?? []) if (w.name === "control_after_generate") w.value = "fixed";
  // Widen nodes whose widgets would show a cut label ("ex... file.safetensors"): label and value
  // both fit, then lay the graph out again with the new widths.
  // Measured in a font a little larger than the widgets' own, so that the estimate errs wide.
  const ctx = app.canvas.ctx;
  ctx.save();
  ctx.font = "14px Arial";
  let widened = false;
  for (const n of nodes) {
    for (const w of n.widgets ?? []) {
      if (typeof w.value !== "string" || w.type === "customtext" || w.options?.multiline) continue;
      const label = w.label ?? w.name;
      const need = ctx.measureText(label).width + ctx.measureText(w.value).width + 100;
      if (need > n.size[0]) { n.setSize([Math.min(need, 640), n.size[1]]); widened = true; }
    }
  }
  ctx.restore();
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
  // Where the graph is on the page, for the template browser's card picture.
  const r = app.canvas.canvas.getBoundingClientRect();
  const box = [x0, y0, x1, y1].map((v, i) => (i % 2 ? r.top : r.left) + (v + ds.offset[i % 2]) * ds.scale);
  return JSON.stringify({workflow: app.graph.serialize(), box});
}
"""

# Opens a saved file as the editor opens a file from disk (schema check included); answers the
# texts of any toast or alert the editor shows.
OPEN_FILE = """
async ([workflow, name]) => {
  const app = window.comfyAPI.app.app;
  for (const el of document.querySelectorAll('.p-toast-message')) el.remove();
  await app.loadGraphData(workflow, true, true, name);
  await new Promise((r) => setTimeout(r, 800));
  const shown = document.querySelectorAll('.p-toast-message, [role=alert]');
  return [...shown].map((e) => e.innerText.trim()).filter(Boolean);
}
"""


def quiet_editor(port: int) -> None:
    """Editor settings for clean screenshots: no first-run templates dialog, no minimap."""
    for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False)):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/settings/{key}",
            data=json.dumps(value).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10)


def check_template_listing(graphs, port: int) -> None:
    """ComfyUI's template browser lists this pack's workflows (top-level workflows/*.json)."""
    listing = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/workflow_templates", timeout=10))
    listed = set(listing.get("ComfyUI-MoLE-MoA", []))
    expected = {g.name for g in graphs}
    if listed != expected:
        raise SystemExit(f"template browser lists {sorted(listed)}, expected {sorted(expected)}")
    print(f"template browser lists the {len(listed)} workflows")


def build_ui(graphs, port: int) -> None:
    from playwright.sync_api import sync_playwright

    quiet_editor(port)
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 2200, "height": 1300})
        page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
        page.wait_for_function(
            "window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app.graph", timeout=120000
        )
        page.wait_for_timeout(3000)
        page.keyboard.press("Escape")  # the first-run templates dialog
        page.wait_for_timeout(500)
        for g in graphs:
            loaded = json.loads(page.evaluate(LOAD_GRAPH, [g.nodes, g.note(), g.name]))
            ui = loaded["workflow"]
            errors = workflow_errors(ui)
            if errors:
                raise SystemExit(f"{g.name}: the saved graph breaks the editor's schema: {errors[:5]}")
            page.wait_for_timeout(1500)
            (HERE / f"{g.name}.json").write_text(json.dumps(ui, indent=2) + "\n")
            page.screenshot(path=str(SHOTS / f"{g.name}.png"))
            write_thumbnail(SHOTS / f"{g.name}.png", HERE / f"{g.name}.jpg", loaded["box"])
            print(f"{g.name}: {len(ui['nodes'])} nodes")
        check_files_open_cleanly(page, graphs)
        browser.close()


def write_thumbnail(screenshot: Path, jpg: Path, box) -> None:
    """The template browser's card picture: the graph, cut from the screenshot at its box (page
    pixels). ComfyUI serves workflows/<name>.jpg beside the file (/api/workflow_templates/<pack>/
    <name>.jpg), and that is the name the frontend asks for."""
    from PIL import Image

    with Image.open(screenshot) as image:
        x0, y0, x1, y1 = box
        margin = 20
        crop = (
            max(int(x0) - margin, 0),
            max(int(y0) - margin, 0),
            min(int(x1) + margin, image.width),
            min(int(y1) + margin, image.height),
        )
        image = image.convert("RGB").crop(crop)
        image.thumbnail((800, 800))
        image.save(jpg, quality=85)


def check_files_open_cleanly(page, graphs) -> None:
    """Each written file, opened as a user opens it, raises no alert or toast. First a copy of one
    with a null where the schema wants an array must raise the alert (the check can fail)."""
    broken = json.loads((HERE / f"{graphs[0].name}.json").read_text()) | {"floatingLinks": None}
    if not page.evaluate(OPEN_FILE, [broken, "broken"]):
        raise SystemExit("the editor showed no alert for a broken workflow: the alert check cannot see alerts")
    for g in graphs:
        shown = page.evaluate(OPEN_FILE, [json.loads((HERE / f"{g.name}.json").read_text()), g.name])
        if shown:
            raise SystemExit(f"{g.name}.json opens with an alert or toast: {shown}")
    print(f"the {len(graphs)} workflow files open without alert or toast")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-only", action="store_true")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="build only these workflows (the others' files stay as they are)"
    )
    parser.add_argument("--port", type=int, default=8199)
    args = parser.parse_args()
    graphs = write_api(args.only)
    print(f"{len(graphs)} API workflows in {API_DIR}")
    if args.api_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_comfyui(args.port, Path(tmp))
        try:
            build_ui(graphs, args.port)
            check_template_listing(all_graphs() if args.only else graphs, args.port)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

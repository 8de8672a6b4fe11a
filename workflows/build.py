"""Write the shipped workflow files from workflows/graphs.py (a maintainer's tool).

    python3 -m workflows.build [--api-only] [--only NAME ...] [--port 8199] [--templates-shot PNG]

1. workflows/api/<file>.json: each graph in API format (<file>: the graph's entry in graphs.FILES).
2. workflows/<file>.json, its template card picture workflows/<file>.jpg and
   docs/workflows/<name>.png: the editor's own format and a screenshot of the graph, made by the
   real frontend: a ComfyUI with this pack is started on 127.0.0.1:PORT, headless Chromium
   (Playwright, /usr/bin/chromium) loads each API graph with the editor's "load API workflow"
   path, which creates and arranges the nodes; the graph gets a Markdown note naming the files it
   needs, and is saved as the editor saves it.
3. Checks in that browser: every file opens without alert or toast; each of the pack's nodes,
   added by hand, shows its widget labels whole; and (full builds) the template browser shows the
   pack's cards in figure order, titled, with their pictures, each opening cleanly.

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
PACK = "ComfyUI-MoLE-MoA"  # the pack's folder in custom_nodes/: its name in the template browser and in URLs


def write_api(only=None) -> list:
    API_DIR.mkdir(exist_ok=True)
    graphs = [g for g in all_graphs() if not only or g.name in only]
    unknown = sorted(set(only or ()) - {g.name for g in graphs})
    if unknown:
        raise SystemExit(f"error: no workflow named {', '.join(unknown)}")
    for g in graphs:
        (API_DIR / f"{g.file_stem}.json").write_text(json.dumps(g.nodes, indent=2) + "\n")
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
async ([api, note, name, PACK]) => {
  const app = window.comfyAPI.app.app;
  await app.loadApiJson(api, name + ".json");
  const nodes = app.graph._nodes;
  // The figures compare images at one seed: keep it fixed when the graph is queued again.
  for (const n of nodes) for (const w of n.widgets ?? []) if (w.name === "control_after_generate") w.value = "fixed";
  // Widen nodes whose widgets would show a cut label ("ex… file.safetensors"), as the pack's
  // extension does for its own nodes (web/labels.js), then lay the graph out again.
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


def set_setting(port: int, key: str, value) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/settings/{key}",
        data=json.dumps(value).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=10)


def quiet_editor(port: int) -> None:
    """Editor settings for clean screenshots: no first-run templates dialog, no minimap."""
    set_setting(port, "Comfy.TutorialCompleted", True)
    set_setting(port, "Comfy.Minimap.Visible", False)


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
            loaded = json.loads(page.evaluate(LOAD_GRAPH, [g.nodes, g.note(), g.file_stem, PACK]))
            ui = loaded["workflow"]
            errors = workflow_errors(ui)
            if errors:
                raise SystemExit(f"{g.name}: the saved graph breaks the editor's schema: {errors[:5]}")
            page.wait_for_timeout(1500)
            (HERE / f"{g.file_stem}.json").write_text(json.dumps(ui, indent=2) + "\n")
            page.screenshot(path=str(SHOTS / f"{g.name}.png"))
            write_thumbnail(SHOTS / f"{g.name}.png", HERE / f"{g.file_stem}.jpg", loaded["box"])
            print(f"{g.name}: {len(ui['nodes'])} nodes")
        check_files_open_cleanly(page, graphs)
        check_hand_added_labels(page, port)
        if len(graphs) == len(all_graphs()):  # the browser lists every shipped workflow
            check_template_browser(page, port, graphs, templates_shot)
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
    broken = json.loads((HERE / f"{graphs[0].file_stem}.json").read_text()) | {"floatingLinks": None}
    if not page.evaluate(OPEN_FILE, [broken, "broken"]):
        raise SystemExit("the editor showed no alert for a broken workflow: the alert check cannot see alerts")
    for g in graphs:
        shown = page.evaluate(OPEN_FILE, [json.loads((HERE / f"{g.file_stem}.json").read_text()), g.file_stem])
        if shown:
            raise SystemExit(f"{g.file_stem}.json opens with an alert or toast: {shown}")
    print(f"the {len(graphs)} workflow files open without alert or toast")


# Opens the template browser (Workflow menu > Browse Templates) at the pack's own list (under Extensions).
OPEN_TEMPLATES = """
async (PACK) => {
  await window.comfyAPI.app.app.extensionManager.command.execute("Comfy.BrowseTemplates");
  const wait = (ms) => new Promise((r) => setTimeout(r, ms));
  const until = async (test) => { for (let i = 0; i < 100 && !test(); i++) await wait(100); return test(); };
  const item = () => [...document.querySelectorAll(".p-dialog *")]
    .find((e) => e.children.length === 0 && e.textContent.trim() === PACK);
  if (!await until(item)) return false;
  item().click();
  return until(() => document.querySelector('.p-dialog [data-testid^="template-workflow-"]'));
}
"""

# The cards shown, in order: each one's name, its title as shown and whether that fits on the card's
# one line, and its picture's width (0 if it did not load).
TEMPLATE_CARDS = """
async () => {
  const wait = (ms) => new Promise((r) => setTimeout(r, ms));
  const out = [];
  for (const card of document.querySelectorAll('.p-dialog [data-testid^="template-workflow-"]')) {
    card.scrollIntoView();  // the pictures load when they come into view
    const loaded = () => { const img = card.querySelector("img"); return img?.complete && img.naturalWidth > 0; };
    for (let i = 0; i < 100 && !loaded(); i++) await wait(100);
    const img = card.querySelector("img");
    const h3 = card.querySelector("h3");
    out.push({name: card.dataset.testid.replace("template-workflow-", ""), title: h3?.textContent.trim(),
              fits: h3 ? h3.scrollHeight <= h3.clientHeight + 1 : false, width: img?.naturalWidth ?? 0});
  }
  document.querySelector('.p-dialog [data-testid^="template-workflow-"]')?.scrollIntoView();
  return out;
}
"""

SHOWN = """() => ({dialogs: document.querySelectorAll('.p-dialog').length,
                   nodes: window.comfyAPI.app.app.graph._nodes.length,
                   shown: [...document.querySelectorAll('.p-toast-message, [role=alert]')].map((e) => e.innerText)})"""


def check_template_browser(page, port: int, graphs, shot: Path | None) -> None:
    """What a user sees in the template browser: a card per workflow, titled by its file name on one
    line, with its picture (not a placeholder), in figure order under the "A -> Z" sort; and every
    card opens its workflow with no alert or toast."""
    from PIL import Image

    set_setting(port, "Comfy.Templates.SortBy", "alphabetical")  # the browser's "A -> Z" sort
    page.reload(wait_until="networkidle")  # the editor reads the template list (and settings) once, at start
    page.wait_for_function("window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app.graph", timeout=120000)
    page.wait_for_timeout(2000)
    page.keyboard.press("Escape")
    if not page.evaluate(OPEN_TEMPLATES, PACK):
        raise SystemExit(f"the template browser shows no {PACK} templates")
    cards = page.evaluate(TEMPLATE_CARDS)
    if shot:
        page.wait_for_timeout(2000)  # the pictures scrolled back into view load again
        page.screenshot(path=str(shot))
    expected = [g.file_stem for g in graphs]
    if [c["name"] for c in cards] != expected:
        raise SystemExit(f"template browser, sorted A -> Z, shows {[c['name'] for c in cards]}, expected {expected}")
    for card in cards:
        with Image.open(HERE / f"{card['name']}.jpg") as jpg:
            width = jpg.width
        if card["title"] != card["name"] or not card["fits"] or card["width"] != width:
            raise SystemExit(f"template card {card}: expected its title whole on one line and its {width} px picture")
    for g in graphs:
        page.evaluate("() => document.querySelectorAll('.p-toast-message').forEach((e) => e.remove())")
        if not page.evaluate(OPEN_TEMPLATES, PACK):
            raise SystemExit("the template browser did not open again")
        page.locator(f'[data-testid="template-workflow-{g.file_stem}"]').click()
        page.wait_for_timeout(1500)
        nodes = len(json.loads((HERE / f"{g.file_stem}.json").read_text())["nodes"])
        state = page.evaluate(SHOWN)
        if state != {"dialogs": 0, "nodes": nodes, "shown": []}:
            raise SystemExit(f"opening the template {g.file_stem!r}: {state}, expected {nodes} nodes and no alert")
    print(f"template browser: the {len(cards)} cards in order, titled, with their pictures; each opens cleanly")


# Adds each node type as a user does (LiteGraph.createNode + graph.add, what the node library and
# search do), gives each widget the longest value the shipped graphs give it (as a user picks a
# file: setValue), draws the node at 100% and answers the widget labels that were not drawn whole
# (LiteGraph cuts a label that does not fit to "…"). With shrink, the node is first set back to
# LiteGraph's own default size (what it would be without the pack's web/fit_labels.js).
CUT_LABELS = """
async ([types, values, shrink]) => {
  const app = window.comfyAPI.app.app;
  const canvas = app.canvas, proto = CanvasRenderingContext2D.prototype, fillText = proto.fillText;
  const cut = [];
  for (const type of types) {
    app.graph.clear();
    const node = LiteGraph.createNode(type);
    app.graph.add(node);
    for (const w of node.widgets ?? []) {
      const value = values[type]?.[w.name];
      if (value !== undefined) w.setValue(value, {node, canvas});
    }
    if (shrink) node.setSize(node.computeSize());
    canvas.ds.scale = 1;
    canvas.ds.offset = [0, 0];
    node.pos = [100, 100];
    const drawn = new Set();
    proto.fillText = function (text, ...rest) { drawn.add(String(text)); return fillText.call(this, text, ...rest); };
    try { canvas.draw(true, true); } finally { proto.fillText = fillText; }
    for (const w of node.widgets ?? []) {
      if (w.element || w.options?.multiline || !node.isWidgetVisible(w)) continue;
      const label = w.label || w.name;
      if (!drawn.has(label)) cut.push(`${type}: ${label} = ${w.value} at ${Math.round(node.size[0])} px`);
    }
  }
  app.graph.clear();
  return cut;
}
"""


def check_hand_added_labels(page, port: int) -> None:
    """Each of the pack's nodes, added by hand at its default size, shows every widget label whole
    (first shown to see a cut label at LiteGraph's own default width)."""
    info = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info", timeout=30))
    types = sorted(t for t, d in info.items() if d.get("python_module", "").split(".")[-1] == PACK)
    values = {}
    for g in all_graphs():
        for node in g.nodes.values():
            for key, value in node["inputs"].items():
                if not isinstance(value, list):  # a link
                    known = values.setdefault(node["class_type"], {})
                    known[key] = max(known.get(key, value), value, key=lambda v: len(str(v)))
    if not page.evaluate(CUT_LABELS, [types, values, True]):
        raise SystemExit("no label is cut at LiteGraph's default width: the label check cannot see cut labels")
    cut = page.evaluate(CUT_LABELS, [types, values, False])
    if cut:
        raise SystemExit("widget labels cut on nodes added by hand:\n" + "\n".join(cut))
    print(f"the {len(types)} nodes, added by hand, show every widget label whole")


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

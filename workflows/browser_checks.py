"""What a user sees in the editor, checked in headless Chromium against the built files: each file
opens without alert or toast; opened with no model files, a workflow shows the missing-models
dialog listing its downloads; the template browser shows the pack's cards in order, titled, with
their pictures, each opening cleanly; and each of the pack's nodes, added by hand, shows its widget
labels whole."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from .graphs import all_graphs

HERE = Path(__file__).resolve().parent
PACK = "ComfyUI-MoLE-MoA"  # the pack's folder in custom_nodes/: its name in the template browser and in URLs


def set_setting(port: int, key: str, value) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/settings/{key}",
        data=json.dumps(value).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=10)


def open_editor(playwright, port: int):
    """Headless Chromium (Debian's) on the editor of the ComfyUI at PORT, ready: (browser, page)."""
    browser = playwright.chromium.launch(
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
    page.wait_for_function("window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app.graph", timeout=120000)
    page.wait_for_timeout(3000)
    page.keyboard.press("Escape")  # the first-run templates dialog
    page.wait_for_timeout(500)
    return browser, page


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


# Opens a file with the missing-models warning on (the build keeps it off for clean screenshots)
# and answers what the dialog lists: each missing file ("folder / name") and how it is offered:
# "download" (a Download button), "refused" (the dialog's error that it downloads only
# .safetensors/.sft, shown for a .bin, whose URL is still there to copy); null when no dialog opened.
MISSING_MODELS = """
async ([workflow, name]) => {
  const app = window.comfyAPI.app.app;
  const wait = (ms) => new Promise((r) => setTimeout(r, ms));
  const setting = app.extensionManager.setting;
  await setting.set("Comfy.Workflow.ShowMissingModelsWarning", true);
  try {
    await app.loadGraphData(workflow, true, true, name);
    let dialog;
    for (let i = 0; i < 30 && !dialog; i++) {
      await wait(100);
      dialog = [...document.querySelectorAll(".p-dialog")].find((d) => d.innerText.includes("Missing Models"));
    }
    if (!dialog) return null;
    const listed = [...dialog.querySelectorAll(".p-listbox-option, li")].map((row) => ({
      text: row.innerText.split("\\n")[0].trim(),
      offered: row.querySelector(".p-message-error") ? "refused"
        : [...row.querySelectorAll("button")].some((b) => b.innerText.trim().startsWith("Download")) ? "download" : "",
    }));
    dialog.querySelector("button[aria-label=Close], .p-dialog-close-button")?.click();
    await wait(300);
    return listed;
  } finally {
    await setting.set("Comfy.Workflow.ShowMissingModelsWarning", false);
  }
}
"""


def check_missing_models(page, graphs) -> None:
    """Each file, opened in a ComfyUI with no model files, shows the missing-models dialog listing
    every file it names that has a download, with a Download button (a .bin: with the dialog's
    error that it downloads only .safetensors/.sft, and its URL to copy); first the same file
    without its download entries must show no such list (the check can fail)."""
    for g in graphs:
        workflow = json.loads((HERE / f"{g.file_stem}.json").read_text())
        expected = {
            f"{f.folder} / {f.name}": "refused" if f.name.endswith(".bin") else "download" for f in g.files if f.url
        }
        if not expected:
            continue
        stripped = json.loads(json.dumps(workflow))
        for node in stripped["nodes"]:
            node["properties"].pop("models", None)
        if page.evaluate(MISSING_MODELS, [stripped, g.file_stem]):
            raise SystemExit(f"{g.file_stem}: the missing-models dialog lists files with no download entries")
        listed = page.evaluate(MISSING_MODELS, [workflow, g.file_stem]) or []
        shown = {row["text"]: row["offered"] for row in listed if row["text"]}
        if shown != expected:
            raise SystemExit(f"{g.file_stem}: the missing-models dialog lists {shown}, expected {expected}")
    print("each workflow opened with no model files lists its downloads in the missing-models dialog")


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

# The cards shown, in order: each one's name, its title and description as shown and whether each
# is whole (not cut to "..."), and its picture's width (0 if it did not load).
TEMPLATE_CARDS = """
async () => {
  const wait = (ms) => new Promise((r) => setTimeout(r, ms));
  const out = [];
  for (const card of document.querySelectorAll('.p-dialog [data-testid^="template-workflow-"]')) {
    card.scrollIntoView();  // the pictures load when they come into view
    const loaded = () => { const img = card.querySelector("img"); return img?.complete && img.naturalWidth > 0; };
    for (let i = 0; i < 100 && !loaded(); i++) await wait(100);
    const img = card.querySelector("img");
    const h3 = card.querySelector("h3"), p = card.querySelector("p");
    const whole = (e) => (e ? e.scrollHeight <= e.clientHeight + 1 && e.scrollWidth <= e.clientWidth + 1 : false);
    out.push({name: card.dataset.testid.replace("template-workflow-", ""), title: h3?.textContent.trim(),
              fits: whole(h3), description: p?.textContent.trim(), described: whole(p),
              width: img?.naturalWidth ?? 0});
  }
  document.querySelector('.p-dialog [data-testid^="template-workflow-"]')?.scrollIntoView();
  return out;
}
"""

SHOWN = """() => ({dialogs: document.querySelectorAll('.p-dialog').length,
                   nodes: window.comfyAPI.app.app.graph._nodes.length,
                   shown: [...document.querySelectorAll('.p-toast-message, [role=alert]')].map((e) => e.innerText)})"""


def check_template_browser(page, port: int, graphs, shot: Path | None) -> None:
    """What a user sees in the template browser: a card per workflow, titled by its file name (whole
    on one line, or whole in the description under it), with its picture (not a placeholder), in
    figure order under the "A -> Z" sort; and every card opens its workflow with no alert or toast."""
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
        # A long title is cut to one line; the description under it (the frontend's: the file name
        # again, "-" and "_" left out) then shows it whole.
        words = card["name"].replace("-", " ").replace("_", " ").split()
        readable = card["fits"] or (card["described"] and (card["description"] or "").split() == words)
        if card["title"] != card["name"] or not readable or card["width"] != width:
            raise SystemExit(
                f"template card {card}: expected its title (or description) whole and its {width} px picture"
            )
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

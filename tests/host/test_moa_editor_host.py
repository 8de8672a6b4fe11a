"""What a user sees of the MoA and Maps nodes in the editor: one message per mistake when a prompt
is queued; in headless Chromium against a running ComfyUI, whole titles on freshly added pack nodes
and Maps nodes whose pictures stay inside them after a run (not over the nodes below)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
from pathlib import Path

import hostenv
import pytest

REPO = hostenv.REPO


@pytest.fixture(scope="module")
def registered(pack):
    import nodes

    extension = asyncio.run(pack.comfy_entrypoint())
    for node in asyncio.run(extension.get_node_list()):
        nodes.NODE_CLASS_MAPPINGS.setdefault(node.GET_SCHEMA().node_id, node)


@pytest.mark.parametrize(
    "inject,part",
    [
        (dict(subject_words="dog"), "'dog' is not a word of the prompt"),
        (dict(subject_weights="1, 1"), "2 weights for 1 subjects"),
        (dict(strength=1.5), "strength must be in [0, 1]"),
    ],
)
def test_a_mistake_is_one_message(registered, inject, part):
    """ComfyUI reports a message validate_inputs returns once per argument (ten times for MoA Subject
    Inject); the node's mistakes come once, on the node, before anything runs."""
    import execution

    inputs = dict(
        model=["1", 0],
        moa=["2", 0],
        clip=["1", 1],
        text="a man dancing",
        subject_words="man",
        image_1=["3", 0],
        subject_weights="1.0",
        strength=1.0,
        start_percent=0.0,
        end_percent=1.0,
    )
    inputs.update(inject)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "missing.safetensors"}},
        "2": {"class_type": "MoA_LoadRouter", "inputs": {"moa_name": "pytorch_model.bin"}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "4": {"class_type": "MoA_SubjectInject", "inputs": inputs},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 1]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "seed": 0,
                "steps": 1,
                "cfg": 2.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["4", 1],
                "negative": ["5", 0],
                "latent_image": ["6", 0],
                "denoise": 1.0,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    valid, _, _, node_errors = asyncio.run(execution.validate_prompt("one", prompt, None))
    assert not valid
    errors = node_errors["4"]["errors"]
    assert len(errors) == 1 and part in errors[0]["details"], errors
    # What the editor lists: every node's errors (the checkpoint loader's own are about its file).
    shown = [e["details"] for entry in node_errors.values() for e in entry["errors"]]
    assert sum(part in details for details in shown) == 1, shown


# ---- in the browser ------------------------------------------------------------------------------

FRESH_NODES = """
async () => {
  const app = window.comfyAPI.app.app;
  app.graph.clear();
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = app.canvas.title_text_font;
  const ids = Object.keys(LiteGraph.registered_node_types).filter((t) => /^(MoLE|MoA)_/.test(t)).sort();
  const out = [];
  const column = [60, 60, 60, 60];  // four columns, each node below the previous one
  for (const [i, id] of ids.entries()) {
    const n = LiteGraph.createNode(id);
    n.pos = [60 + (i % 4) * 460, column[i % 4]];
    app.graph.add(n);
    column[i % 4] += n.size[1] + 60;
    out.push({id, title: n.title, width: n.size[0],
              titleFits: ctx.measureText(n.title).width <= n.size[0] - 2 * LiteGraph.NODE_TITLE_HEIGHT});
  }
  app.canvas.ds.scale = 0.75; app.canvas.ds.offset = [60, 40];  // above LiteGraph's low-quality zoom
  app.canvas.setDirty(true, true);
  return out;
}
"""

# Two Maps nodes, each with a node right below it as a user or the graph arranger places them; then
# what the server sends after a run (the "executed" message with the pictures the node saved).
AFTER_A_RUN = """
async ([plot, map]) => {
  const app = window.comfyAPI.app.app;
  const api = window.comfyAPI.api.api;
  app.graph.clear();
  const maps = {MoLE_GateMaps: [plot, map, map, map], MoA_RouterMaps: [map, map, map]};
  const placed = [];
  let x = 80;
  for (const [id, files] of Object.entries(maps)) {
    const n = LiteGraph.createNode(id);
    n.pos = [x, 60];
    app.graph.add(n);
    const below = LiteGraph.createNode("EmptyImage");
    below.pos = [x, n.pos[1] + n.size[1] + 40];
    app.graph.add(below);
    placed.push([n, files, [...n.size]]);
    x += n.size[0] + 80;
  }
  app.canvas.ds.scale = 0.8; app.canvas.ds.offset = [60, 40];
  for (const [n, files] of placed) {
    const images = files.map((filename) => ({filename, subfolder: "", type: "temp"}));
    api.dispatchCustomEvent("executed", {node: String(n.id), display_node: String(n.id), output: {images}, prompt_id: "x"});
  }
  for (let i = 0; i < 10; i++) { app.canvas.setDirty(true, true); await new Promise((r) => setTimeout(r, 300)); }
  const boxes = app.graph._nodes.map((n) => ({type: n.type, x0: n.pos[0], y0: n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT,
                                              x1: n.pos[0] + n.size[0], y1: n.pos[1] + n.size[1]}));
  const overlaps = [];
  for (const a of boxes) for (const b of boxes)
    if (a !== b && a.x0 < b.x1 && b.x0 < a.x1 && a.y0 < b.y1 && b.y0 < a.y1) overlaps.push([a.type, b.type]);
  return {overlaps, nodes: placed.map(([n, files, before]) => ({
    type: n.type, before, after: [...n.size], shown: n.imgs?.length ?? 0,
    preview: (n.widgets ?? []).some((w) => w.name === "$$canvas-image-preview"),
    // the preview widget's area: from its top to the node's bottom
    previewTop: (n.widgets ?? []).find((w) => w.name === "$$canvas-image-preview")?.y ?? null,
  }))};
}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def editor(tmp_path_factory):
    """(page, screenshot folder): headless Chromium on the editor of a ComfyUI with this pack."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("no /usr/bin/chromium")
    from PIL import Image

    import comfyui_host
    from workflows.build import quiet_editor, start_comfyui

    host, reason = comfyui_host.find_host()
    if host is None:
        pytest.skip(reason)
    work = Path(tempfile.mkdtemp(prefix="moa_editor_"))
    port = _free_port()
    proc = start_comfyui(port, work)
    temp = Path(host) / "temp"
    pictures = []
    try:
        quiet_editor(port)
        temp.mkdir(exist_ok=True)
        for name, size in ((f"moa_editor_{port}_plot.png", (512, 320)), (f"moa_editor_{port}_map.png", (512, 512))):
            Image.new("RGB", size, (200, 60, 40) if "plot" in name else (40, 90, 200)).save(temp / name)
            pictures.append(name)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            page.wait_for_function(
                "window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app.graph", timeout=120000
            )
            page.wait_for_timeout(2000)
            page.keyboard.press("Escape")
            yield page, pictures, tmp_path_factory.mktemp("screens")
            browser.close()
    finally:
        for name in pictures:
            (temp / name).unlink(missing_ok=True)
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow
def test_fresh_pack_nodes_show_their_whole_title(editor):
    page, _, screens = editor
    nodes = page.evaluate(FRESH_NODES)
    page.screenshot(path=str(screens / "fresh_nodes.png"))
    assert len(nodes) >= 10
    cut = [n for n in nodes if not n["titleFits"]]
    assert not cut, json.dumps(cut)


@pytest.mark.slow
def test_maps_pictures_stay_inside_their_node_after_a_run(editor):
    page, (plot, map_), screens = editor
    result = page.evaluate(AFTER_A_RUN, [plot, map_])
    page.screenshot(path=str(screens / "after_a_run.png"))
    for node in result["nodes"]:
        assert node["shown"] > 0 and node["preview"], node  # the pictures are in the node
        assert node["after"] == node["before"], node  # it did not grow over its neighbours
        assert node["previewTop"] is not None and node["after"][1] - node["previewTop"] >= 200, node
    assert result["overlaps"] == [], result

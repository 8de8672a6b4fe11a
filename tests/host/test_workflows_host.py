"""The shipped workflows against the real host: each editor file and its API twin agree (the
editor file converted as "Export (API)" does), every widget value fits its node, and all of
them run end to end headless through `python3 -m workflows.run --smoke` with random-weight
models of the right layouts, writing their images; the runner names missing files first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hostenv
import pytest
import torch
from helpers import mole_weights as mw
from helpers import random_models as rm
from helpers.fixtures import free_host_memory, load_sd15_full_unet, model_folders

# The two runs of the runner (a subprocess each) are slow; the checks of the files are not.

REPO = hostenv.REPO
MODEL_FOLDERS = ("checkpoints", "loras", "mole", "moa", "clip_vision", "controlnet")
sys.path.insert(0, str(REPO))
from workflows import graphs, run  # noqa: E402

# The SDXL MoLE graphs (*_sdxl) need SDXL-layout files: tests/host/test_editor_host.py covers them.
SDXL_FILES = {graphs.FILES[name] for name in graphs.SDXL_WORKFLOWS}
WORKFLOWS = sorted(p for p in (REPO / "workflows").glob("*.json") if p.stem not in SDXL_FILES)
GRAPH_OF = {stem: name for name, stem in graphs.FILES.items()}  # file -> graph name (the test ids)
IDS = [GRAPH_OF.get(p.stem, p.stem) for p in WORKFLOWS]


def make_model_root(root: Path, sd15, checkpoint: Path, controlnet: Path, fastcomposer: bool = False) -> Path:
    """Every file the workflows name, with random weights of the right layouts for `sd15`'s model,
    under the names the workflows use; and an extra_model_paths.yaml for them. FastComposer's
    pytorch_model.bin (what the MoA graphs load) is written in its own layout, which is SD1.5's
    own layers: only for the full SD1.5."""
    from PIL import Image

    for folder in (*MODEL_FOLDERS, "input"):
        (root / folder).mkdir()

    def place(entry, source):
        (root / entry.folder / entry.name).symlink_to(source)

    place(graphs.CHECKPOINT, checkpoint)
    place(graphs.OPENPOSE, controlnet)
    if fastcomposer:
        from helpers import fastcomposer_weights as fw

        state = fw.fastcomposer_state_dict(sd15.model, rm.clip_vision_vit_l14())[0]
        torch.save(state, root / graphs.FASTCOMPOSER.folder / graphs.FASTCOMPOSER.name)
    layers, kohya = mw.target_layers(sd15.model), mw.kohya_names(sd15.model, "diffusers")
    for entry, seed in ((graphs.FACE_EXPERT, 41), (graphs.HAND_EXPERT, 42), (graphs.STYLE_LORA, 43)):
        mw.write_lora(root / entry.folder / entry.name, layers, kohya, seed=seed)
    mw.write_pack_gates(root / graphs.GATES.folder / graphs.GATES.name, layers)
    images = graphs.SUBJECTS + [graphs.POSE, graphs.PHOTO_ONE, graphs.PHOTO_TWO, graphs.KEEP_PERSON]
    for i, entry in enumerate(images):
        pixels = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(i)).mul(255).byte().numpy()
        Image.fromarray(pixels).save(root / "input" / entry.name)
    yaml = root / "extra_model_paths.yaml"
    yaml.write_text(
        "workflow_tests:\n  base_path: " + str(root) + "\n" + "".join(f"  {f}: {f}\n" for f in MODEL_FOLDERS)
    )
    return root


@pytest.fixture(scope="module")
def model_root(sd15, tmp_path_factory):
    """The files for the full random SD1.5 (FastComposer's weights included). Its UNet is freed
    once they are written: the runner process loads the checkpoint itself."""
    root = tmp_path_factory.mktemp("workflow_models")
    full = load_sd15_full_unet(sd15.clip, sd15.vae, fp16_weights=True)
    make_model_root(root, full, rm.sd15_checkpoint(), rm.sd15_controlnet(), fastcomposer=True)
    del full
    free_host_memory()
    return root


@pytest.fixture(scope="module")
def small_model_root(sd15_small, tmp_path_factory):
    """The same names for the shallow SD1.5-family checkpoint (no FastComposer file: its layout is
    SD1.5's own layers), for the MoLE graphs."""
    root = tmp_path_factory.mktemp("workflow_models_small")
    return make_model_root(root, sd15_small, rm.sd15_small_checkpoint(), rm.sd15_small_controlnet())


def test_every_figure_has_a_workflow_and_an_api_twin():
    names = {g.file_stem for g in graphs.all_graphs() if g.name not in graphs.SDXL_WORKFLOWS}
    assert len(names) == 12
    assert {p.stem for p in WORKFLOWS} == names
    assert {p.stem for p in (REPO / "workflows" / "api").glob("*.json")} == names | SDXL_FILES


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_editor_file_matches_its_api_twin_and_graphs_py(path, node_classes):
    ui = json.loads(path.read_text())
    api = json.loads((REPO / "workflows" / "api" / path.name).read_text())
    converted = run.ui_to_api(ui, node_classes, path.name)  # raises if a widget count no longer fits its node
    strip = lambda prompt: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}  # noqa: E731
    assert strip(converted) == strip(api)
    source = {g.file_stem: g for g in graphs.all_graphs()}[path.stem]
    assert strip(source.nodes) == strip(api)  # the twin is what graphs.py says
    notes = [n for n in ui["nodes"] if n["type"] == "MarkdownNote"]
    assert len(notes) == 1 and all(f.name in notes[0]["widgets_values"][0] for f in source.files)


def test_no_shipped_graph_uses_a_deprecated_node(node_classes):
    """The host's own DEPRECATED flag (the editor's [DEPR] badge) on no node of any shipped graph;
    ImageBatch, which the graphs once used, has it."""
    assert node_classes["ImageBatch"].DEPRECATED
    used = {n["class_type"] for g in graphs.all_graphs() for n in g.nodes.values()}
    assert not {kind for kind in used if getattr(node_classes[kind], "DEPRECATED", False)}


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_every_value_fits_its_node(path, node_classes, model_root):
    """The host's own validation (types, ranges, combo lists) of each API twin, with every
    file it names present."""
    import asyncio

    import execution
    import folder_paths

    previous_input = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(model_root / "input"))
    try:
        with model_folders(**{f: model_root / f for f in MODEL_FOLDERS}):
            prompt = json.loads((REPO / "workflows" / "api" / path.name).read_text())
            valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
    finally:
        folder_paths.set_input_directory(previous_input)
    assert valid, (error, node_errors)
    assert len(outputs) == sum(1 for n in prompt.values() if n["class_type"] == "SaveImage")


RUNNER = [sys.executable, "-m", "workflows.run"]


def runner(*args, timeout=1200):
    return subprocess.run(
        [*RUNNER, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Run on the random SD1.5 itself: the MoA graphs (FastComposer's weights hold SD1.5's own layers).
FULL_SD15_ONLY = [REPO / "workflows" / f"{g.file_stem}.json" for g in graphs.all_graphs() if g.name.startswith("moa_")]


def start_headless(workflows, root: Path, out: Path):
    """One runner process over `workflows` at 64x64, 1 step, started (its log in out/log.txt)."""
    out.mkdir(parents=True, exist_ok=True)
    args = [
        *workflows,
        "--out",
        out / "images",
        "--smoke",
        "--extra-model-paths-config",
        root / "extra_model_paths.yaml",
        "--input-dir",
        root / "input",
        "--list-json",
        out / "images.json",
    ]
    with open(out / "log.txt", "w") as log:  # a file, not a pipe: two runners never block on a full pipe
        return subprocess.Popen([*RUNNER, *map(str, args)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def finish_headless(process, out: Path, timeout=1200) -> dict:
    """{file name: saved images} of a runner started by start_headless, once it has finished."""
    assert process.wait(timeout=timeout) == 0, (out / "log.txt").read_text()[-4000:]
    return json.loads((out / "images.json").read_text())


@pytest.mark.slow
def test_all_workflows_run_headless(model_root, small_model_root, tmp_path):
    """Every shipped SD1.5 workflow (editor files) runs end to end: the MoA graphs on the random
    SD1.5, the MoLE graphs in a second runner process on the shallow SD1.5-family model (they do
    not depend on the UNet's depth, and each UNet call costs ~20x less)."""
    assert all(p in WORKFLOWS for p in FULL_SD15_ONLY)
    others = [p for p in WORKFLOWS if p not in FULL_SD15_ONLY]
    # The two runners at once: one waits on reading the full SD1.5 while the other computes.
    full = start_headless(FULL_SD15_ONLY, model_root, tmp_path / "sd15")
    try:
        images = finish_headless(start_headless(others, small_model_root, tmp_path / "small"), tmp_path / "small")
        images |= finish_headless(full, tmp_path / "sd15")
    finally:
        full.kill()  # no-op when it has finished
    for g in (g for g in graphs.all_graphs() if g.name not in graphs.SDXL_WORKFLOWS):
        saved = images[f"{g.file_stem}.json"]
        saves = [n for n in g.nodes.values() if n["class_type"] == "SaveImage"]
        assert len(saved) >= len(saves) and all(Path(p).is_file() for p in saved), (g.name, saved)
    # Side-by-side rows hold one image per sampler: e.g. the couples row has seven.
    couples = [p for p in images[f"{graphs.FILES['moa_fig8_couples']}.json"] if "couples" in p]
    assert len(couples) == len(graphs.COUPLE_PROMPTS)


@pytest.mark.slow
def test_runner_names_missing_files_before_running(tmp_path):
    swap = REPO / "workflows" / f"{graphs.FILES['moa_fig7_subject_swap']}.json"
    done = runner(swap, "--out", tmp_path, "--input-dir", tmp_path, timeout=600)
    assert done.returncode != 0
    message = done.stderr
    assert "nothing was run" in message
    for entry in [graphs.CHECKPOINT, graphs.FASTCOMPOSER, graphs.SUBJECTS[0]]:
        assert f"{entry.name} in {entry.folder}/" in message, message[-3000:]

"""The shipped workflow files as the editor reads them: their names, which ComfyUI's template
browser shows as the cards' titles (and descriptions) and sorts by: readable, and in the intended
order, MoLE first, then MoA, each in figure order; each file with its card picture and API twin;
the download entries of the files they name, the pack's identification on its nodes, no
deprecated node, and a quick start of a handful of nodes."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from workflows import graphs  # noqa: E402

# "NN MoLE|MoA <figure> - <title>": letters, digits, spaces and ".,()-" only: no "_" (the title shows
# it raw), nothing Windows refuses in a file name.
READABLE = re.compile(r"(?P<n>\d\d) (?P<paper>MoLE|MoA) (?P<what>[A-Za-z]+\.?(?: \d+(?:, \d+)*)?) - [A-Za-z0-9 .,()-]+")


def _figure(what: str) -> tuple:
    """'Fig. 8, 9' -> ('Fig', 8); 'quickstart' -> ('', 0): the quickstart leads its paper."""
    number = re.search(r"\d+", what)
    return (what.split(".")[0], int(number.group())) if number else ("", 0)


def order_problems(names: list[str]) -> list[str]:
    """What is wrong with these file names, given in the intended order (graphs.WORKFLOWS')."""
    unreadable = [n for n in names if not READABLE.fullmatch(n) or n != n.strip() or n.endswith(".") or "  " in n]
    if unreadable:
        return [f"{n!r} does not read as a template title" for n in unreadable]
    problems = []
    if sorted(names) != names:  # the browser's "Alphabetical" sort
        problems.append(f"sorted by name they come as {sorted(names)}")
    parts = [READABLE.fullmatch(n) for n in names]
    if [int(p["n"]) for p in parts] != list(range(1, len(names) + 1)):
        problems.append("not numbered 01, 02, ... in order")
    papers = [p["paper"] for p in parts]
    if papers != sorted(papers, key=["MoLE", "MoA"].index):
        problems.append(f"MoLE does not come before MoA: {papers}")
    for paper in ("MoLE", "MoA"):
        figures = [_figure(p["what"]) for p in parts if p["paper"] == paper]
        if figures != sorted(figures):
            problems.append(f"{paper} figures out of order: {figures}")
    return problems


def test_file_names_read_as_titles_in_the_intended_order():
    """Sorted by name (the "Alphabetical" sort of the template browser; the numbers decide it), the
    files come in graphs.WORKFLOWS' order, numbered 01.., MoLE before MoA, figures ascending, the
    MoA quickstart first among MoA."""
    names = [g.file_stem for g in graphs.all_graphs()]
    assert len(set(names)) == len(names) == len(graphs.FILES)
    assert order_problems(names) == []
    first_moa = next(n for n in names if " MoA " in n)
    assert first_moa == graphs.FILES["moa_fastcomposer_quickstart"]
    assert all(Path(f"{n}.json").stem == n for n in names)


@pytest.mark.parametrize(
    "change",
    [
        lambda names: [n.replace(" - ", "_") for n in names],  # raw file-name style
        lambda names: names[1:] + names[:1],  # numbers no longer in order
        lambda names: [n[3:] for n in names],  # unnumbered: "MoA ..." sorts before "MoLE ..."
        lambda names: [f"{i + 1:02d}{n[2:]}" for i, n in enumerate(names[7:] + names[:7])],  # MoA first
        lambda names: [f"{i + 1:02d}{n[2:]}" for i, n in enumerate(names[:8] + names[8:][::-1])],  # MoA figures
    ],
)
def test_the_order_check_fails_on_a_wrong_list(change):
    assert order_problems(change([g.file_stem for g in graphs.all_graphs()]))


@pytest.mark.parametrize("name", graphs.FILES.values())
def test_each_file_has_its_card_picture_and_api_twin(name):
    for path in (REPO / "workflows" / f"{name}.json", REPO / "workflows" / f"{name}.jpg"):
        assert path.is_file(), f"missing {path.relative_to(REPO)}"
    assert (REPO / "workflows" / "api" / f"{name}.json").is_file()


def test_no_other_files_in_the_template_folder():
    """ComfyUI lists every workflows/*.json as a template: only the named ones are there."""
    shipped = set(graphs.FILES.values())
    assert {p.stem for p in (REPO / "workflows").glob("*.json")} == shipped
    assert {p.stem for p in (REPO / "workflows").glob("*.jpg")} == shipped
    assert {p.stem for p in (REPO / "workflows" / "api").glob("*.json")} == shipped


# ---- what the editor reads from each file: download entries and the pack's identification ----

# The values the frontend's missing-models check takes for model files (its extension list).
MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".gguf")


def _editor_files() -> dict:
    return {g.name: json.loads((REPO / "workflows" / f"{g.file_stem}.json").read_text()) for g in graphs.all_graphs()}


def undownloadable(workflow: dict) -> list[str]:
    """The model files a workflow's nodes name without a download entry on that node whose name is
    the widget's value (the frontend's rule for a node's `properties.models`)."""
    missing = []
    for node in workflow["nodes"]:
        values = node.get("widgets_values") or []
        named = {v for v in (values.values() if isinstance(values, dict) else values) if isinstance(v, str)}
        entries = {m["name"] for m in node["properties"].get("models", []) if m.get("url")}
        missing += sorted(v for v in named if v.endswith(MODEL_EXTENSIONS) and v not in entries)
    return missing


def test_every_template_but_the_sd15_mole_ones_names_only_downloadable_files():
    files = _editor_files()
    runs_today = [name for name, workflow in files.items() if not undownloadable(workflow)]
    train_first = {g.name for g in graphs.all_graphs() if "train first" in g.file_stem}
    assert train_first == {g.name for g in graphs.all_graphs() if g.name.startswith("mole_") and "sdxl" not in g.name}
    assert set(runs_today) == set(files) - train_first and len(runs_today) >= 11
    for name in train_first:  # named as training-only in the note too
        note = next(n for n in files[name]["nodes"] if n["type"] == "MarkdownNote")["widgets_values"][0]
        assert "Train first" in note and graphs.FACE_EXPERT.name in note


def test_the_download_check_fails_on_a_file_without_its_entries():
    workflow = _editor_files()["moa_fig7_subject_swap"]
    assert not undownloadable(workflow)
    for node in workflow["nodes"]:
        node["properties"].pop("models", None)
    assert sorted(undownloadable(workflow)) == sorted([graphs.CHECKPOINT.name, graphs.FASTCOMPOSER.name])


def test_download_entries_name_their_folder_and_a_resolvable_url():
    for workflow in _editor_files().values():
        for node in workflow["nodes"]:
            for entry in node["properties"].get("models", []):
                assert entry["url"].startswith("https://huggingface.co/") and "/resolve/main/" in entry["url"]
                assert entry["url"].endswith("/" + entry["name"]) and entry["directory"] in (
                    "checkpoints",
                    "loras",
                    "mole",
                    "moa",
                    "controlnet",
                )


def test_no_moa_graph_loads_the_unpublished_trained_file():
    for name, workflow in _editor_files().items():
        text = json.dumps([n.get("widgets_values") for n in workflow["nodes"] if n["type"] != "MarkdownNote"])
        assert "moa_sd15.safetensors" not in text, name
        if name.startswith("moa_"):
            assert not [n for n in workflow["nodes"] if n["type"] == "CLIPVisionLoader"], name


def test_pack_nodes_carry_the_pack_identification():
    """cnr_id (the registry id), aux_id (GitHub owner/repo) and ver, from pyproject.toml, on every node
    of this pack, as ComfyUI-Manager writes them; core nodes carry comfy-core."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    owner_repo = "/".join(project["urls"]["Repository"].removesuffix(".git").split("/")[-2:])
    want = {"cnr_id": project["name"], "aux_id": owner_repo, "ver": project["version"]}
    for name, workflow in _editor_files().items():
        for node in workflow["nodes"]:
            ids = {k: node["properties"].get(k) for k in want}
            if node["type"].startswith(("MoLE_", "MoA_")):
                assert ids == want, (name, node["type"], ids)
            elif node["type"] != "MarkdownNote":
                assert ids["cnr_id"] == "comfy-core" and ids["ver"], (name, node["type"], ids)


def test_no_template_uses_the_deprecated_image_batch():
    for name, workflow in _editor_files().items():
        assert not [n for n in workflow["nodes"] if n["type"] == "ImageBatch"], name


def test_the_quick_start_is_a_handful_of_nodes():
    quick = _editor_files()["moa_fastcomposer_quickstart"]
    kinds = [n["type"] for n in quick["nodes"] if n["type"] != "MarkdownNote"]
    assert len(kinds) <= 10 and kinds.count("LoadImage") == 1 and kinds.count("SaveImage") == 1

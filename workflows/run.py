"""Run shipped (or your own) workflows headless through the host's own executor.

    python3 -m workflows.run "workflows/10 MoA Fig. 7 - subject swap.json" [more.json ...] --out OUT

from the pack's folder. ComfyUI is found as the tests find it (COMFYUI_PATH, the ComfyUI whose
custom_nodes/ holds the pack, else ~/comfy/ComfyUI); the pack is loaded by ComfyUI's own
custom-node loader; models come from ComfyUI's models/ folders (plus --extra-model-paths-config)
and images from its input/ folder (or --input-dir). Before anything runs, every model file and
image the workflows name is checked and the missing ones are listed by name and folder.
Editor-format (UI) files are converted to the API format as the editor's "Export (API)" does;
API-format files are taken as they are. Images go to OUT/<workflow>/.

--smoke runs each workflow at 64x64 with 1 step (to check a graph end to end, not to look at).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # editor annotations, not executed
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Inputs that name a file, by node: the folder it is looked up in (for the missing-files report).
FILE_INPUTS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("MoLE_LoadExperts", "expert_1"): "loras",
    ("MoLE_LoadExperts", "expert_2"): "loras",
    ("MoLE_ApplyGating", "gates"): "mole",
    ("MoA_LoadRouter", "moa_name"): "moa",
    ("LoadImage", "image"): "input",
}


class WorkflowError(ValueError):
    pass


# ---- editor format -> API format ----------------------------------------------------------


def widget_names(node_class) -> list[str]:
    """The names of a node's widgets in the order the editor stores their values
    (widgets_values): its widget-type inputs in definition order, each seed-like input
    followed by its "control_after_generate" widget and each image-upload combo by its
    "upload" button."""
    types = node_class.INPUT_TYPES()
    names = []
    for section in ("required", "optional"):
        for name, spec in (types.get(section) or {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if not (isinstance(kind, list) or kind in WIDGET_TYPES) or options.get("forceInput"):
                continue
            names.append(name)
            if options.get("control_after_generate"):
                names.append("control_after_generate")
            if options.get("image_upload"):
                names.append("upload")
    return names


def ui_to_api(workflow: dict, node_classes: dict, source: str = "workflow") -> dict:
    """The API-format prompt of an editor-format workflow (as the editor exports it)."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):  # notes; muted or bypassed nodes
            continue
        if kind not in node_classes:
            raise WorkflowError(
                f"{source}: node {node['id']} is a {kind}, which this ComfyUI does not have "
                "(a node pack missing, or a Reroute/Primitive this runner does not resolve)"
            )
        inputs = {}
        linked = {}
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                link = links[entry["link"]]
                linked[entry["name"]] = [str(link[1]), link[2]]
        names = widget_names(node_classes[kind])
        values = node.get("widgets_values") or []
        if isinstance(values, dict):  # some nodes store their widgets by name
            values = [values.get(n) for n in names]
        if len(values) != len(names):
            raise WorkflowError(
                f"{source}: node {node['id']} ({kind}) has {len(values)} widget values but the node "
                f"has {len(names)} widgets ({', '.join(names)}): the node changed since the workflow was saved"
            )
        for name, value in zip(names, values):
            if name not in ("control_after_generate", "upload"):
                inputs[name] = value
        inputs.update(linked)
        prompt[str(node["id"])] = {
            "inputs": inputs,
            "class_type": kind,
            **({"_meta": {"title": node["title"]}} if node.get("title") else {}),
        }
    return prompt


def read_prompt(path: Path, node_classes: dict) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WorkflowError(f"{path}: not a readable workflow JSON ({e})") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        return ui_to_api(data, node_classes, str(path))
    if isinstance(data, dict) and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return data
    raise WorkflowError(
        f"{path}: neither an editor workflow (nodes, links) nor an API prompt (id -> class_type, inputs)"
    )


# ---- checks and overrides -----------------------------------------------------------------


def missing_files(prompt: dict) -> list[tuple[str, str]]:
    """(file name, folder) of every model file or input image the prompt names but ComfyUI cannot find."""
    import folder_paths

    missing = []
    for node in prompt.values():
        for name, value in node["inputs"].items():
            folder = FILE_INPUTS.get((node["class_type"], name))
            if folder is None or not isinstance(value, str):
                continue
            if folder == "input":
                found = Path(folder_paths.get_annotated_filepath(value)).is_file()
            else:
                found = folder_paths.get_full_path(folder, value) is not None
            if not found and (value, folder) not in missing:
                missing.append((value, folder))
    return missing


def smoke(prompt: dict) -> dict:
    """The prompt at 64x64 and 1 step, to run a graph end to end quickly."""
    for node in prompt.values():
        inputs = node["inputs"]
        if isinstance(inputs.get("steps"), int):
            inputs["steps"] = 1
        if node["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = 64
    return prompt


# ---- the host ----------------------------------------------------------------------------


class _Server:
    """What ComfyUI's executor asks of its server when no web UI is attached: progress and
    errors go to the log."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event, data, sid=None):
        if event == "execution_error":
            logging.error("%s (node %s): %s", data.get("node_type"), data.get("node_id"), data.get("exception_message"))
        elif event == "executing" and isinstance(data, dict) and data.get("node"):
            logging.debug("executing node %s", data["node"])

    def queue_updated(self):
        pass


def start_host(extra_model_paths: list[str], input_dir: str | None, output_dir: str):
    """Import ComfyUI, set its folders, load its nodes and this pack (through its own loader)."""
    sys.path.insert(0, str(REPO))
    from training.host import import_host

    import_host()
    import folder_paths
    import utils.extra_config  # before nodes: importing it puts comfy/ (and its utils.py) on the path

    import nodes

    for config in extra_model_paths:
        utils.extra_config.load_extra_path_config(config)
    if input_dir:
        folder_paths.set_input_directory(str(Path(input_dir).resolve()))
    folder_paths.set_output_directory(str(Path(output_dir).resolve()))

    async def load():
        await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
        if not await nodes.load_custom_node(str(REPO)):
            raise SystemExit(f"error: ComfyUI could not load the pack from {REPO} (see the log above)")

    asyncio.run(load())
    return nodes.NODE_CLASS_MAPPINGS


def run(paths: list[Path], out: Path, smoke_run: bool, extra_model_paths: list[str], input_dir: str | None) -> dict:
    node_classes = start_host(extra_model_paths, input_dir, str(out))
    prompts = {path: read_prompt(path, node_classes) for path in paths}
    check_files({path.name: prompt for path, prompt in prompts.items()})
    executor = new_executor()
    results = {}
    for path, prompt in prompts.items():
        images = execute(executor, smoke(prompt) if smoke_run else prompt, path.name)
        results[path.name] = [path for paths in images.values() for path in paths]
        print(f"{path.name}: {len(results[path.name])} image(s) in {out}")
    return results


def check_files(prompts: dict) -> None:
    """Stop, naming every missing model file and input image by folder, before anything runs."""
    import folder_paths

    lines = ["missing files (nothing was run):"]
    for name, prompt in prompts.items():
        for file, folder in missing_files(prompt):
            where = (
                folder_paths.get_input_directory()
                if folder == "input"
                else ", ".join(folder_paths.get_folder_paths(folder))
            )
            lines.append(f"  {name}: {file} in {folder}/ (looked in {where})")
    if len(lines) > 1:
        raise SystemExit("\n".join(lines))


def new_executor():
    """The host's PromptExecutor; its default cache keeps the outputs of nodes whose inputs did not
    change (a checkpoint is loaded once for many prompts)."""
    import execution

    return execution.PromptExecutor(_Server(), cache_args={"lru": 0, "ram": 0})


def execute(executor, prompt: dict, name: str) -> dict[str, list[Path]]:
    """Validate and run one API-format prompt: {SaveImage node id: [image paths]}."""
    import execution
    import folder_paths

    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        details = "; ".join(
            f"node {k} ({v['class_type']}): " + ", ".join(f"{e['message']}: {e['details']}" for e in v["errors"])
            for k, v in node_errors.items()
        )
        raise SystemExit(f"error: {name} does not validate: {error['message']}: {error['details']} {details}")
    executor.execute(prompt, prompt_id, {}, outputs)
    if not executor.success:
        errors = [d for event, d in executor.status_messages if event == "execution_error"]
        message = errors[0]["exception_message"] if errors else "see the log"
        raise SystemExit(f"error: {name} failed: {message}")
    # Saved images only: previews (the Maps nodes' in-node pictures) go to ComfyUI's temp folder.
    return {
        node: [
            Path(folder_paths.get_output_directory()) / i.get("subfolder", "") / i["filename"]
            for i in o.get("images", [])
            if i.get("type", "output") == "output"
        ]
        for node, o in executor.history_result["outputs"].items()
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflows", nargs="+", type=Path, help="workflow files (editor or API format)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the images")
    parser.add_argument("--smoke", action="store_true", help="64x64, 1 step: check that the graphs run")
    parser.add_argument(
        "--extra-model-paths-config", action="append", default=[], help="extra_model_paths.yaml (repeatable)"
    )
    parser.add_argument("--input-dir", default=None, help="folder of the input images (default: ComfyUI's input/)")
    parser.add_argument("--list-json", type=Path, default=None, help="also write {workflow: [image paths]} here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        results = run(args.workflows, args.out, args.smoke, args.extra_model_paths_config, args.input_dir)
    except WorkflowError as e:
        raise SystemExit(f"error: {e}") from None
    if args.list_json:
        args.list_json.write_text(json.dumps({k: [str(p) for p in v] for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()

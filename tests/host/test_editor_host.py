"""The pack as a user meets it in the editor, through the real host: every input has a tooltip;
the Maps nodes show their pictures in the node; loaders re-read a file overwritten under the same
name and list only files they can read; the SDXL MoLE workflows validate against the host's node
definitions with every file they name present, and their MoLE part runs on an SDXL-layout model."""

from __future__ import annotations

import asyncio
import copy
import importlib
import json
import os
from pathlib import Path

import hostenv
import pytest
import torch
from helpers import moa_weights as aw
from helpers import mole_weights as mw
from helpers import random_models as rm
from helpers.fixtures import model_folders

REPO = hostenv.REPO


@pytest.fixture(scope="module")
def pack_nodes(pack):
    extension = asyncio.run(pack.comfy_entrypoint())
    return asyncio.run(extension.get_node_list())


@pytest.fixture(scope="module")
def mods(pack):
    return {
        name: importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.{name}")
        for name in ("mole_nodes", "moa_nodes", "visualize_nodes")
    }


def test_every_input_has_a_tooltip(pack_nodes):
    """Walks each node's definition as the server sends it to the editor (/object_info)."""
    missing = []
    for node in pack_nodes:
        info = node.GET_NODE_INFO_V1()
        for section in ("required", "optional"):
            for name, spec in (info["input"].get(section) or {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not str(options.get("tooltip", "")).strip():
                    missing.append(f"{info['name']}.{name}")
    assert len(pack_nodes) >= 10
    assert not missing, f"inputs without a tooltip: {missing}"


# ---- loaders: overwritten files, lists --------------------------------------------------------


def _signature(prompt: dict, node_id: str):
    """The cache key ComfyUI's executor gives a node for this prompt (a fresh IsChangedCache, as
    each queued prompt gets): a different key means the node runs again instead of being cached."""
    import execution
    from comfy_execution.caching import CacheKeySetInputSignature
    from comfy_execution.graph import DynamicPrompt

    dynprompt = DynamicPrompt(copy.deepcopy(prompt))  # a fresh prompt, as each queued one is (it stores is_changed)
    is_changed = execution.IsChangedCache("test", dynprompt, None)
    keys = CacheKeySetInputSignature(dynprompt, list(prompt), is_changed)
    asyncio.run(keys.add_keys(list(prompt)))
    return keys.get_data_key(node_id)


def test_overwritten_files_are_read_again_on_the_next_run(mods, tmp_path):
    """ComfyUI's executor decides from the loaders' fingerprint_inputs (size, mtime) whether a
    node runs again; only the files' names, sizes and times matter here, not their contents."""
    for name, size in (("ed_face", 100), ("ed_hand", 100), ("ed_gates", 100), ("ed_moa", 100)):
        (tmp_path / f"{name}.safetensors").write_bytes(b"x" * size)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "any.safetensors"}},
        "2": {
            "class_type": "MoLE_LoadExperts",
            "inputs": {
                "expert_1": "ed_face.safetensors",
                "name_1": "face",
                "strength_1": 1.0,
                "expert_2": "ed_hand.safetensors",
                "name_2": "hand",
                "strength_2": 1.0,
            },
        },
        "3": {
            "class_type": "MoLE_ApplyGating",
            "inputs": {
                "model": ["1", 0],
                "experts": ["2", 0],
                "gates": "ed_gates.safetensors",
                "mode": "both",
                "strength": 1.0,
            },
        },
        "4": {"class_type": "MoA_LoadRouter", "inputs": {"moa_name": "ed_moa.safetensors"}},
    }
    import nodes

    loaders = (mods["mole_nodes"].LoadMoLEExperts, mods["mole_nodes"].ApplyMoLEGating, mods["moa_nodes"].LoadMoARouter)
    for node in loaders:
        nodes.NODE_CLASS_MAPPINGS.setdefault(node.GET_SCHEMA().node_id, node)
    with model_folders(loras=tmp_path, mole=tmp_path, moa=tmp_path):
        first = {n: _signature(prompt, n) for n in ("2", "3", "4")}
        assert {n: _signature(prompt, n) for n in ("2", "3", "4")} == first  # nothing changed: all cached

        (tmp_path / "ed_hand.safetensors").write_bytes(b"y" * 120)  # same name, new file
        after_expert = {n: _signature(prompt, n) for n in ("2", "3", "4")}
        assert after_expert["2"] != first["2"] and after_expert["3"] != first["3"]  # experts and gating run again
        assert after_expert["4"] == first["4"]

        gates = tmp_path / "ed_gates.safetensors"
        gates.write_bytes(b"z" * 100)  # same size: told apart by its modification time
        stat = gates.stat()
        os.utime(gates, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        after_gates = {n: _signature(prompt, n) for n in ("2", "3")}
        assert after_gates["2"] == after_expert["2"] and after_gates["3"] != after_expert["3"]

        moa = tmp_path / "ed_moa.safetensors"
        os.utime(moa, ns=(moa.stat().st_atime_ns, moa.stat().st_mtime_ns + 10**9))
        assert _signature(prompt, "4") != first["4"]


def test_file_lists_offer_no_pickles(mods, tmp_path):
    for name in ("ok.safetensors", "pickle.ckpt", "pickle.pt", "pickle.bin"):
        (tmp_path / name).write_bytes(b"")
    with model_folders(loras=tmp_path, mole=tmp_path, moa=tmp_path):
        for node in (
            mods["mole_nodes"].LoadMoLEExperts,
            mods["mole_nodes"].ApplyMoLEGating,
            mods["moa_nodes"].LoadMoARouter,
        ):
            info = node.GET_NODE_INFO_V1()["input"]["required"]
            # A combo's options: the spec's first item (V1 style) or its "options" (V3's COMBO).
            lists = [
                spec[0] if isinstance(spec[0], list) else spec[1].get("options") or []
                for spec in info.values()
                if isinstance(spec[0], list) or spec[0] == "COMBO"
            ]
            files = {f for options in lists for f in options if "." in f}
            assert "ok.safetensors" in files, node
            # Load MoA Router also lists .bin: FastComposer's pytorch_model.bin, read only in its layout.
            readable = (".safetensors", ".bin") if node is mods["moa_nodes"].LoadMoARouter else (".safetensors",)
            assert not {f for f in files if not f.endswith(readable)}, (node, files)


# ---- Maps nodes: a preview in the node ---------------------------------------------------------


def _assert_preview(output, batches):
    import folder_paths

    shown = output.ui.as_dict()["images"]
    assert len(shown) == sum(b.shape[0] for b in batches)
    for entry in shown:
        assert entry["type"] == "temp"
        assert (Path(folder_paths.get_temp_directory()) / entry["subfolder"] / entry["filename"]).is_file()


@pytest.mark.slow
def test_maps_nodes_show_a_preview(mods, sd15, tmp_path):
    import comfy.clip_vision

    import nodes as comfy_nodes

    vis, mole, moa_nodes = mods["visualize_nodes"], mods["mole_nodes"], mods["moa_nodes"]
    layers, kohya = mw.target_layers(sd15.model), mw.kohya_names(sd15.model, "diffusers")
    mw.write_lora(tmp_path / "pv_face.safetensors", layers, kohya, rank=2, seed=1)
    mw.write_lora(tmp_path / "pv_hand.safetensors", layers, kohya, rank=2, seed=2)
    mw.write_pack_gates(tmp_path / "pv_gates.safetensors", layers, seed=3)
    (tmp_path / "pv_moa.safetensors").symlink_to(aw.cached_moa_file(sd15.model, seed=11))
    negative = comfy_nodes.CLIPTextEncode().encode(sd15.clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def images(model, positive):
        out = comfy_nodes.common_ksampler(model, 1, 2, 1.0, "euler", "normal", positive, negative, latent)[0]
        return comfy_nodes.VAEDecode().decode(sd15.vae, out)[0]

    with model_folders(loras=tmp_path, mole=tmp_path, moa=tmp_path), torch.inference_mode():
        experts = mole.LoadMoLEExperts.execute(
            "pv_face.safetensors", "face", 1.0, "pv_hand.safetensors", "hand", 1.0
        ).result[0]
        gated = mole.ApplyMoLEGating.execute(sd15.model, experts, "pv_gates.safetensors", "both", 1.0).result[0]
        recorded = vis.MoLERecordGates.execute(gated).result[0]
        drawn = images(recorded, comfy_nodes.CLIPTextEncode().encode(sd15.clip, "a man waving")[0])
        out = vis.MoLEGateMaps.execute(recorded, drawn, "first, last", 0, 0.6)
        _assert_preview(out, out.result)

        moa = moa_nodes.LoadMoARouter.execute("pv_moa.safetensors").result[0]
        clip_vision = comfy.clip_vision.load(str(rm.clip_vision_vit_l14()))
        model, positive = moa_nodes.MoASubjectInject.execute(
            model=sd15.model,
            moa=moa,
            clip=sd15.clip,
            clip_vision=clip_vision,
            text="a man waving",
            subject_words="man",
            image_1=torch.rand(1, 64, 64, 3),
            subject_weights="1.0",
            strength=1.0,
            start_percent=0.0,
            end_percent=1.0,
        ).result
        recorded = vis.MoARecordRouter.execute(model).result[0]
        out = vis.MoARouterMaps.execute(recorded, images(recorded, positive), "mean", "first, last", 0, 0.6)
        _assert_preview(out, out.result)


# ---- SDXL MoLE workflows -------------------------------------------------------------------------


def _sdxl_graphs():
    import sys

    sys.path.insert(0, str(REPO))
    from workflows import graphs

    return graphs, [g for g in graphs.all_graphs() if g.name in graphs.SDXL_WORKFLOWS]


def test_sdxl_workflows_validate_with_their_files(node_classes, tmp_path):
    """The host's own validation (types, ranges, combo lists) of each SDXL API graph, with every
    file it names present (the MoLE files in the SDXL layout, SAI-named as the release is). With
    ComfyUI's extra nodes loaded (BatchImagesNode), as the server has them."""
    import comfy.supported_models
    import execution

    graphs, sdxl = _sdxl_graphs()
    assert {g.name for g in sdxl} == {
        "mole_fig8_9_comparison_sdxl",
        "mole_table3_assignment_ablation_sdxl",
        "mole_fig7_gates_sdxl",
    }
    meta = type("Patcher", (), {})()
    meta.model = comfy.supported_models.SDXL(dict(rm.SDXL_UNET_CONFIG)).get_model({}, device="meta")
    layers = mw.target_layers(meta)
    names = mw.kohya_names(meta, "sai")
    for folder in ("checkpoints", "loras", "mole"):
        (tmp_path / folder).mkdir()
    (tmp_path / "checkpoints" / graphs.SDXL_CHECKPOINT[1]).write_bytes(b"")  # validation reads only the list
    mw.write_lora(tmp_path / "loras" / graphs.SDXL_FACE_EXPERT[1], layers, names, rank=2, seed=1)
    mw.write_lora(tmp_path / "loras" / graphs.SDXL_HAND_EXPERT[1], layers, names, rank=2, seed=2)
    mw.write_released_gates(tmp_path / "mole" / graphs.SDXL_GATES[1], layers, names)
    with model_folders(**{f: tmp_path / f for f in ("checkpoints", "loras", "mole")}):
        for g in sdxl:
            prompt = json.loads((REPO / "workflows" / "api" / f"{g.file_stem}.json").read_text())
            assert prompt == g.nodes
            valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
            assert valid, (g.name, error, node_errors)
            samplers = [n["inputs"] for n in prompt.values() if n["class_type"] == "KSampler"]
            assert samplers and all((s["sampler_name"], s["steps"], s["cfg"]) == ("ddim", 50, 7.5) for s in samplers)
            sizes = {
                (n["inputs"]["width"], n["inputs"]["height"])
                for n in prompt.values()
                if n["class_type"] == "EmptyLatentImage"
            }
            assert sizes == {(1024, 1024)}


@pytest.mark.slow
def test_sdxl_workflow_mole_part_runs_on_an_sdxl_model(mods, sdxl, tmp_path):
    """Load MoLE Experts -> Apply MoLE Gating with the SDXL graph's own inputs, on an SDXL-layout
    model with SDXL-layout random files, then one UNet call (1 step, cfg 1)."""
    import nodes

    graphs, sdxl_graphs = _sdxl_graphs()
    graph = next(g for g in sdxl_graphs if g.name == "mole_fig8_9_comparison_sdxl")
    load = next(n["inputs"] for n in graph.nodes.values() if n["class_type"] == "MoLE_LoadExperts")
    apply = next(n["inputs"] for n in graph.nodes.values() if n["class_type"] == "MoLE_ApplyGating")
    layers, names = mw.target_layers(sdxl.model), mw.kohya_names(sdxl.model, "sai")
    mw.write_lora(tmp_path / load["expert_1"], layers, names, rank=4, seed=11)
    mw.write_lora(tmp_path / load["expert_2"], layers, names, rank=4, seed=12)
    mw.write_released_gates(tmp_path / apply["gates"], layers, names, dtype=torch.bfloat16)
    mole = mods["mole_nodes"]
    with model_folders(loras=tmp_path, mole=tmp_path), torch.inference_mode():
        experts = mole.LoadMoLEExperts.execute(**load).result[0]
        widgets = {k: v for k, v in apply.items() if not isinstance(v, list)}
        patched = mole.ApplyMoLEGating.execute(model=sdxl.model, experts=experts, **widgets).result[0]
        assert len([k for k in patched.object_patches if k.endswith(".forward")]) == 722

        def one_call(model):
            return nodes.common_ksampler(
                model, 3, 1, 1.0, "euler", "normal", sdxl.positive, sdxl.negative, sdxl.latent(64, 64)
            )[0]["samples"]

        out = one_call(patched)
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
        assert not torch.allclose(out, one_call(sdxl.model), atol=1e-4)  # the MoLE layers acted


# ---- Apply MoLE Gating: progress bar and Cancel ------------------------------------------------


def _meta_patcher(config_class, unet_config):
    """A ModelPatcher of the host's own UNet on the meta device: real layer names and widths, no
    weights in memory (enough for building MoLE layers, not for sampling)."""
    import comfy.model_patcher

    config = config_class(dict(unet_config))
    return comfy.model_patcher.ModelPatcher(
        config.get_model({}, device="meta"), load_device=torch.device("cpu"), offload_device=torch.device("cpu")
    )


def test_apply_mole_gating_shows_progress_and_stops_at_cancel(mods, tmp_path):
    import comfy.model_management
    import comfy.supported_models
    import comfy.utils

    model = _meta_patcher(comfy.supported_models.SD15, rm.SD15_UNET_CONFIG)
    layers, names = mw.target_layers(model), mw.kohya_names(model, "diffusers")
    mw.write_lora(tmp_path / "pb_face.safetensors", layers, names, rank=2, seed=1)
    mw.write_lora(tmp_path / "pb_hand.safetensors", layers, names, rank=2, seed=2)
    mw.write_pack_gates(tmp_path / "pb_gates.safetensors", layers, seed=3)
    mole = mods["mole_nodes"]
    ticks = []
    previous_hook = comfy.utils.PROGRESS_BAR_HOOK
    try:
        comfy.utils.set_progress_bar_global_hook(lambda value, total, *_, **__: ticks.append((value, total)))
        with model_folders(loras=tmp_path, mole=tmp_path):
            experts = mole.LoadMoLEExperts.execute(
                "pb_face.safetensors", "face", 1.0, "pb_hand.safetensors", "hand", 1.0
            ).result[0]
            patched = mole.ApplyMoLEGating.execute(model, experts, "pb_gates.safetensors", "both", 1.0).result[0]
            assert ticks[-1] == (2 * len(layers), 2 * len(layers))  # one tick per expert layer read, to the end
            assert len(ticks) == 2 * len(layers)

            def cancel_midway(value, total, preview, node_id=None):
                if value == 50:
                    comfy.model_management.interrupt_current_processing(True)  # what the Cancel button does

            comfy.utils.set_progress_bar_global_hook(cancel_midway)
            with pytest.raises(comfy.model_management.InterruptProcessingException):
                mole.ApplyMoLEGating.execute(model, experts, "pb_gates.safetensors", "both", 1.0)
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(previous_hook)
    assert len([k for k in patched.object_patches if k.endswith(".forward")]) == len(layers) == 192
    assert not [k for k in model.object_patches if k.endswith(".forward")]  # the given model is never patched


# ---- the missing-models dialog, in a real browser ----------------------------------------------


@pytest.mark.slow
def test_a_template_opened_with_no_model_files_lists_its_downloads(tmp_path):
    """ComfyUI with this pack and no model files, its editor in headless Chromium: opening a MoA
    graph and an SDXL MoLE graph shows the Missing Models dialog listing each file with its
    download (a Download button; FastComposer's .bin with the dialog's refusal and its URL), and
    the same file stripped of its download entries shows no list (workflows/browser_checks.py)."""
    import socket
    import sys

    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    if not Path("/usr/bin/chromium").is_file():
        pytest.skip("needs Debian's chromium (/usr/bin/chromium)")
    sys.path.insert(0, str(REPO))
    from workflows import browser_checks, build, graphs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    chosen = [g for g in graphs.all_graphs() if g.name in ("moa_fastcomposer_quickstart", "mole_fig7_gates_sdxl")]
    server = build.start_comfyui(port, tmp_path)
    try:
        build.quiet_editor(port)
        with sync_api.sync_playwright() as p:
            browser, page = browser_checks.open_editor(p, port)
            try:
                browser_checks.check_missing_models(page, chosen)
            except SystemExit as e:  # the build's checks stop the build with a message
                pytest.fail(str(e))
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)

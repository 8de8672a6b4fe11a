"""MoLE through the real ComfyUI host: node loading, sampling, composition and bad input."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import hostenv
import pytest
import torch
from helpers import mole_weights as mw
from helpers.fixtures import encode_text, model_folders

# Tests over ~5 s on 2 CPU cores are marked slow; the rest run in `scripts/test.sh --fast`.


@pytest.fixture(scope="module")
def nodes_mod(pack):
    import importlib

    return importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.mole_nodes")


@pytest.fixture(scope="module")
def sd15_files(sd15, tmp_path_factory):
    """Random experts (diffusers-style kohya names, peft names) and gates (both formats) for
    the random SD1.5 model, in folders registered with ComfyUI as loras/ and mole/."""
    root = tmp_path_factory.mktemp("mole_models")
    loras, gates = root / "loras", root / "mole"
    loras.mkdir(), gates.mkdir()
    layers = mw.target_layers(sd15.model)
    kohya = mw.kohya_names(sd15.model, "diffusers")
    mw.write_lora(loras / "face.safetensors", layers, kohya, seed=1, alpha=4.0)
    mw.write_lora(loras / "hand.safetensors", layers, kohya, seed=2, alpha=8.0)
    mw.write_lora(loras / "feet_peft.safetensors", layers, mw.peft_names(sd15.model), seed=3, naming="peft")
    mw.write_released_gates(gates / "released.safetensors", layers, kohya)
    mw.write_pack_gates(gates / "pack_paper.safetensors", layers, variant="paper")
    mw.write_pack_gates(gates / "three.safetensors", layers, ("face", "hand", "feet"))
    with model_folders(loras=loras, mole=gates):
        yield {"root": root, "loras": loras, "mole": gates, "layers": layers, "kohya": kohya}


def experts(
    nodes_mod,
    face="face.safetensors",
    hand="hand.safetensors",
    names=("face", "hand"),
    strengths=(1.0, 1.0),
    previous=None,
):
    return nodes_mod.LoadMoLEExperts.execute(
        face, names[0], strengths[0], hand, names[1], strengths[1], previous
    ).result[0]


def apply(nodes_mod, model, ex, gates="released.safetensors", mode="both", strength=1.0):
    return nodes_mod.ApplyMoLEGating.execute(model, ex, gates, mode, strength).result[0]


def encode(sd15, text):
    return encode_text(sd15.clip, text)


def sample(sd15, model, cfg=2.0, width=64, height=64, batch=1, steps=1, seed=7):
    import nodes

    positive = encode(sd15, "a photo of a woman waving, detailed hands")
    negative = encode(sd15, "")
    latent = {"samples": torch.zeros(batch, 4, height // 8, width // 8)}
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        (out,) = nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)
    return out["samples"]


@pytest.mark.slow
def test_pack_registers_through_comfyui_loader(tmp_path):
    """The real custom-node loader finds both nodes and the editor extension (web/, served to the
    editor); the mole folder keeps an extra_model_paths.yaml entry made before the pack loaded."""
    extra = tmp_path / "extra_models" / "mole"
    extra.mkdir(parents=True)
    yaml = tmp_path / "extra_model_paths.yaml"
    yaml.write_text(f"mine:\n  base_path: {tmp_path / 'extra_models'}\n  mole: mole\n")
    link = tmp_path / "custom_nodes" / "ComfyUI-MoLE-MoA"
    link.parent.mkdir()
    link.symlink_to(hostenv.REPO, target_is_directory=True)
    script = textwrap.dedent(f"""
        import asyncio, json, sys
        sys.path.insert(0, {str(hostenv.REPO / "tests")!r})
        import hostenv; hostenv.import_host()
        import utils.extra_config, folder_paths, nodes
        utils.extra_config.load_extra_path_config({str(yaml)!r})
        ok = asyncio.run(nodes.load_custom_node({str(link)!r}))
        print(json.dumps({{"ok": ok, "nodes": sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith(("MoLE_", "MoA_"))),
                          "names": {{k: nodes.NODE_DISPLAY_NAME_MAPPINGS.get(k) for k in ("MoLE_LoadExperts", "MoLE_ApplyGating")}},
                          "mole": folder_paths.get_folder_paths("mole"),
                          "web": nodes.EXTENSION_WEB_DIRS.get("ComfyUI-MoLE-MoA")}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] is True
    assert {"MoLE_LoadExperts", "MoLE_ApplyGating"} <= set(result["nodes"])
    assert result["names"] == {"MoLE_LoadExperts": "Load MoLE Experts", "MoLE_ApplyGating": "Apply MoLE Gating"}
    assert str(extra) in result["mole"]
    assert result["mole"][0].endswith(os.path.join("models", "mole"))
    assert result["web"] and {"fit_labels.js", "labels.js"} <= {p.name for p in Path(result["web"]).iterdir()}


def test_both_gate_formats_and_namings_patch_every_target_layer(nodes_mod, sd15, sd15_files):
    assert len(sd15_files["layers"]) == 192  # the released SD1.5 experts' layer count
    ex = experts(nodes_mod)
    for gates in ("released.safetensors", "pack_paper.safetensors"):
        patched = apply(nodes_mod, sd15.model, ex, gates)
        forwards = [k for k in patched.object_patches if k.endswith(".forward")]
        assert len(forwards) == 192
        assert len(patched.get_additional_models_with_key("mole")) == 1
    assert sd15.model.object_patches == {}  # the input model is never changed
    peft = nodes_mod.LoadMoLEExperts.execute("feet_peft.safetensors", "feet", 1.0, "None", "", 1.0, ex).result[0]
    three = apply(nodes_mod, sd15.model, peft, "three.safetensors")
    assert len([k for k in three.object_patches if k.endswith(".forward")]) == 192


def test_sampling_with_mole_changes_output_and_leaves_the_base_intact(nodes_mod, sd15, sd15_files):
    base_before = sample(sd15, sd15.model)
    patched = apply(nodes_mod, sd15.model, experts(nodes_mod))
    mole_out = sample(sd15, patched)
    assert torch.isfinite(mole_out).all()
    assert not torch.allclose(mole_out, base_before, atol=1e-4)
    base_after = sample(sd15, sd15.model)
    assert torch.equal(base_before, base_after)
    assert sd15.model.object_patches == {} and sd15.model.get_additional_models() == []


def test_strength_zero_samples_exactly_the_unpatched_model(nodes_mod, sd15, sd15_files):
    ex = experts(nodes_mod)
    base = sample(sd15, sd15.model)
    assert torch.equal(sample(sd15, apply(nodes_mod, sd15.model, ex, strength=0.0)), base)
    zero_experts = experts(nodes_mod, strengths=(0.0, 0.0))
    assert torch.equal(sample(sd15, apply(nodes_mod, sd15.model, zero_experts)), base)


@pytest.mark.parametrize("cfg,batch,size", [(1.0, 1, (64, 64)), (3.0, 2, (96, 64))])
def test_cfg_batch_and_non_square_sizes(nodes_mod, sd15, sd15_files, cfg, batch, size):
    patched = apply(nodes_mod, sd15.model, experts(nodes_mod), mode="both")
    out = sample(sd15, patched, cfg=cfg, batch=batch, width=size[0], height=size[1], steps=1)
    assert out.shape == (batch, 4, size[1] // 8, size[0] // 8)
    assert torch.isfinite(out).all()
    base = sample(sd15, sd15.model, cfg=cfg, batch=batch, width=size[0], height=size[1], steps=1)
    assert not torch.allclose(out, base, atol=1e-4)
    if batch > 1:  # per-sample global gates: each image as if sampled alone
        alone = sample(sd15, patched, cfg=cfg, batch=1, width=size[0], height=size[1], steps=1)
        torch.testing.assert_close(out[:1], alone, rtol=1e-3, atol=1e-3)


def test_modes_differ(nodes_mod, sd15, sd15_files):
    ex = experts(nodes_mod)
    outs = {
        mode: sample(sd15, apply(nodes_mod, sd15.model, ex, mode=mode), steps=1) for mode in ("both", "local", "global")
    }
    assert not torch.allclose(outs["both"], outs["local"], atol=1e-5)
    assert not torch.allclose(outs["both"], outs["global"], atol=1e-5)


def test_experts_reach_the_layers_lora_loader_patches(pack, sd15, sd15_files, tmp_path):
    """Kohya, peft and old diffusers ("processor") namings of one LoRA: each of its layers maps
    to the weight LoraLoader patches for that name (ComfyUI's own key map), and every naming to
    the same layers. Peft attention names, which this host's LoraLoader skips, land on the
    layers a kohya file of them patches."""
    import comfy.lora

    import nodes
    from mixture_core.lora_format import parse_lora_state_dict
    from mixture_core.safetensors_io import load_safetensors

    unet_layers = importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.unet_layers")
    resolve = unet_layers.layer_resolver(sd15.model)
    key_map = comfy.lora.model_lora_keys_unet(sd15.model.model, {})
    layers, peft = sd15_files["layers"], mw.peft_names(sd15.model)
    peft_sd, _ = load_safetensors(sd15_files["loras"] / "feet_peft.safetensors")
    # Old diffusers attention-processor LoRAs: "...attn1.processor.to_q_lora.down.weight".
    old = {
        k.replace(".to_", ".processor.to_")
        .replace(".to_out.0.", ".to_out.")
        .replace(".lora_A.", "_lora.down.")
        .replace(".lora_B.", "_lora.up."): v
        for k, v in peft_sd.items()
        if ".attn" in k
    }
    old_file = tmp_path / "old_diffusers.safetensors"
    from safetensors.torch import save_file

    save_file(old, str(old_file))

    def loader_weights(name):
        """The weights LoraLoader patches for a file of the loras folders (sd15_files' or tmp_path)."""
        patched, _ = nodes.LoraLoader().load_lora(sd15.model, sd15.clip, name, 1.0, 0.0)
        return set(patched.patches)

    def mole_weights(path):
        names = parse_lora_state_dict(load_safetensors(path)[0], path)
        mapped = {name: resolve(name) for name in names}
        assert None not in mapped.values(), [n for n, m in mapped.items() if m is None]
        for name, module in mapped.items():
            if name in key_map:  # the very map LoraLoader looks names up in
                assert key_map[name] == f"diffusion_model.{module}.weight", name
        return {f"diffusion_model.{m}.weight" for m in mapped.values()}

    every = {f"diffusion_model.{p}.weight" for p in layers}
    kohya = mole_weights(sd15_files["loras"] / "face.safetensors")
    assert kohya == loader_weights("face.safetensors") == every
    attention = {w for w in every if ".attn" in w}
    with model_folders(loras=tmp_path):
        assert mole_weights(old_file) == loader_weights("old_diffusers.safetensors") == attention
    peft_loaded = loader_weights("feet_peft.safetensors")
    assert mole_weights(sd15_files["loras"] / "feet_peft.safetensors") == every
    skipped = every - peft_loaded  # this host's LoraLoader skips peft attention names (ComfyUI issue 9753)
    assert peft_loaded <= every and all(".attn" in w for w in skipped), sorted(skipped)[:5]
    assert all(resolve(peft[p]) == p for p in layers)


@pytest.mark.slow
def test_composes_with_lora_loader_and_other_patches(nodes_mod, sd15, sd15_files):
    import comfy.sd
    import comfy.utils

    ex = experts(nodes_mod)
    style = comfy.utils.load_torch_file(str(sd15_files["loras"] / "face.safetensors"), safe_load=True)
    lora_model, _ = comfy.sd.load_lora_for_models(sd15.model, sd15.clip, style, 0.7, 0.0)
    both = apply(nodes_mod, lora_model, ex)
    assert len(both.patches) > 0  # the LoRA weight patches survive the clone
    out_both = sample(sd15, both, steps=1)
    out_mole = sample(sd15, apply(nodes_mod, sd15.model, ex), steps=1)
    out_lora = sample(sd15, lora_model, steps=1)
    assert not torch.allclose(out_both, out_mole, atol=1e-5) and not torch.allclose(out_both, out_lora, atol=1e-5)

    # Another pack's patches on the same model: an attention patch and an object patch on the
    # very forward MoLE replaces. Both must still run (chained, not clobbered).
    calls = {"attn1": 0, "forward": 0}
    other = sd15.model.clone()

    def attn1_patch(n, context, value, extra_options):
        calls["attn1"] += 1
        return n, context, value

    key = "diffusion_model.input_blocks.1.1.proj_in.forward"
    original = other.get_model_object(key)

    def other_forward(x):
        calls["forward"] += 1
        return original(x)

    other.set_model_attn1_patch(attn1_patch)
    other.add_object_patch(key, other_forward)
    chained = apply(nodes_mod, other, ex)
    sample(sd15, chained, steps=1)
    assert calls["attn1"] > 0 and calls["forward"] > 0
    assert other.object_patches[key] is other_forward  # the other pack's clone is untouched


@pytest.mark.slow
def test_lowvram_load_gives_the_same_result(nodes_mod, sd15, sd15_files):
    """Partial loading (weights cast per layer, LoRA patches applied on the fly) with MoLE. The
    model runs as ComfyUI's executor runs it, under torch.inference_mode(): outside it, the base
    UNet's weights require grad (ComfyUI leaves them as loaded) and an inference-mode context
    cannot be saved for their backward; earlier tests that patched and unpatched those weights
    (set back as requires_grad=False parameters) used to hide that."""
    import comfy.model_management as mm

    patched = apply(nodes_mod, sd15.model, experts(nodes_mod))
    mole_weights = patched.get_additional_models_with_key("mole")[0].model
    assert not any(p.requires_grad for p in mole_weights.parameters())  # as ComfyUI's own patched weights
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([1.0])
    context = encode(sd15, "a hand")[0][0]
    mm.unload_all_models()
    mm.load_models_gpu([patched] + patched.get_nested_additional_models(), force_full_load=True)
    with torch.inference_mode():
        full = patched.model.apply_model(x, sigma, c_crossattn=context)
    mm.unload_all_models()
    patched.patch_model(device_to=patched.load_device, lowvram_model_memory=64 * 1024 * 1024)
    try:
        assert patched.model.model_lowvram
        with torch.inference_mode():
            low = patched.model.apply_model(x, sigma, c_crossattn=context)
    finally:
        patched.unpatch_model(device_to=patched.offload_device)
    torch.testing.assert_close(low, full, rtol=1e-4, atol=1e-4)


def test_bf16_model(nodes_mod, sd15, sd15_files):
    import comfy.sd

    sd = {k: v for k, v in sd15.model.model.diffusion_model.state_dict().items()}
    bf16 = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.bfloat16})
    assert bf16.model_dtype() == torch.bfloat16
    patched = apply(nodes_mod, bf16, experts(nodes_mod))
    layer = patched.get_additional_models_with_key("mole")[0].model[0]
    # Expert weights are kept in the dtype the UNet computes in (bf16 storage may compute in fp32).
    assert layer.down.dtype == (bf16.model.manual_cast_dtype or torch.bfloat16)
    out = sample(sd15, patched, steps=1)
    assert torch.isfinite(out).all()


def test_composes_with_controlnet(nodes_mod, sd15, sd15_files, sd15_controlnet_path):
    import comfy.controlnet

    import nodes

    control = comfy.controlnet.load_controlnet(str(sd15_controlnet_path))
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    positive, negative = encode(sd15, "a waving hand"), encode(sd15, "")
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, control, hint, 1.0, 0.0, 1.0
    )[:2]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def run(model):
        with torch.inference_mode():
            return nodes.common_ksampler(model, 7, 1, 2.0, "euler", "normal", positive, negative, latent)[0]["samples"]

    with_mole = run(apply(nodes_mod, sd15.model, experts(nodes_mod)))
    assert torch.isfinite(with_mole).all()
    assert not torch.allclose(with_mole, run(sd15.model), atol=1e-5)


@pytest.mark.slow
def test_sdxl_layout_with_sai_named_experts_and_released_gates(nodes_mod, pack, sdxl, tmp_path):
    """The released MoLE weights are SDXL: SAI-named kohya experts and released-format gates."""
    import nodes

    layers = mw.target_layers(sdxl.model)
    assert len(layers) == 722
    names = mw.kohya_names(sdxl.model, "sai")
    assert (
        names["input_blocks.4.1.transformer_blocks.1.attn2.to_k"]
        == "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"
    )
    mw.write_lora(tmp_path / "xl_face.safetensors", layers, names, rank=4, seed=11)
    mw.write_lora(tmp_path / "xl_hand.safetensors", layers, names, rank=4, seed=12)
    mw.write_released_gates(tmp_path / "xl_gates.safetensors", layers, names, dtype=torch.bfloat16)
    with model_folders(loras=tmp_path, mole=tmp_path):
        ex = experts(nodes_mod, "xl_face.safetensors", "xl_hand.safetensors")
        patched = apply(nodes_mod, sdxl.model, ex, "xl_gates.safetensors")
    assert len([k for k in patched.object_patches if k.endswith(".forward")]) == 722
    visualize = importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.visualize_nodes")
    recorded = visualize.MoLERecordGates.execute(patched).result[0]  # reports each layer that gates
    with torch.inference_mode():
        out = nodes.common_ksampler(
            recorded, 3, 1, 1.0, "euler", "normal", sdxl.positive, sdxl.negative, sdxl.latent(64, 64)
        )[0]["samples"]
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    assert len(recorded.get_attachment(visualize.GATES_KEY).layers_seen) == 722  # every patch fires


# ---- bad input: a clear message naming the file, and nothing applied ----------------------


@pytest.fixture(scope="module")
def bad_files(sd15, sd15_files):
    import comfy.supported_models

    loras, gates, layers, kohya = sd15_files["loras"], sd15_files["mole"], sd15_files["layers"], sd15_files["kohya"]
    # SDXL-layout experts, named as SDXL releases name them (SAI style), from an SDXL UNet on the meta device.
    sdxl_config = dict(
        comfy.supported_models.SDXL.unet_config,
        num_res_blocks=[2, 2, 2],
        channel_mult=[1, 2, 4],
        transformer_depth=[0, 0, 2, 2, 10, 10],
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
        transformer_depth_middle=10,
        num_head_channels=64,
        in_channels=4,
        out_channels=4,
        use_spatial_transformer=True,
        legacy=False,
        image_size=32,
        num_classes="sequential",
        dims=2,
        num_heads=-1,
        disable_self_attentions=None,
        use_checkpoint=False,
    )
    sdxl = type("Patcher", (), {})()
    sdxl.model = comfy.supported_models.SDXL(sdxl_config).get_model({}, device="meta")
    sdxl_layers = mw.target_layers(sdxl)
    mw.write_lora(loras / "sdxl_face.safetensors", sdxl_layers, mw.kohya_names(sdxl, "sai"), rank=2, seed=4)
    mw.write_lora(loras / "sdxl_hand.safetensors", sdxl_layers, mw.kohya_names(sdxl, "sai"), rank=2, seed=5)
    fewer = sorted(layers)[:-3]
    mw.write_lora(loras / "hand_fewer.safetensors", layers, kohya, seed=6, only=set(fewer))
    nan = mw.write_lora(loras / "nan.safetensors", layers, kohya, seed=7)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(nan))
    first = sorted(k for k in sd if k.endswith("lora_up.weight"))[0]
    sd[first][0, 0] = float("nan")
    save_file(sd, str(nan))
    data = (loras / "face.safetensors").read_bytes()
    (loras / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"a": torch.zeros(2)}, loras / "pickle.pt")
    save_file({"some.other.weight": torch.zeros(3, 3)}, str(loras / "not_a_lora.safetensors"))
    save_file({"some.other.weight": torch.zeros(3, 3)}, str(gates / "unknown.safetensors"))
    mw.write_pack_gates(gates / "gates_fewer.safetensors", {k: layers[k] for k in fewer})
    wide = dict(layers)
    first_layer = sorted(layers)[0]
    wide[first_layer] = (layers[first_layer][0] + 1, layers[first_layer][1], layers[first_layer][2])
    mw.write_pack_gates(gates / "gates_wrong_width.safetensors", wide)
    mw.write_pack_gates(gates / "gates_sdxl_family.safetensors", layers, family="sdxl")
    mw.write_pack_gates(gates / "gates_body.safetensors", layers, ("face", "body"))
    return sd15_files


BAD_CASES = [
    # (description, experts kwargs, gate file, expected message parts)
    (
        "sdxl experts on sd15",
        dict(face="sdxl_face.safetensors", hand="sdxl_hand.safetensors"),
        "released.safetensors",
        ["sdxl_face.safetensors", "do not exist in this model"],
    ),
    (
        "different layer sets",
        dict(hand="hand_fewer.safetensors"),
        "released.safetensors",
        ["hand_fewer.safetensors", "adapts other layers", "3 differ"],
    ),
    ("gate misses layers", {}, "gates_fewer.safetensors", ["gates_fewer.safetensors", "3 expert layers have no gate"]),
    (
        "gate width",
        {},
        "gates_wrong_width.safetensors",
        ["gates_wrong_width.safetensors", "do not fit together", "local_weight has shape"],
    ),
    ("gate family", {}, "gates_sdxl_family.safetensors", ["gates_sdxl_family.safetensors", "sdxl model", "sd15"]),
    ("expert names", {}, "gates_body.safetensors", ["gates_body.safetensors", "['face', 'body']", "['face', 'hand']"]),
    ("unknown gate format", {}, "unknown.safetensors", ["unknown.safetensors", "is not a MoLE gate file"]),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_gates_and_experts_are_refused_clearly(nodes_mod, sd15, bad_files, case):
    _, expert_kwargs, gate_file, expected = case
    model = sd15.model.clone()
    ex = experts(nodes_mod, **expert_kwargs)
    with pytest.raises(Exception) as info:
        apply(nodes_mod, model, ex, gate_file)
    for part in expected:
        assert part in str(info.value), str(info.value)
    assert model.object_patches == {} and model.get_additional_models() == []


@pytest.mark.parametrize(
    "filename,expected,found_by",
    [
        ("nan.safetensors", "NaN or inf", "apply"),  # needs the data, which only Apply reads
        ("truncated.safetensors", "truncated", "load"),
        ("pickle.pt", "pickle", "load"),
        ("not_a_lora.safetensors", "holds no LoRA layers", "load"),
    ],
)
def test_bad_expert_files_are_refused_clearly(nodes_mod, sd15, bad_files, filename, expected, found_by):
    model = sd15.model.clone()
    with pytest.raises(Exception) as info:
        ex = experts(nodes_mod, face=filename)
        assert found_by == "apply", "Load MoLE Experts should have refused the file"
        apply(nodes_mod, model, ex)
    assert filename in str(info.value) and expected in str(info.value), str(info.value)
    assert model.object_patches == {} and model.get_additional_models() == []

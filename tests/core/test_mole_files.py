"""Gate and LoRA file formats, safe loading, and the assembly checks (no host needed)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mixture_core.errors import WeightFileError
from mixture_core.lora_format import parse_lora_state_dict
from mixture_core.mole import GateWeights
from mixture_core.mole_files import (
    Expert,
    build_mole_layers,
    read_gate_file,
    save_gate_file,
    save_released_gate_file,
)
from mixture_core.safetensors_io import load_safetensors

LAYERS = {"input_blocks.1.1.proj_in": (8, 8, True), "input_blocks.1.1.transformer_blocks.0.attn1.to_q": (8, 8, False)}
KOHYA = {
    "input_blocks.1.1.proj_in": "lora_unet_down_blocks_0_attentions_0_proj_in",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
}
RESOLVE = {**{v: k for k, v in KOHYA.items()}, **{k: k for k in KOHYA}}.get


def kohya_sd(seed, rank=4, alpha=2.0, layers=LAYERS):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, (d_in, d_out, conv) in layers.items():
        down, up = torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g)
        if conv:
            down, up = down[..., None, None], up[..., None, None]
        sd[f"{KOHYA[path]}.lora_down.weight"] = down
        sd[f"{KOHYA[path]}.lora_up.weight"] = up
        sd[f"{KOHYA[path]}.alpha"] = torch.tensor(alpha)
    return sd


def gates(n=2, variant="released", seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        p: GateWeights(
            torch.randn(n, d_in, generator=g),
            torch.randn(n, generator=g),
            torch.randn(n, d_out if variant == "released" else d_in, generator=g),
            torch.randn(n, generator=g),
        )
        for p, (d_in, d_out, _) in LAYERS.items()
    }


def expert(name, seed, **kw):
    return Expert(name, f"/models/{name}.safetensors", 1.0, parse_lora_state_dict(kohya_sd(seed, **kw)))


def test_kohya_peft_and_diffusers_namings_parse_to_the_same_pairs():
    sd = kohya_sd(0)
    k = parse_lora_state_dict(sd)
    name = KOHYA["input_blocks.1.1.proj_in"]
    assert k[name].is_conv and k[name].rank == 4 and k[name].scale == 0.5
    peft = {
        key.replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v
        for key, v in sd.items()
        if not key.endswith("alpha")
    }
    p = parse_lora_state_dict(peft)
    assert p[name].scale == 1.0  # no alpha stored: scale 1, as ComfyUI's LoraLoader
    torch.testing.assert_close(p[name].down, k[name].down)
    old = {key.replace(".lora_down.", ".lora.down.").replace(".lora_up.", ".lora.up."): v for key, v in sd.items()}
    assert set(parse_lora_state_dict(old)) == set(k)


def test_lora_errors_name_the_problem():
    sd = kohya_sd(0)
    del sd[f"{KOHYA['input_blocks.1.1.proj_in']}.lora_up.weight"]
    with pytest.raises(WeightFileError, match="no .*lora_up.weight"):
        parse_lora_state_dict(sd, "x.safetensors")
    with pytest.raises(WeightFileError, match="3x3 conv"):
        parse_lora_state_dict(
            {"a.lora_down.weight": torch.zeros(4, 8, 3, 3), "a.lora_up.weight": torch.zeros(8, 4, 1, 1)}
        )
    with pytest.raises(WeightFileError, match="holds no LoRA layers"):
        parse_lora_state_dict({"w": torch.zeros(2)}, "x.safetensors")


def test_pack_gate_format_round_trip(tmp_path):
    g = gates(3, "paper")
    save_gate_file(tmp_path / "g.safetensors", g, ["face", "hand", "feet"], "paper", "sd15")
    tensors, meta = load_safetensors(tmp_path / "g.safetensors")
    read = read_gate_file(tensors, meta, "g.safetensors")
    assert read.variant == "paper" and read.expert_names == ["face", "hand", "feet"] and read.base_family == "sd15"
    for p in LAYERS:
        torch.testing.assert_close(read.layers[p].global_weight, g[p].global_weight)


def test_released_format_reads_rows_as_face_then_hand(tmp_path):
    g = gates(2, "released")
    save_released_gate_file(tmp_path / "r.safetensors", g, KOHYA)
    tensors, meta = load_safetensors(tmp_path / "r.safetensors")
    key = f"moe_{KOHYA['input_blocks.1.1.proj_in']}.softmoe.hand_scale.weight"
    assert key in tensors and tensors[key].shape == (1, 8)
    read = read_gate_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, meta)  # bf16 release files
    assert read.variant == "released" and read.expert_names == ["face", "hand"] and read.naming == "kohya"
    layer = read.layers[KOHYA["input_blocks.1.1.proj_in"]]
    torch.testing.assert_close(
        layer.global_weight[1], g["input_blocks.1.1.proj_in"].global_weight[1], atol=1e-2, rtol=1e-2
    )
    assert layer.local_weight.dtype == torch.float32


def test_build_orders_experts_by_gate_names_and_checks_everything():
    g = read_gate_file(*_saved_pack_gates(gates(2), ["hand", "face"]))
    face, hand = expert("face", 1), expert("hand", 2)
    layers = build_mole_layers([face, hand], g, RESOLVE)
    layer = layers["input_blocks.1.1.transformer_blocks.0.attn1.to_q"]
    hand_down = hand.layers[KOHYA["input_blocks.1.1.transformer_blocks.0.attn1.to_q"]].down
    torch.testing.assert_close(layer.down[:4], hand_down)  # the gate file's first expert comes first

    with pytest.raises(
        WeightFileError, match=r"for experts \['hand', 'face'\] but the loaded experts are named \['face', 'feet'\]"
    ):
        build_mole_layers([face, expert("feet", 3)], g, RESOLVE)
    with pytest.raises(WeightFileError, match="two experts share a name"):
        build_mole_layers([face, expert("face", 3)], g, RESOLVE)
    with pytest.raises(WeightFileError, match="do not exist in this model"):
        build_mole_layers([face, hand], g, lambda name: None)
    narrow = lambda path: (7, 8, LAYERS[path][2])  # noqa: E731
    with pytest.raises(WeightFileError, match="does not fit this model's layers"):
        build_mole_layers([face, hand], g, RESOLVE, module_widths=narrow)


def _saved_pack_gates(g, names, variant="released"):
    import tempfile

    path = Path(tempfile.mkdtemp()) / "g.safetensors"
    save_gate_file(path, g, names, variant, "sd15")
    tensors, meta = load_safetensors(path)
    return tensors, meta, str(path)


def test_gate_metadata_problems(tmp_path):
    tensors, meta, path = _saved_pack_gates(gates(2), ["face", "hand"])
    with pytest.raises(WeightFileError, match="version '9' is not supported"):
        read_gate_file(tensors, {**meta, "mole.format_version": "9"}, path)
    missing = {k: v for k, v in tensors.items() if not k.endswith("local.bias")}
    with pytest.raises(WeightFileError, match="missing"):
        read_gate_file(missing, meta, path)
    with pytest.raises(WeightFileError, match="is not a MoLE gate file"):
        read_gate_file({"x.weight": torch.zeros(1)}, {}, path)


def test_safe_loading_refuses_pickles_truncation_and_nan(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "p.ckpt")
    with pytest.raises(WeightFileError, match="p.ckpt: is a pickle-based file"):
        load_safetensors(tmp_path / "p.ckpt")
    save_file({"a": torch.randn(64, 64)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(WeightFileError, match="cut.safetensors: is truncated"):
        load_safetensors(tmp_path / "cut.safetensors")
    save_file({"a": torch.tensor([1.0, float("inf")])}, str(tmp_path / "inf.safetensors"))
    with pytest.raises(WeightFileError, match="NaN or inf"):
        load_safetensors(tmp_path / "inf.safetensors")
    (tmp_path / "text.safetensors").write_text("hello world, not weights")
    with pytest.raises(WeightFileError, match="text.safetensors"):
        load_safetensors(tmp_path / "text.safetensors")
    with pytest.raises(WeightFileError, match="file not found"):
        load_safetensors(tmp_path / "nope.safetensors")


def test_header_lengths_starting_with_0x80_are_not_taken_for_pickles(tmp_path):
    """A safetensors header length whose low byte is 0x80 (128, 384, ...) is a valid file."""
    for pad in range(300):
        path = tmp_path / "f.safetensors"
        save_file({"a": torch.zeros(2)}, str(path), {"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            tensors, _ = load_safetensors(path)
            assert torch.equal(tensors["a"], torch.zeros(2))
            return
    pytest.fail("no padding gave a header length with low byte 0x80")


def test_mixture_core_imports_without_comfy():
    """mixture_core must import where ComfyUI cannot be imported at all."""
    repo = Path(__file__).resolve().parents[2]
    script = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("comfy", "comfy_api", "folder_paths", "nodes", "comfy_extras"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import mixture_core, mixture_core.mole, mixture_core.mole_files, mixture_core.lora_format, mixture_core.safetensors_io
        import pkgutil, importlib
        for m in pkgutil.iter_modules(mixture_core.__path__):
            importlib.import_module("mixture_core." + m.name)
        assert not any(k.split(".")[0] in ("comfy", "comfy_api") for k in sys.modules)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr

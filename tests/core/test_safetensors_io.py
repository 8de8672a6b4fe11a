"""Safe reading of weight files: the limits checked before the safetensors library parses a
header, fp8 files, and the explanations given when the library refuses a file."""

import pickle
import struct
import time
import tracemalloc

import pytest
import torch
from safetensors.torch import save_file

from mixture_core import safetensors_io
from mixture_core.errors import WeightFileError
from mixture_core.lora_format import parse_lora_state_dict
from mixture_core.mole_files import read_gate_file
from mixture_core.safetensors_io import MAX_HEADER_BYTES, MAX_TENSORS, SafetensorsFile, load_safetensors


def test_a_header_over_the_cap_is_refused_from_its_length_alone(tmp_path):
    path = tmp_path / "huge_header.safetensors"
    claimed = MAX_HEADER_BYTES + 50_000_000
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", claimed) + b'{"a":')
        f.truncate(8 + claimed + 16)  # sparse: the file really is that long, its header is not truncated
    tracemalloc.start()
    try:
        with pytest.raises(WeightFileError, match=r"huge_header.safetensors: its header claims 150,000,000 bytes"):
            SafetensorsFile(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak} bytes allocated: the header was read"


def _many_tensors_file(path, n):
    """A valid safetensors file of n empty uint8 tensors, written without building n tensors."""
    entries = b",".join(b'"%d":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}' % i for i in range(n))
    header = b"{" + entries + b"}"
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def test_a_million_tensor_header_is_refused_fast_without_reading_tensors(tmp_path, monkeypatch):
    small = _many_tensors_file(tmp_path / "small.safetensors", 1000)
    assert len(SafetensorsFile(small).keys) == 1000  # the layout itself is valid
    path = _many_tensors_file(tmp_path / "million.safetensors", 1_000_000)

    def no_library(*args, **kwargs):
        raise AssertionError("the library was handed the header")

    monkeypatch.setattr(safetensors_io, "safe_open", no_library)
    start = time.perf_counter()
    refused = rf"million.safetensors: .*1,000,000 tensors, more than the {MAX_TENSORS:,}"
    with pytest.raises(WeightFileError, match=refused):
        load_safetensors(path)
    assert time.perf_counter() - start < 2.0


def test_fp8_files_are_read_and_a_nan_in_them_is_named(tmp_path):
    up = torch.randn(8, 4).to(torch.float8_e4m3fn)
    down = torch.randn(4, 8).to(torch.float8_e5m2)
    lora = {"lay.lora_up.weight": up, "lay.lora_down.weight": down, "lay.alpha": torch.tensor(2.0)}
    save_file(lora, str(tmp_path / "fp8.safetensors"))
    f = SafetensorsFile(tmp_path / "fp8.safetensors")
    pair = parse_lora_state_dict(f.layout(), f.path)["lay"]
    assert pair.up.dtype == torch.float8_e4m3fn and pair.up.is_meta and pair.scale == 0.5
    read = pair.read(f.read(pair.keys).__getitem__)
    assert torch.equal(read.up.float(), up.float()) and torch.equal(read.down.float(), down.float())

    bad = up.clone()
    bad[3, 1] = float("nan")
    save_file({**lora, "lay.lora_up.weight": bad}, str(tmp_path / "fp8_nan.safetensors"))
    named = r"fp8_nan.safetensors: 1 tensor\(s\) hold NaN or inf values\n  lay.lora_up.weight"
    with pytest.raises(WeightFileError, match=named):
        load_safetensors(tmp_path / "fp8_nan.safetensors")


def test_a_dtype_the_pack_cannot_use_is_named(tmp_path):
    save_file({"w": torch.zeros(2, dtype=torch.uint16)}, str(tmp_path / "u16.safetensors"))
    named = r"u16.safetensors: 1 tensor\(s\) have a dtype this pack cannot use.*\n  w: U16"
    with pytest.raises(WeightFileError, match=named):
        SafetensorsFile(tmp_path / "u16.safetensors")


def test_refusals_are_explained(tmp_path):
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    torch.save({"a": torch.zeros(1)}, tmp_path / "zip.ckpt")
    for name in ("legacy.pt", "zip.ckpt"):
        with pytest.raises(WeightFileError, match=f"{name}: is a pickle-based file"):
            load_safetensors(tmp_path / name)
    save_file({"a": torch.randn(64, 64)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut_data.safetensors").write_bytes(data[:-100])
    (tmp_path / "cut_header.safetensors").write_bytes(data[:20])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name, problem in [
        ("cut_data", "is truncated"),
        ("cut_header", "is truncated: its header needs"),
        ("empty", "is not a safetensors file"),
    ]:
        with pytest.raises(WeightFileError, match=f"{name}.safetensors: {problem}"):
            load_safetensors(tmp_path / f"{name}.safetensors")
    (tmp_path / "bad_json.safetensors").write_bytes(struct.pack("<Q", 8) + b"{nope!!}")
    with pytest.raises(WeightFileError, match="bad_json.safetensors: could not be read as safetensors"):
        load_safetensors(tmp_path / "bad_json.safetensors")


def test_key_names_are_checked_before_any_tensor_is_read(tmp_path, monkeypatch):
    save_file({"not.a.gate": torch.zeros(4, 4)}, str(tmp_path / "g.safetensors"))
    reads = []
    real_read = SafetensorsFile.read
    monkeypatch.setattr(
        SafetensorsFile, "read", lambda self, keys, *a, **k: reads.append(list(keys)) or real_read(self, keys, *a, **k)
    )
    with pytest.raises(WeightFileError, match="is not a MoLE gate file"):
        load_safetensors(
            tmp_path / "g.safetensors", check_layout=lambda layout, meta: read_gate_file(layout, meta, "g")
        )
    assert reads == [[]]  # only the layout's single-element tensors (none here) were read
    tensors, _ = load_safetensors(tmp_path / "g.safetensors", check_layout=lambda layout, meta: None)
    assert list(tensors) == ["not.a.gate"] and reads[-1] == ["not.a.gate"]


def test_an_fp8_moa_file_loads_widened_to_fp16_exactly(tmp_path):
    from safetensors import safe_open

    from mixture_core.moa import AttentionShape, MoAModel
    from mixture_core.moa_files import load_moa_file, save_moa_file

    layer = "input_blocks.1.1.transformer_blocks.0.attn2"
    model = MoAModel(
        {layer: AttentionShape(16, 12, 2, 4)},
        router_hidden=8,
        fusion_hidden=16,
        spacetime_dim=6,
        text_dim=12,
        image_dim=10,
    )
    save_moa_file(tmp_path / "f32.safetensors", model, "sd15")
    with safe_open(str(tmp_path / "f32.safetensors"), "pt") as f:
        fp8 = {k: f.get_tensor(k).to(torch.float8_e4m3fn) for k in f.keys()}
        metadata = f.metadata()
    save_file(fp8, str(tmp_path / "fp8.safetensors"), metadata)
    loaded = load_moa_file(tmp_path / "fp8.safetensors")
    weight = loaded.state_dict()[next(k for k in loaded.state_dict() if k.endswith("to_q.weight"))]
    assert weight.dtype == torch.float16
    source = fp8[next(k for k in fp8 if k.endswith("to_q.weight"))]
    assert torch.equal(weight.float(), source.float())

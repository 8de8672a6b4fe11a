"""Training data and command lines, without the host: folders with captions or metadata.jsonl,
crops, the resumable sampler, and the clear errors bad data gives (the scripts stop before
loading any model, naming the first bad file)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from training_helpers import make_dataset, run_script

from training.data import DataError, ImageCaptionDataset, StreamSampler, load_image, scan_dataset


def test_caption_files_and_metadata_jsonl(tmp_path):
    a = scan_dataset(make_dataset(tmp_path / "a", n=3))
    b = scan_dataset(make_dataset(tmp_path / "b", n=3, layout="jsonl"))
    assert [s.caption for s in a] == [s.caption for s in b] == [f"a close-up photo, sample {i}" for i in range(3)]
    assert [s.image.name for s in a] == ["img0.png", "img1.png", "img2.png"]


def test_kohya_meta_cap_json(tmp_path):
    """kohya's fine-tuning metadata: image keys without extension, relative or absolute; captions,
    or tags where there is no caption; a key with no image is named."""
    data = make_dataset(tmp_path / "k", n=3)
    for p in data.glob("*.txt"):
        p.unlink()
    meta = {
        "img0": {"caption": "first"},
        str(data / "img1"): {"caption": "second", "tags": "x"},
        "img2": {"tags": "a, b"},
    }
    (data / "meta_cap.json").write_text(json.dumps(meta))
    assert [(s.image.name, s.caption) for s in scan_dataset(data)] == [
        ("img0.png", "first"),
        ("img1.png", "second"),
        ("img2.png", "a, b"),
    ]
    (data / "meta_cap.json").write_text(json.dumps({**meta, "gone": {"caption": "x"}}))
    with pytest.raises(DataError, match=r"meta_cap\.json, entry 'gone': names no image"):
        scan_dataset(data)


def test_crops_keep_the_layout_comfyui_uses(tmp_path):
    from PIL import Image

    Image.new("RGB", (96, 64), (255, 0, 0)).save(tmp_path / "wide.png")
    center = load_image(tmp_path / "wide.png", 64)
    assert center.shape == (64, 64, 3) and center.dtype == torch.float32
    assert float(center.max()) <= 1.0 and float(center[..., 0].min()) > 0.99
    ds = ImageCaptionDataset([scan_dataset(make_dataset(tmp_path / "d", n=1, size=96))[0]], 64, crop="random", seed=3)
    # The random crop is seeded by the stream position: the same position gives the same pixels.
    assert torch.equal(ds[(0, 5)]["pixels"], ds[(0, 5)]["pixels"])


def test_stream_sampler_is_resumable_and_shards_processes():
    whole = StreamSampler(5, batch_size=2, seed=1)
    stream = [whole.batch(m) for m in range(6)]
    resumed = iter(StreamSampler(5, batch_size=2, seed=1, start=3))
    assert [next(resumed) for _ in range(3)] == stream[3:]
    # Two processes with batch 1 read the same samples, in the same positions, as one with batch 2.
    r0, r1 = StreamSampler(5, 1, 1, rank=0, world_size=2), StreamSampler(5, 1, 1, rank=1, world_size=2)
    assert [r0.batch(m) + r1.batch(m) for m in range(6)] == stream
    epoch = sorted(i for batch in stream[:2] for i, _ in batch) + [stream[2][0][0]]
    assert sorted(epoch) == [0, 1, 2, 3, 4]  # every image once per epoch


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda d: (d / "img1.txt").unlink(), "img1.png: has no caption: expected img1.txt"),
        (lambda d: (d / "img0.png").write_bytes(b"not an image"), "img0.png: is not a readable image"),
        (lambda d: [p.unlink() for p in d.iterdir()], "holds no images"),
    ],
    ids=["missing-caption", "unreadable-image", "empty"],
)
def test_bad_folders_name_the_first_bad_file(tmp_path, break_it, expected):
    data = make_dataset(tmp_path / "d", n=2)
    break_it(data)
    with pytest.raises(DataError, match=expected.replace(".", r"\.")):
        scan_dataset(data)


def test_bad_metadata_lines_name_the_line(tmp_path):
    data = make_dataset(tmp_path / "d", n=2, layout="jsonl")
    (data / "metadata.jsonl").write_text(
        json.dumps({"file_name": "img0.png", "text": "ok"})
        + "\n"
        + json.dumps({"file_name": "gone.png", "text": "x"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"gone\.png: is named in .*metadata\.jsonl, line 2 but does not exist"):
        scan_dataset(data)
    (data / "metadata.jsonl").write_text('{"file_name": "img0.png"}\n')
    with pytest.raises(DataError, match=r"line 1: needs both \"file_name\" and \"text\""):
        scan_dataset(data)


@pytest.mark.parametrize("script", ["mole_expert", "mole_gates", "mole_finetune"])
def test_help(script):
    out = run_script(script, "--help").stdout
    assert "--checkpoint" in out and "--data" in out and "--resume" in out and "--mixed-precision" in out


def test_a_script_stops_on_bad_data_before_loading_a_model(tmp_path):
    data = make_dataset(tmp_path / "d", n=2)
    (data / "img1.txt").unlink()
    proc = run_script(
        "mole_expert",
        "--part",
        "face",
        "--checkpoint",
        tmp_path / "no_such_model.safetensors",
        "--data",
        data,
        "--output",
        tmp_path / "x.safetensors",
        "--steps",
        "1",
        "--lr",
        "1e-4",
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    assert f"error: bad training data: {data / 'img1.png'}: has no caption" in proc.stderr
    assert "no_such_model" not in proc.stderr  # the data is checked first


def fake_checkpoint(path, width=768, extra=None):
    """A safetensors file with a checkpoint's header layout where the checks look (tiny tensors
    elsewhere): enough for header checks, never loadable as a model."""
    from safetensors.torch import save_file

    tensors = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(
            320, width, dtype=torch.float16
        ),
        "model.diffusion_model.out.2.bias": torch.zeros(4),
    } | (extra or {})
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p, "not found"),
        (lambda p: p.parent, "is a folder"),
        (
            lambda p: (p.write_bytes(b"\x80\x02junk"), p)[1],
            "is not a readable safetensors file (it looks like a pickled",
        ),
        (lambda p: fake_checkpoint(p, extra={"v_pred": torch.zeros(1)}), "is not an epsilon-prediction model (v_pred)"),
        (lambda p: fake_checkpoint(p, width=1024), "is an SD2.x checkpoint; this script trains on SD1.x or SDXL"),
        (
            lambda p: (
                __import__("safetensors.torch").torch.save_file({"a.lora_down.weight": torch.zeros(1, 1)}, str(p)),
                p,
            )[1],
            "holds no model.diffusion_model.* tensors",
        ),
    ],
    ids=["missing", "folder", "pickle", "v-prediction", "sd2", "lora"],
)
def test_checkpoint_is_checked_from_its_header(tmp_path, make, expected):
    from training import checks

    path = make(tmp_path / "model.safetensors")
    with pytest.raises(SystemExit, match=re.escape(f"error: --checkpoint {path}: {expected}")):
        checks.require_family(path, ("sd15", "sdxl"))
    assert checks.require_family(fake_checkpoint(tmp_path / "ok.safetensors"), ("sd15",)) == "sd15"


def test_stage3_stops_on_a_missing_expert_before_loading_a_model(tmp_path):
    """Every file is checked before the base model loads: the script ends in seconds with the
    file named, not with a traceback after loading (the fake checkpoint could not even load)."""
    data = make_dataset(tmp_path / "d", n=1)
    ckpt = fake_checkpoint(tmp_path / "model.safetensors")
    gone = tmp_path / "face.safetensors"
    proc = run_script(
        "mole_gates",
        "--checkpoint",
        ckpt,
        "--data",
        data,
        "--experts",
        f"face={gone}",
        f"hand={gone}",
        "--output",
        tmp_path / "g.safetensors",
        "--steps",
        "1",
        "--lr",
        "1e-4",
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"error: --experts face={gone}: not found" in proc.stderr


def test_disk_cache_is_built_once_across_processes_and_kept(tmp_path):
    """Each process encodes its own share (every world-th image), a second build (a resumed
    run) encodes nothing, and a changed caption gets a new entry."""
    from training.datasets import DiskCachedDataset, build_disk_cache, cache_key

    samples = scan_dataset(make_dataset(tmp_path / "d", n=5))
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    files = [tmp_path / "cache" / f"{cache_key(s, 64, ckpt)}.safetensors" for s in samples]
    (tmp_path / "cache").mkdir()
    encoded = []

    def encode(index):
        encoded.append(index)
        return {"latent": torch.full((1, 4, 8, 8), float(index)), "context": torch.zeros(1, 77, 8)}

    assert [build_disk_cache(files, encode, rank, 2) for rank in (0, 1)] == [3, 2]
    assert sorted(encoded) == [0, 1, 2, 3, 4] and len(set(files)) == 5
    assert build_disk_cache(files, encode, 0, 1) == 0  # resumed: everything is there
    item = DiskCachedDataset(files)[(3, 17)]
    assert item["position"] == 17 and float(item["latent"][0, 0, 0, 0]) == 3.0 and item["y"] is None
    (samples[0].image.with_suffix(".txt")).write_text("another caption")
    assert cache_key(scan_dataset(tmp_path / "d")[0], 64, ckpt) != files[0].stem

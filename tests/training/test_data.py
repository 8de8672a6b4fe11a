"""Training data and command lines, without the host: folders with captions or metadata.jsonl,
crops, the resumable sampler, and the clear errors bad data gives (the scripts stop before
loading any model, naming the first bad file)."""

from __future__ import annotations

import json

import pytest
import torch

from training.data import DataError, ImageCaptionDataset, StreamSampler, load_image, scan_dataset

from training_helpers import make_dataset, run_script


def test_caption_files_and_metadata_jsonl(tmp_path):
    a = scan_dataset(make_dataset(tmp_path / "a", n=3))
    b = scan_dataset(make_dataset(tmp_path / "b", n=3, layout="jsonl"))
    assert [s.caption for s in a] == [s.caption for s in b] == [f"a close-up photo, sample {i}" for i in range(3)]
    assert [s.image.name for s in a] == ["img0.png", "img1.png", "img2.png"]


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
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.png", "text": "ok"}) + "\n" + json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
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
    proc = run_script("mole_expert", "--part", "face", "--checkpoint", tmp_path / "no_such_model.safetensors", "--data", data,
                      "--output", tmp_path / "x.safetensors", "--steps", "1", "--lr", "1e-4", check=False, timeout=120)
    assert proc.returncode != 0
    assert f"error: bad training data: {data / 'img1.png'}: has no caption" in proc.stderr
    assert "no_such_model" not in proc.stderr  # the data is checked first

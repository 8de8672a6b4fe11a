"""MoA training data and objective without the host: FastComposer's FFHQ-wild layout and its
subject choices, subject images as FastComposer makes them, the layer sets on SD1.5's 32 MoA
layers, the losses on tensors with known answers, and the training patch under gradient
checkpointing (the padded bindings themselves are the core's: tests/core/test_moa_batched.py)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from moa_helpers import CAPTION, make_moa_dataset, segment, write_fastcomposer_item

from training import moa_losses
from training.data import DataError
from training.moa_data import ScanReport, scan_moa_dataset
from training.moa_samples import Draws, MoADataset, make_subject_image

NO_DRAWS = Draws(subject_drop=0, condition_drop=0, augment=False)

# SD1.5's MoA layers: attn1 and attn2 of its 16 transformer blocks (SAI naming).
SD15_BLOCKS = (
    [f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)]
    + ["middle_block.1"]
    + [f"output_blocks.{i}.1" for i in range(3, 12)]
)
SD15_LAYERS = [f"{b}.transformer_blocks.0.{a}" for b in SD15_BLOCKS for a in ("attn1", "attn2")]


# ---- layer sets -------------------------------------------------------------------------------


def test_router_loss_layers_are_the_papers_on_sd15():
    """Paper Sec. 3.3.1: all but the first and the last block (first two, last three attention
    layers): input_blocks.1/.2 and output_blocks.9/.10/.11 out, 22 of 32 in."""
    router = moa_losses.router_layers(SD15_LAYERS)
    left_out = sorted({i.rsplit(".transformer_blocks", 1)[0] for i in set(SD15_LAYERS) - set(router)})
    assert len(SD15_LAYERS) == 32 and len(router) == 22
    assert left_out == [
        "input_blocks.1.1",
        "input_blocks.2.1",
        "output_blocks.10.1",
        "output_blocks.11.1",
        "output_blocks.9.1",
    ]


def test_localization_layers_are_fastcomposers_on_sd15():
    """FastComposer's 5 middle diffusers blocks: the 11 attn2 outside down_blocks.0 and up_blocks.3."""
    loc = moa_losses.localization_layers(SD15_LAYERS)
    blocks = (
        [f"input_blocks.{i}.1" for i in (4, 5, 7, 8)]
        + ["middle_block.1"]
        + [f"output_blocks.{i}.1" for i in range(3, 9)]
    )
    assert loc == [f"{b}.transformer_blocks.0.attn2" for b in blocks]
    # the flags' block names are checked against the model
    assert moa_losses.localization_layers(SD15_LAYERS, moa_losses.parse_blocks("mid_block", SD15_LAYERS, "--x")) == [
        "middle_block.1.transformer_blocks.0.attn2"
    ]
    with pytest.raises(ValueError, match="--x: down_blocks.3 is not a UNet block with attention layers"):
        moa_losses.parse_blocks("down_blocks.3", SD15_LAYERS, "--x")


# ---- data -------------------------------------------------------------------------------------


def test_fastcomposer_nested_layout_keeps_four_person_subjects(tmp_path):
    """A nested FFHQ-wild folder; one image has five persons and a dog: the dog is no subject,
    four of the five persons are bound (a seeded choice), the caption stays whole."""
    caption = "a man, a woman, a boy, a girl and a baby with a dog"
    words = ["man", "woman", "boy", "girl", "baby", "dog"]
    seg = np.zeros((64, 64), dtype=np.int64)
    for k in range(6):
        seg[8:56, k * 10 : k * 10 + 8] = k + 1
    info = {
        "caption": caption,
        "segments": [segment(k + 1, caption, w, "dog" if w == "dog" else "person") for k, w in enumerate(words)],
    }
    root = tmp_path / "ffhq_wild_files"
    write_fastcomposer_item(root, "0012345", np.random.RandomState(0).rand(64, 64, 3), seg, info)
    (root / "image_ids_train.txt").write_text("0012345\n")
    assert (root / "00123" / "0012345.npy").is_file()

    report = ScanReport()
    (sample,) = scan_moa_dataset(root, report=report)
    assert [s.word for s in sample.subjects] == ["man#1", "woman#1", "boy#1", "girl#1", "baby#1"]
    assert report.labels_left == {"dog": 1}
    item = MoADataset([sample], 64, NO_DRAWS)[(0, 3)]
    assert len(item["words"]) == 4 and set(item["words"]) < {"man#1", "woman#1", "boy#1", "girl#1", "baby#1"}
    assert (
        item["caption"] == caption
        and item["masks"].shape == (4, 64, 64)
        and item["subject_images"].shape == (4, 224, 224, 3)
    )
    # every bound mask is its own person's column
    for word, mask in zip(item["words"], item["masks"]):
        k = words.index(word.split("#")[0])
        assert mask[8:56, k * 10 : k * 10 + 8].all() and mask.sum() == 48 * 8
    # --object-types all: the dog is a subject too
    assert len(scan_moa_dataset(root, object_types=None)[0].subjects) == 6


def test_layouts_read_the_same(tmp_path):
    nested = scan_moa_dataset(make_moa_dataset(tmp_path / "nested"))
    flat = scan_moa_dataset(make_moa_dataset(tmp_path / "flat", layout="ffhq-flat"))
    folder = scan_moa_dataset(make_moa_dataset(tmp_path / "folder", layout="folder"))
    assert [[x.word for x in s.subjects] for s in nested] == [["man#1", "woman#1"]] * 2
    for other in (flat, folder):
        assert [s.caption for s in other] == [s.caption for s in nested] == [CAPTION] * 2
        a, b = MoADataset(nested, 64, NO_DRAWS)[(0, 0)], MoADataset(other, 64, NO_DRAWS)[(0, 0)]
        assert torch.equal(a["masks"], b["masks"]) and a["masks"].sum() > 0


def test_subject_and_condition_drops_as_fastcomposer(tmp_path):
    """Each subject dropped with p 0.1, the condition with p 0.1; a dropped subject's word stays
    in the caption unbound, its mask leaves the foreground."""
    samples = scan_moa_dataset(make_moa_dataset(tmp_path / "d", n=1))
    data = MoADataset(samples, 64, Draws(augment=False))
    draws = [data.choose(0, random.Random(i)) for i in range(4000)]
    conditions = sum(dropped for dropped, _ in draws) / len(draws)
    kept = [len(bound) for dropped, bound in draws if not dropped]
    assert 0.08 < conditions < 0.12 and 0.08 < 1 - sum(kept) / (2 * len(kept)) < 0.12

    position = next(p for p in range(200) if len(data[(0, p)]["words"]) == 1)
    item, full = data[(0, position)], MoADataset(samples, 64, NO_DRAWS)[(0, position)]
    assert item["caption"] == CAPTION and item["masks"].shape[0] == 1
    assert torch.equal(item["foreground"], item["masks"][0]) and item["foreground"].sum() < full["foreground"].sum()
    position = next(p for p in range(200) if data[(0, p)]["caption"] == "")
    item = data[(0, position)]
    assert item["words"] == [] and item["subject_images"].shape[0] == 0
    assert torch.equal(item["foreground"], full["foreground"])  # unconditional: every person is reconstructed


def test_tall_person_subject_image_keeps_its_head():
    """FastComposer's subject image: noise background, box crop, pad to a square, 224. A standing
    person (a tall box) keeps its top rows (the red head) in the middle columns; black padding on
    both sides; the background outside the mask is noise, not the photo."""
    image = torch.full((200, 120, 3), 0.5)
    image[20:40, :, :] = torch.tensor([1.0, 0, 0])  # the head's rows
    mask = torch.zeros(200, 120, dtype=torch.bool)
    mask[20:180, 40:80] = True  # 160 x 40: tall
    out = make_subject_image(image, mask, torch.Generator().manual_seed(0))
    assert out.shape == (224, 224, 3)
    top, middle = out[:10, 112], out[112, 112]
    assert (top[:, 0] > 0.9).all() and (top[:, 1:] < 0.1).all()  # the head, first rows
    assert torch.allclose(middle, torch.tensor(0.5), atol=0.02)
    assert out[:, :70].abs().max() < 0.01 and out[:, -70:].abs().max() < 0.01  # padding


def test_augmented_subject_images_vary_and_stay_in_range(tmp_path):
    samples = scan_moa_dataset(make_moa_dataset(tmp_path / "d", n=1))
    data = MoADataset(samples, 64, Draws(subject_drop=0, condition_drop=0, augment=True))
    a, b, again = data[(0, 0)], data[(0, 1)], data[(0, 0)]
    assert (
        a["subject_images"].shape == (2, 224, 224, 3)
        and 0 <= a["subject_images"].min()
        and a["subject_images"].max() <= 1
    )
    assert not torch.equal(a["subject_images"], b["subject_images"])
    assert torch.equal(a["subject_images"], again["subject_images"])  # seeded by the stream position: resumable


def test_bad_data_names_the_file(tmp_path):
    data = make_moa_dataset(tmp_path / "missing_json")
    (data / "00700" / "0070001.json").unlink()
    with pytest.raises(DataError, match="0070001.json: is missing"):
        scan_moa_dataset(data)

    data = make_moa_dataset(tmp_path / "small_mask")
    np.save(data / "00700" / "0070000.npy", np.zeros((32, 32), dtype=np.int64))
    with pytest.raises(DataError, match=r"0070000.npy: mask size \(32, 32\) does not match"):
        scan_moa_dataset(data)

    data = make_moa_dataset(tmp_path / "bad_end")
    info = json.loads((data / "00700" / "0070000.json").read_text())
    info["segments"][0]["end"] = 4  # inside "man"
    (data / "00700" / "0070000.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="0070000.json: segment end 4 does not fall at the end of a word"):
        scan_moa_dataset(data)

    data = make_moa_dataset(tmp_path / "no_word", layout="folder")
    lines = (data / "metadata.jsonl").read_text().replace('"word": "woman"', '"word": "girl"')
    (data / "metadata.jsonl").write_text(lines)
    with pytest.raises(DataError, match="'girl' is not a word of the caption"):
        scan_moa_dataset(data)


def test_data_check_command(tmp_path, capsys):
    from training import moa_data

    assert moa_data.main(["--data", str(make_moa_dataset(tmp_path / "ok"))]) == 0
    assert "2 training images; subjects per image: 2: 2" in capsys.readouterr().out
    assert moa_data.main(["--data", str(tmp_path / "nothing")]) == 1
    assert "nothing: is not a folder" in capsys.readouterr().out


# ---- losses -----------------------------------------------------------------------------------


def test_router_loss_pushes_the_background_to_the_prior():
    foreground = torch.zeros(1, 4, 4)
    foreground[0, :, :2] = 1  # subject: left half
    assert float(moa_losses.router_loss([torch.ones(1, 16), torch.ones(1, 16)], foreground)) == 0.0
    # background = half the pixels, each (1 * (1 - 0))^2 = 1: mean 0.5
    assert float(moa_losses.router_loss([torch.zeros(1, 16)], foreground)) == pytest.approx(0.5)
    left_personal = torch.ones(1, 4, 4)
    left_personal[0, :, :2] = 0  # the subject's pixels do not count
    assert float(moa_losses.router_loss([left_personal.flatten(1)], foreground)) == 0.0


def test_localization_loss_is_fastcomposers_balanced_l1():
    masks = torch.zeros(1, 3, 4, 4)
    masks[0, 0, :, :2] = 1
    masks[0, 1, :, 2:] = 1
    valid = torch.tensor([[True, True, False]])  # the third subject is padding
    on = torch.stack([masks[0, 0].flatten() / 8, masks[0, 1].flatten() / 8, torch.ones(16)], dim=-1)[None]  # (1, 16, 3)
    off = torch.stack([masks[0, 1].flatten() / 8, masks[0, 0].flatten() / 8, torch.zeros(16)], dim=-1)[None]
    assert float(moa_losses.localization_loss([on], masks, valid)) == pytest.approx(-1 / 8, abs=1e-5)  # bg 0, fg 1/8
    assert float(moa_losses.localization_loss([off], masks, valid)) == pytest.approx(1 / 8, abs=1e-5)
    # a coarser layer (2x2) reads the masks resampled bilinearly with antialiasing, as FastComposer
    coarse = torch.zeros(1, 4, 3)
    coarse[0, [0, 2], 0] = 0.5
    coarse[0, [1, 3], 1] = 0.5
    m = torch.nn.functional.interpolate(masks, size=(2, 2), mode="bilinear", antialias=True).flatten(2)[0, :2]  # (2, 4)
    a = coarse[0, :, :2].T
    expected = ((a * (1 - m)).sum(1) / ((1 - m).sum(1) + 1e-5) - (a * m).sum(1) / (m.sum(1) + 1e-5)).mean()
    assert float(moa_losses.localization_loss([coarse], masks, valid)) == pytest.approx(float(expected), abs=1e-5)
    assert abs(float(expected) + 0.5) > 0.1  # not the area pooling of the trainer before (which gives -0.5)
    # a sample without subjects counts as 0 in the batch mean (FastComposer's .mean() over the batch)
    two = moa_losses.localization_loss(
        [torch.cat([on, on])], torch.cat([masks, masks]), torch.tensor([[True, True, False], [False] * 3])
    )
    assert float(two) == pytest.approx(-1 / 16, abs=1e-5)


def test_masked_reconstruction_is_fastcomposers():
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    foreground = torch.zeros(2, 64, 64)
    foreground[:, :32] = 1
    m = torch.nn.functional.interpolate(foreground[:, None], size=(8, 8), mode="bilinear", align_corners=False)
    expected = torch.nn.functional.mse_loss(pred * m, target * m)  # all elements, as FastComposer's mask_loss
    assert float(moa_losses.masked_reconstruction(pred, target, foreground)) == pytest.approx(float(expected))
    assert float(expected) < float(((pred - target)[:, :, :4] ** 2).mean())


# ---- the training patch ----------------------------------------------------------------------


def test_training_patch_recomputes_the_same_graph_under_checkpointing():
    """The MoA training patch inside torch.utils.checkpoint (non-reentrant): the record is closed
    once the losses are read, the recomputation in backward computes the same saved tensors
    (CheckpointError otherwise) and the gradients equal those without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    from mixture_core.moa import AttentionShape, MoAModel
    from training.moa_forward import Bindings, Record, TrainingPatch

    torch.manual_seed(0)
    layer_id = "middle_block.1.transformer_blocks.0.attn2"
    moa = MoAModel({layer_id: AttentionShape(16, 768, 2, 8)}, router_hidden=8, fusion_hidden=16, spacetime_dim=8)
    torch.nn.init.normal_(moa.fusion.mlp.fc2.weight)
    patches = TrainingPatch(moa, {(("middle", 0), 0, "attn2"): layer_id}, [layer_id], [layer_id]).patches()
    h, context = torch.randn(2, 4, 16, requires_grad=True), torch.randn(2, 77, 768)
    bindings = Bindings.padded(
        torch.tensor([[3], [0]]), torch.tensor([[True], [False]]), torch.randn(2, 1, 768), torch.tensor([10.0, 20.0])
    )

    def attention(h, record):
        extra = {"block": ("middle", 0), "block_index": 0, TrainingPatch.KEY: (bindings, record)}
        patches["attn2_patch"][0](h, context, context, extra)
        return patches["attn2_output_patch"][0](torch.tanh(h), extra)

    grads = []
    for checkpointed in (False, True):
        record = Record()
        out = checkpoint(attention, h, record, use_reentrant=False) if checkpointed else attention(h, record)
        loss = out.square().mean() + record.router[0].mean() + record.attention[0].sum()
        record.closed = True
        loss.backward()
        grads.append(moa.layers[0].to_q.weight.grad.clone())
        moa.zero_grad()
        assert len(record.attention) == 1
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1])

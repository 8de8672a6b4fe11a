"""training.moa_train: the MoA file it writes loads in Load MoA Router and samples through MoA
Subject Inject (real host); its losses compute what they say; the prior stays frozen; bad
data stops the run naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import random_models as rm
from helpers.fixtures import model_folders
from training import moa_train
from training.moa_data import DataError, scan_moa_dataset
from training_helpers import make_moa_dataset, read_log, run_script, tiny_args


def moa_args(checkpoint, data, output, steps, *extra):
    return [*tiny_args(checkpoint, data, output, steps), "--clip-vision", str(rm.clip_vision_vit_l14()), *map(str, extra)]


# ---- losses, on tensors with known answers ---------------------------------------------------


def test_router_loss_pushes_the_background_to_the_prior():
    masks = torch.zeros(1, 4, 4)
    masks[0, :, :2] = 1  # subject: left half
    prior_everywhere = [("a", torch.ones(1, 16)), ("b", torch.ones(1, 16))]
    assert float(moa_train.router_loss(prior_everywhere, masks, {"a", "b"})) == 0.0
    personal_everywhere = [("a", torch.zeros(1, 16))]
    # background = half the pixels, each (1 * (1 - 0))^2 = 1: mean 0.5
    assert float(moa_train.router_loss(personal_everywhere, masks, {"a"})) == pytest.approx(0.5)
    # the subject's pixels do not count; excluded layers do not count
    left_personal = torch.ones(1, 4, 4)
    left_personal[0, :, :2] = 0
    assert float(moa_train.router_loss([("a", left_personal.flatten(1)), ("x", torch.zeros(1, 16))], masks, {"a"})) == 0.0


def test_localization_loss_is_lower_when_attention_sits_on_the_subject():
    masks = torch.zeros(2, 4, 4)
    masks[0, :, :2] = 1
    masks[1, :, 2:] = 1
    on = torch.stack([masks[0].flatten() / 8, masks[1].flatten() / 8], dim=-1)[None]  # (1, 16, 2)
    off = torch.stack([masks[1].flatten() / 8, masks[0].flatten() / 8], dim=-1)[None]
    assert float(moa_train.localization_loss([on], masks)) == pytest.approx(-1 / 8)  # bg 0, fg 1/8
    assert float(moa_train.localization_loss([off], masks)) == pytest.approx(1 / 8)
    # a coarser layer (2x2) reads the masks pooled to its size
    coarse = torch.zeros(1, 4, 2)
    coarse[0, [0, 2], 0] = 0.5
    coarse[0, [1, 3], 1] = 0.5
    assert float(moa_train.localization_loss([coarse], masks)) == pytest.approx(-0.5)


def test_router_loss_layers_leave_out_the_first_and_last_blocks():
    ids = ["input_blocks.1.1.transformer_blocks.0.attn1", "input_blocks.1.1.transformer_blocks.0.attn2",
           "middle_block.1.transformer_blocks.0.attn1", "output_blocks.11.1.transformer_blocks.0.attn2"]
    assert moa_train.router_layers(ids) == {"middle_block.1.transformer_blocks.0.attn1"}


def test_personalized_attention_starts_as_the_prior(sd15):
    from mixture_core.moa import MoAModel

    unet = sd15.model.model.diffusion_model
    moa = MoAModel.from_prior(moa_train.prior_weights(unet))
    assert len(moa.layer_ids) == 32
    for layer_id in moa.layer_ids:
        prior = unet.get_submodule(layer_id)
        mine = moa[layer_id]
        assert torch.equal(mine.to_q.weight, prior.to_q.weight.float()) and torch.equal(mine.to_out.bias, prior.to_out[0].bias.float())


# ---- data ------------------------------------------------------------------------------------


def test_both_layouts_read_the_same(tmp_path):
    ffhq = scan_moa_dataset(make_moa_dataset(tmp_path / "ffhq", layout="ffhq"))
    folder = scan_moa_dataset(make_moa_dataset(tmp_path / "folder", layout="folder"))
    assert [s.caption for s in ffhq] == [s.caption for s in folder]
    assert [[x.word for x in s.subjects] for s in ffhq] == [["man#1", "woman#1"]] * 2 == [[x.word for x in s.subjects] for s in folder]
    from training.moa_data import MoADataset

    a, b = MoADataset(ffhq, 64)[(0, 0)], MoADataset(folder, 64)[(0, 0)]
    assert torch.equal(a["masks"], b["masks"]) and a["masks"].sum() > 0  # same masks from the .npy map and the PNGs
    assert [im.shape for im in a["subject_images"]] == [(1, 48, 32, 3), (1, 32, 24, 3)]  # cut out to each mask's box


def test_bad_data_names_the_file(tmp_path, checkpoint):
    data = make_moa_dataset(tmp_path / "missing_json")
    (data / "00001.json").unlink()
    with pytest.raises(DataError, match="00001.json: is missing"):
        scan_moa_dataset(data)

    data = make_moa_dataset(tmp_path / "small_mask")
    np.save(data / "00000.npy", np.zeros((32, 32), dtype=np.int64))
    with pytest.raises(DataError, match=r"00000.npy: mask size \(32, 32\) does not match"):
        scan_moa_dataset(data)

    data = make_moa_dataset(tmp_path / "bad_end")
    info = json.loads((data / "00000.json").read_text())
    info["segments"][0]["end"] = 4  # inside "man"
    (data / "00000.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="00000.json: segment end 4 does not fall at the end of a word"):
        scan_moa_dataset(data)

    data = make_moa_dataset(tmp_path / "no_word", layout="folder")
    lines = (data / "metadata.jsonl").read_text().replace('"word": "woman"', '"word": "girl"')
    (data / "metadata.jsonl").write_text(lines)
    with pytest.raises(DataError, match="'girl' is not a word of the caption"):
        scan_moa_dataset(data)

    # The command line says it before loading any model.
    done = run_script("moa_train", *moa_args(checkpoint, tmp_path / "small_mask", tmp_path / "x.safetensors", 1, "--lr", "1e-4"), check=False)
    assert done.returncode != 0 and "00000.npy: mask size" in done.stderr


# ---- the script, end to end ---------------------------------------------------------------


def test_moa_file_from_the_script_loads_and_samples_in_comfyui(tmp_path, checkpoint, sd15, pack):
    import importlib

    import comfy.clip_vision

    out = tmp_path / "moa" / "moa_trained.safetensors"
    run_script("moa_train", *moa_args(checkpoint, make_moa_dataset(tmp_path / "ffhq"), out, 2, "--lr", "1e-3"))
    assert len(read_log(str(out.with_suffix("")) + "-work")) == 2

    moa_nodes = importlib.import_module(f"{pack.__name__}.nodes.moa_nodes")
    clip_vision = comfy.clip_vision.load(str(rm.clip_vision_vit_l14()))
    subject = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    with model_folders(moa=out.parent), torch.inference_mode():
        loaded = moa_nodes.LoadMoARouter.execute("moa_trained.safetensors").result[0]
        assert loaded.model.metadata.get("moa.trained_steps") == "2"
        model, positive = moa_nodes.MoASubjectInject.execute(
            model=sd15.model, moa=loaded, clip=sd15.clip, clip_vision=clip_vision, text="a man waving", subject_words="man",
            image_1=subject, subject_weights="1.0", strength=1.0, start_percent=0.0, end_percent=1.0).result
    import nodes

    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    negative = nodes.CLIPTextEncode().encode(sd15.clip, "")[0]
    with torch.inference_mode():
        with_moa = nodes.common_ksampler(model, 7, 1, 2.0, "euler", "normal", positive, negative, latent)[0]["samples"]
        plain = nodes.common_ksampler(sd15.model, 7, 1, 2.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert torch.isfinite(with_moa).all() and not torch.equal(with_moa, plain)


def test_moa_learns_and_leaves_the_prior_alone(tmp_path, checkpoint):
    """One image, its noise and timestep fixed, no condition drop: the loss falls clearly;
    the UNet (the prior) ends bit-identical to the checkpoint's."""
    from safetensors import safe_open

    data = make_moa_dataset(tmp_path / "one", n=1)
    out = tmp_path / "moa.safetensors"
    result = moa_train.main(moa_args(checkpoint, data, out, 8, "--lr", "1e-3", "--fixed-noise", "--cond-drop", "0",
                                     "--router-loss-weight", "1", "--localization-loss-weight", "1"))
    losses = result.losses
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0], losses
    unet = result.stage.model.unet.state_dict()
    with safe_open(str(checkpoint), framework="pt") as f:
        for key in [k for k in f.keys() if k.startswith("model.diffusion_model.")]:
            mine = unet[key[len("model.diffusion_model."):]]
            assert torch.equal(mine.to(f.get_tensor(key).dtype), f.get_tensor(key)), key

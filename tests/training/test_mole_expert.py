"""Stage 2 (training.mole_expert) through the real host: the kohya file it writes loads in
ComfyUI's LoraLoader and the pack's Load MoLE Experts, and the expert really learns."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import mole_weights as mw
from helpers.fixtures import model_folders
from training_helpers import ksample, make_dataset, read_log, run_training, tiny_args

from mixture_core.lora_format import parse_lora_state_dict
from mixture_core.safetensors_io import load_safetensors

pytestmark = [pytest.mark.host, pytest.mark.slow]


def test_expert_file_loads_in_lora_loader_and_load_mole_experts(trained_experts, sd15, sd15_small, mole_nodes, caplog):
    import comfy.sd

    from training import base_model

    # The layers stage 2 adapts on the full SD1.5 UNet: MoLE's 192 (the trained files below come
    # from the shallow SD1.5-family checkpoint, whose count is its own).
    full = base_model.expert_target_layers(sd15.model.model.diffusion_model)
    assert len(full) == 192 and set(full) == set(mw.target_layers(sd15.model))
    count = len(mw.target_layers(sd15_small.model))
    sd15 = sd15_small

    tensors, meta = load_safetensors(trained_experts["face"])
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 4.0
    assert (
        meta["mole.part"] == "face" and meta["mole.base_family"] == "sd15" and meta["ss_base_model_version"] == "sd_v1"
    )
    layers = parse_lora_state_dict(tensors)
    assert len(layers) == count and len(tensors) == 3 * count
    assert all(
        name.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")) for name in layers
    )
    proj_in = tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    assert proj_in.shape == (4, 320, 1, 1)  # SD1.5 proj_in is a 1x1 conv: kohya stores 4-d weights
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"].shape == (320, 4, 1, 1)
    assert tensors["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape == (
        4,
        768,
    )
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if "lora_up" in k)  # it trained (up starts at 0)

    # ComfyUI's LoraLoader: every key matched, every target UNet weight patched.
    with caplog.at_level(logging.WARNING):
        lora_model, _ = comfy.sd.load_lora_for_models(sd15.model, sd15.clip, tensors, 1.0, 1.0)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert len(lora_model.patches) == count
    assert all(k.startswith("diffusion_model.") for k in lora_model.patches)
    out = ksample(sd15, lora_model)
    assert torch.isfinite(out).all() and not torch.equal(out, ksample(sd15, sd15.model))

    # The pack's node, as a workflow uses it.
    with model_folders(loras=trained_experts["loras"]):
        loaded = mole_nodes.LoadMoLEExperts.execute(
            "face.safetensors", "face", 1.0, "hand.safetensors", "hand", 1.0, None
        ).result[0]
    assert [e.name for e in loaded.experts] == ["face", "hand"]
    assert [e.path for e in loaded.experts] == [str(trained_experts["face"]), str(trained_experts["hand"])]
    read = [mole_nodes.expert_layout(e) for e in loaded.experts]  # shapes and alphas, read from the headers
    assert all(len(e.layers) == count and {p.rank for p in e.layers.values()} == {4} for e in read)
    assert {p.alpha for p in read[0].layers.values()} == {4.0}


def test_expert_learns_a_micro_task(tmp_path, small_checkpoint):
    """Overfit one image with its noise and timestep fixed (--fixed-noise): a deterministic
    objective, so the loss must fall clearly within a few steps. The same run writes sample
    images every 4 steps from a fixed prompt, and TensorBoard events beside log.jsonl. (On the
    shallow SD1.5-family checkpoint: learning does not depend on the depth.)"""
    data = make_dataset(tmp_path / "one", n=1)
    out = tmp_path / "face.safetensors"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a close-up photo\n")
    run_training(
        "mole_expert",
        "--part",
        "face",
        "--rank",
        "4",
        "--alpha",
        "4",
        "--lr",
        "2e-3",
        "--fixed-noise",
        "--sample-every",
        "4",
        "--sample-prompts",
        prompts,
        "--sample-steps",
        "1",
        "--log-with",
        "tensorboard",
        *tiny_args(small_checkpoint, data, out, 8),
    )
    work = Path(str(out.with_suffix("")) + "-work")
    losses = [r["loss"] for r in read_log(work)]
    assert len(losses) == 8
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.8 * first, losses

    from PIL import Image

    samples = sorted(p.name for p in (work / "samples").iterdir())
    assert samples == ["step_4_0.png", "step_8_0.png"]
    pictures = [np.asarray(Image.open(work / "samples" / name)) for name in samples]
    assert pictures[0].shape == (64, 64, 3) and not np.array_equal(pictures[0], pictures[1])  # the expert changed them

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((work / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [step for step, _ in logged] == list(range(1, 9))
    assert [v for _, v in logged] == pytest.approx(losses, rel=1e-6)


def test_expert_warm_starts_from_a_file_in_bf16(tmp_path, small_checkpoint, trained_experts):
    """--init-from: the run starts from the file's weights (its rank and alpha taken); with SGD
    at lr 0 the written expert is the file, bit for bit. The run is also the bf16 run of stage 2
    on the CPU, with gradient checkpointing (recomputation under autocast) and a sample image
    (ComfyUI's sampler on the bf16-stored model)."""
    out = tmp_path / "again.safetensors"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a close-up photo\n")
    run_training(
        "mole_expert",
        "--part",
        "face",
        "--init-from",
        trained_experts["face"],
        "--optimizer",
        "sgd",
        "--lr",
        "0",
        "--mixed-precision",
        "bf16",
        "--gradient-checkpointing",
        "--sample-every",
        "1",
        "--sample-prompts",
        prompts,
        "--sample-steps",
        "1",
        *tiny_args(small_checkpoint, trained_experts["data"], out, 2),
    )
    start, _ = load_safetensors(trained_experts["face"])
    written, meta = load_safetensors(out)
    assert meta["ss_network_dim"] == "4" and written.keys() == start.keys()
    assert [k for k in start if not torch.equal(start[k], written[k])] == []
    work = Path(str(out.with_suffix("")) + "-work")
    assert all(np.isfinite(r["loss"]) for r in read_log(work)) and len(read_log(work)) == 2
    assert sorted(p.name for p in (work / "samples").iterdir()) == ["step_1_0.png", "step_2_0.png"]

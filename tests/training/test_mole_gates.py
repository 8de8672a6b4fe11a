"""Stage 3 (training.mole_gates) through the real host: gates trained on the stage-2 experts
load in Apply MoLE Gating (both formats) and sample; only the gates change; they learn."""

from __future__ import annotations

import gc
import hashlib
import json

import pytest
import torch
from helpers import mole_weights as mw
from helpers.fixtures import model_folders
from training_helpers import ksample, make_dataset, run_training, tiny_args

from mixture_core.mole_files import read_gate_file
from mixture_core.safetensors_io import load_safetensors

pytestmark = [pytest.mark.host, pytest.mark.slow]


def test_trained_gates_apply_in_comfyui_and_sample(trained_experts, sd15_small, mole_nodes, small_checkpoint, tmp_path):
    sd15, checkpoint = sd15_small, small_checkpoint  # the experts' model (see trained_experts)
    count = len(mw.target_layers(sd15.model))
    gates = tmp_path / "mole" / "gates.safetensors"
    run_training(
        "mole_gates",
        "--experts",
        f"face={trained_experts['face']}",
        f"hand={trained_experts['hand']}",
        "--released-format",
        "--lr",
        "1e-3",
        *tiny_args(checkpoint, trained_experts["data"], gates, 2),
    )
    released = tmp_path / "mole" / "gates_released.safetensors"

    tensors, meta = load_safetensors(gates)
    assert meta["mole.format"] == "mole-gates" and meta["mole.base_family"] == "sd15"
    assert json.loads(meta["mole.experts"]) == ["face", "hand"] and meta["mole.gate_variant"] == "released"
    assert len(json.loads(meta["mole.layers"])) == count and meta["mole.trained_steps"] == "2"
    pack_file = read_gate_file(tensors, meta, str(gates))
    released_file = read_gate_file(*load_safetensors(released), str(released))
    assert released_file.naming == "kohya" and len(released_file.layers) == count
    # The two formats hold the same numbers.
    kohya = mw.kohya_names(sd15.model, "diffusers")
    for module, g in pack_file.layers.items():
        r = released_file.layers[kohya[module]]
        assert torch.equal(g.local_weight, r.local_weight) and torch.equal(g.global_bias, r.global_bias)

    # Warm start: --init-gates begins from this file; with SGD at lr 0 the gates written are its own.
    # (Also stage 3's bf16 run on the CPU.)
    again = tmp_path / "again.safetensors"
    run_training(
        "mole_gates",
        "--experts",
        f"face={trained_experts['face']}",
        f"hand={trained_experts['hand']}",
        "--init-gates",
        gates,
        "--optimizer",
        "sgd",
        "--lr",
        "0",
        "--mixed-precision",
        "bf16",
        *tiny_args(checkpoint, trained_experts["data"], again, 1),
    )
    warm = read_gate_file(*load_safetensors(again), str(again))
    assert all(
        torch.equal(warm.layers[m].local_weight, g.local_weight)
        and torch.equal(warm.layers[m].global_bias, g.global_bias)
        for m, g in pack_file.layers.items()
    )

    base = ksample(sd15, sd15.model)
    for name in ("gates.safetensors", "gates_released.safetensors"):
        with model_folders(loras=trained_experts["loras"], mole=gates.parent):
            experts = mole_nodes.LoadMoLEExperts.execute(
                "face.safetensors", "face", 1.0, "hand.safetensors", "hand", 1.0, None
            ).result[0]
            patched = mole_nodes.ApplyMoLEGating.execute(sd15.model, experts, name, "both", 1.0).result[0]
        assert len([k for k in patched.object_patches if k.endswith(".forward")]) == count
        out = ksample(sd15, patched)
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
        assert not torch.equal(out, base)  # the (barely trained) experts do act through the gates


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_only_the_gates_train_and_they_learn(sd15_small, tmp_path, small_checkpoint):
    """In-process run on experts that hurt (strong random LoRAs), one image with fixed noise:
    the loss falls as the gates learn to close, while the base UNet and the experts stay
    bit-identical. (On the shallow SD1.5-family checkpoint: all of this holds at any depth.)"""
    from training import mole_gates

    sd15, checkpoint = sd15_small, small_checkpoint

    layers = mw.target_layers(sd15.model)
    kohya = mw.kohya_names(sd15.model, "diffusers")
    files = {
        name: mw.write_lora(
            tmp_path / f"{name}.safetensors", layers, kohya, rank=4, alpha=4.0, seed=seed, magnitude=0.5
        )
        for name, seed in (("face", 11), ("hand", 12))
    }
    hashes = {name: _sha256(p) for name, p in files.items()}
    data = make_dataset(tmp_path / "one", n=1)
    out = tmp_path / "gates.safetensors"
    result = mole_gates.main(
        [
            "--experts",
            f"face={files['face']}",
            f"hand={files['hand']}",
            "--lr",
            "2e-2",
            "--fixed-noise",
            "--seed",
            "3",
            *tiny_args(checkpoint, data, out, 8),
        ]
    )
    try:
        model = result.stage.model
        # Base: bit-identical to the host's own load of the same checkpoint.
        reference = sd15.model.model.diffusion_model.state_dict()
        trained = model.unet.state_dict()
        assert trained.keys() == reference.keys()
        changed = [k for k in reference if not torch.equal(trained[k], reference[k])]
        assert changed == []
        # Experts: files untouched, and the MoLE layers hold exactly their weights.
        assert {name: _sha256(p) for name, p in files.items()} == hashes
        sds = {name: load_safetensors(p)[0] for name, p in files.items()}
        for module, layer in model.layers().items():
            name = kohya[module]
            downs = [sds[e][f"{name}.lora_down.weight"].float().flatten(1) for e in ("face", "hand")]
            ups = [sds[e][f"{name}.lora_up.weight"].float().flatten(1) for e in ("face", "hand")]
            assert torch.equal(layer.down, torch.cat(downs)) and torch.equal(layer.up, torch.cat(ups, dim=1))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert len(trainable) == 4 * len(layers) and all(n.endswith(mole_gates.GATE_PARAMS) for n in trainable)
        # The gates moved away from their seeded initialisation.
        widths = {p: (w[0], w[1], w[2]) for p, w in layers.items()}
        init = mole_gates.initial_gates(widths, 2, "released", 3)
        saved = read_gate_file(*load_safetensors(out), str(out))
        moved = [p for p in layers if not torch.equal(saved.layers[p].local_weight, init[p].local_weight)]
        assert len(moved) == len(layers)
        # Learning: the loss falls clearly.
        losses = result.losses
        assert len(losses) == 8 and sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    finally:
        del result
        gc.collect()

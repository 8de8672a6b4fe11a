"""The shared training loop's engineering, on the stage-2 script: an exact resume from a saved
Accelerate state, and a two-process data-parallel run under `accelerate launch`. On the shallow
SD1.5-family checkpoint (`small_checkpoint`): what is checked is that runs agree, whatever the depth."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import launch
from training_helpers import make_dataset, read_log, run_script, run_training, tiny_args

from mixture_core.lora_format import parse_lora_state_dict
from mixture_core.safetensors_io import load_safetensors

pytestmark = [pytest.mark.host, pytest.mark.slow]

EXPERT = ["--part", "hand", "--rank", "4", "--alpha", "4", "--lr", "1e-3", "--save-dtype", "fp32"]
# Plain SGD without weight decay or clipping: a weight moves by exactly -lr times its gradient.
SGD_LR = 0.5
SGD = [
    "--part",
    "hand",
    "--rank",
    "4",
    "--alpha",
    "4",
    "--save-dtype",
    "fp32",
    "--optimizer",
    "sgd",
    "--lr",
    str(SGD_LR),
    "--weight-decay",
    "0",
    "--max-grad-norm",
    "0",
]
U = 2.0**-24  # unit roundoff of float32
# Relative rounding of a float32 gradient, as a share of its tensor's largest element: each of the
# ~60 reductions on the backward path from the loss to a LoRA weight (lengths K <= 2560 here)
# adds at most ~sqrt(K) * U relative error in practice (Higham, "Accuracy and Stability of
# Numerical Algorithms", 2nd ed., section 3.7: rounding errors grow like sqrt(K), not K), so
# 60 * 51 * 6e-8 ~ 2e-4; the check allows 1e-3.
RHO = 1e-3


def work_dir(output: Path) -> Path:
    return Path(str(output.with_suffix("")) + "-work")


def reference_run(root: Path, data: Path, checkpoint, optimizer_args: list[str]) -> dict:
    """One process, batch 2, 2 steps on two images (with the step-1 checkpoint): what DDP
    (2 x batch 1) and gradient accumulation (2 x batch 1 per step) must reproduce."""
    out = root / "single" / "hand.safetensors"
    run_training("mole_expert", *optimizer_args, *tiny_args(checkpoint, data, out, 2, batch_size=2, save_every=1))
    step1 = work_dir(out) / "checkpoints" / "checkpoint_1" / "hand.safetensors"
    return {
        "data": data,
        "output": out,
        "tensors": load_safetensors(out)[0],
        "step1": load_safetensors(step1)[0],
        "losses": [r["loss"] for r in read_log(work_dir(out))],
    }


@pytest.fixture(scope="module")
def references(tmp_path_factory, small_checkpoint):
    """The batch-2 reference runs, made on first use: "sgd" and "adamw"."""
    root = tmp_path_factory.mktemp("batch2")
    data = make_dataset(root / "d", n=2)
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = reference_run(root / kind, data, small_checkpoint, SGD if kind == "sgd" else EXPERT)
        return made[kind]

    return get


def initial_weights(reference) -> dict:
    """The weights before step 1: peft starts every lora_up at exactly 0, so at step 1 every
    lora_down gradient is exactly 0 (it is multiplied by lora_up) and SGD leaves lora_down as it
    was: the step-1 lora_down is the initial one."""
    return {
        k: torch.zeros_like(t) if ".lora_up." in k else reference["step1"][k] for k, t in reference["tensors"].items()
    }


def assert_same_sgd_training(tensors, losses, reference, steps=2):
    """The same samples, noise and timesteps; the gradients are summed in another order (DDP
    averages two per-process gradients, accumulation adds two micro-batch gradients, the
    reference averages over a batch of two). With SGD a weight after T steps is
    w0 - lr * (g1 + ... + gT), so two runs differ by lr times the rounding of the summed
    gradients plus the rounding of the T additions to w: per element at most
    RHO * (the tensor's largest update) + 2 * T * U * |w|."""
    assert tensors.keys() == reference["tensors"].keys()
    w0 = initial_weights(reference)
    over, ratios, learned = [], [], 0
    for k, ref in reference["tensors"].items():
        update = float((ref - w0[k]).abs().max())
        learned += ".lora_up." in k and update > 0
        diff = (tensors[k] - ref).abs()
        if bool((diff > RHO * update + 2 * steps * U * ref.abs()).any()):
            over.append((k, float(diff.max()), update))
        ratios.append(float(diff.max()) / update if update else 0.0)
    # Not vacuous: nearly every up tensor learned (one that gets no gradient, such as a to_k of a
    # self-attention over a single latent pixel, must then agree exactly).
    ups = sum(".lora_up." in k for k in reference["tensors"])
    assert learned >= 0.9 * ups, (learned, ups)
    assert over == [], over
    print(f"largest difference / update: {max(ratios):.2e}")
    assert losses == pytest.approx(reference["losses"], rel=1e-5)


def assert_same_adamw_training(tensors, losses, reference, lr=1e-3, steps=2):
    """AdamW normalises each element (m_hat / sqrt(v_hat)), so an element whose gradient is at
    rounding level can move by up to lr whatever the summation order. What holds on any CPU
    kernel: in its first two steps AdamW moves an element by at most lr * |m_hat| / sqrt(v_hat)
    <= lr * 1.0014 (Cauchy-Schwarz on the bias-corrected moments, betas 0.9 and 0.999), and the
    decoupled decay shrinks both runs alike; two runs from the same weights therefore differ by
    at most 2 * 1.0014 * lr per step. The losses see rounding only (the elements that can move
    that far carry no gradient to speak of)."""
    assert tensors.keys() == reference["tensors"].keys()
    diffs = torch.cat([(tensors[k] - t).abs().flatten() for k, t in reference["tensors"].items()])
    assert float(diffs.max()) <= steps * 2 * 1.0014 * lr
    assert losses == pytest.approx(reference["losses"], rel=1e-4)


def test_resume_gives_exactly_the_uninterrupted_run(tmp_path, small_checkpoint):
    checkpoint = small_checkpoint
    """4 steps in one go against a finished 2-step run extended to 4 (--resume latest: the
    checkpoint written at the final step). Data order, crops, flips, noise and timesteps of every
    micro-batch depend only on the seed and the micro-batch number, and the checkpoint holds the
    trainable tensors in fp32, the AdamW moments, the scheduler and the step: on the CPU with one
    thread every operation is deterministic, so the two runs must agree bit for bit (tolerance 0).
    Checkpoints are named and rotated by Accelerate (checkpoint_<step>, --keep-checkpoints)."""
    data = make_dataset(tmp_path / "d", n=3, size=80)
    whole = tmp_path / "whole" / "hand.safetensors"
    # Random crops and flips (so the uncached path: images decoded and encoded at every step).
    augment = ["--crop", "random", "--flip", "--num-workers", "1"]
    run_training(
        "mole_expert", *EXPERT, *augment, *tiny_args(checkpoint, data, whole, 4, save_every=1, keep_checkpoints=2)
    )
    assert sorted(p.name for p in (work_dir(whole) / "checkpoints").iterdir()) == ["checkpoint_3", "checkpoint_4"]
    state = work_dir(whole) / "checkpoints" / "checkpoint_3"
    assert {
        "trainable.safetensors",
        "optimizer.bin",
        "scheduler.bin",
        "random_states_0.pkl",
        "progress.json",
        "hand.safetensors",
    } <= {p.name for p in state.iterdir()}
    assert "hand.safetensors" not in {
        p.name for p in (state.parent / "checkpoint_4").iterdir()
    }  # the final one: that is the output

    extended = tmp_path / "extended" / "hand.safetensors"
    run_training("mole_expert", *EXPERT, *augment, *tiny_args(checkpoint, data, extended, 2))
    assert [p.name for p in (work_dir(extended) / "checkpoints").iterdir()] == ["checkpoint_2"]  # the final step
    run_training("mole_expert", *EXPERT, *augment, *tiny_args(checkpoint, data, extended, 4, resume="latest"))
    a, _ = load_safetensors(whole)
    b, _ = load_safetensors(extended)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    losses_whole = [(r["step"], r["loss"]) for r in read_log(work_dir(whole))]
    losses_extended = [(r["step"], r["loss"]) for r in read_log(work_dir(extended))]
    assert losses_extended == losses_whole


@pytest.mark.skipif(not launch.AVAILABLE, reason="accelerate's launcher is not installed")
def test_accelerate_launch_two_processes(tmp_path, small_checkpoint, references):
    """Two CPU processes (DDP over gloo) with batch 1 each: one output file and one checkpoint per
    step, written by the main process, equal to one process with batch 2 on the same samples (up to
    the rounding assert_same_sgd_training allows, with SGD).

    `accelerate launch --cpu --num_processes 2` starts a single process unless an MPI launcher
    is configured (accelerate's simple launcher); `--multi_gpu` uses torchrun, and the scripts
    ask Accelerate for the CPU when there is no CUDA, which makes it a MULTI_CPU (gloo) run."""
    reference = references("sgd")
    launcher = launch.LAUNCH_TWO
    ddp = tmp_path / "ddp" / "hand.safetensors"
    proc = run_script(
        "mole_expert", *SGD, *tiny_args(small_checkpoint, reference["data"], ddp, 2, save_every=1), launcher=launcher
    )
    checkpoints = sorted((work_dir(ddp) / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["checkpoint_1", "checkpoint_2"]
    files = {p.name for p in checkpoints[0].iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainable.safetensors", "hand.safetensors"} <= files
    assert proc.stderr.count("wrote ") == 1  # only the main process writes the output
    tensors, meta = load_safetensors(ddp)
    layers = parse_lora_state_dict(reference["tensors"])
    assert parse_lora_state_dict(tensors).keys() == layers.keys() and meta["ss_steps"] == "2"

    assert_same_sgd_training(tensors, [r["loss"] for r in read_log(work_dir(ddp))], reference)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_gradient_accumulation_matches_a_larger_batch(tmp_path, small_checkpoint, references, kind):
    reference = references(kind)
    out = tmp_path / "accum" / "hand.safetensors"
    run_training(
        "mole_expert",
        *(SGD if kind == "sgd" else EXPERT),
        *tiny_args(small_checkpoint, reference["data"], out, 2, grad_accum=2),
    )
    check = assert_same_sgd_training if kind == "sgd" else assert_same_adamw_training
    check(load_safetensors(out)[0], [r["loss"] for r in read_log(work_dir(out))], reference)

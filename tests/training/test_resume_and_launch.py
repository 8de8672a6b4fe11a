"""The shared training loop's engineering, on the stage-2 script: an exact resume from a saved
Accelerate state, and a two-process data-parallel run under `accelerate launch`."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from mixture_core.lora_format import parse_lora_state_dict
from mixture_core.safetensors_io import load_safetensors
from training_helpers import make_dataset, read_log, run_script, tiny_args

pytestmark = [pytest.mark.host, pytest.mark.slow]

EXPERT = ["--part", "hand", "--rank", "4", "--alpha", "4", "--lr", "1e-3", "--save-dtype", "fp32"]


def work_dir(output: Path) -> Path:
    return Path(str(output.with_suffix("")) + "-work")


@pytest.fixture(scope="module")
def batch2_reference(tmp_path_factory, checkpoint):
    """One process, batch 2, 2 steps on two images: what DDP (2 x batch 1) and gradient
    accumulation (2 x batch 1 per step) must reproduce."""
    root = tmp_path_factory.mktemp("batch2")
    data = make_dataset(root / "d", n=2)
    out = root / "single" / "hand.safetensors"
    run_script("mole_expert", *EXPERT, *tiny_args(checkpoint, data, out, 2, batch_size=2))
    return {"data": data, "output": out, "tensors": load_safetensors(out)[0], "losses": [r["loss"] for r in read_log(work_dir(out))]}


def assert_same_training(tensors, losses, reference, lr=1e-3):
    """Same samples, noise and timesteps, so the losses agree to float rounding. The gradients
    are summed in another order (DDP averages two per-process gradients, accumulation adds two
    micro-batch gradients, the reference averages a batch of two), which changes them by
    rounding only; but AdamW normalises each element (its first steps move a weight by about
    lr * g / |g|), so an element whose gradient is itself at rounding level may move
    differently, by at most ~lr per step. Measured: 0.04% of the elements, by at most 0.1 * lr.
    Checked: every element within 0.2 * lr, and all but 0.5% within 1e-6."""
    assert tensors.keys() == reference["tensors"].keys()
    diffs = torch.cat([(tensors[k] - t).abs().flatten() for k, t in reference["tensors"].items()])
    assert float(diffs.max()) <= 0.2 * lr
    assert float((diffs > 1e-6).float().mean()) < 0.005
    assert losses == pytest.approx(reference["losses"], rel=1e-5)


def test_resume_gives_exactly_the_uninterrupted_run(tmp_path, checkpoint):
    """4 steps in one go (checkpointing at step 2) against 2 steps + resume to 4. Data order,
    crops, flips, noise and timesteps of every micro-batch depend only on the seed and the
    micro-batch number,
    and the checkpoint holds the trainable tensors in fp32, the AdamW moments, the scheduler and
    the step: on the CPU with one thread every operation is deterministic, so the two runs
    must agree bit for bit (tolerance 0)."""
    data = make_dataset(tmp_path / "d", n=3, size=80)
    whole = tmp_path / "whole" / "hand.safetensors"
    # Random crops and flips (so the uncached path: images decoded and encoded at every step).
    augment = ["--crop", "random", "--flip", "--num-workers", "1"]
    run_script("mole_expert", *EXPERT, *augment, *tiny_args(checkpoint, data, whole, 4, save_every=2))
    state = work_dir(whole) / "checkpoints" / "step-000002"
    assert {"trainable.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "progress.json", "hand.safetensors"} <= {
        p.name for p in state.iterdir()}

    resumed = tmp_path / "resumed" / "hand.safetensors"
    run_script("mole_expert", *EXPERT, *augment, *tiny_args(checkpoint, data, resumed, 4, resume=state))
    a, _ = load_safetensors(whole)
    b, _ = load_safetensors(resumed)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    losses_whole = [(r["step"], r["loss"]) for r in read_log(work_dir(whole))]
    losses_resumed = [(r["step"], r["loss"]) for r in read_log(work_dir(resumed))]
    assert losses_resumed == losses_whole[2:]


@pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
                    reason="accelerate's launcher is not installed")
def test_accelerate_launch_two_processes(tmp_path, checkpoint, batch2_reference):
    """Two CPU processes (DDP over gloo) with batch 1 each: one output file and one checkpoint,
    written by the main process, equal to one process with batch 2 on the same samples (up to
    the rounding assert_same_training allows).

    `accelerate launch --cpu --num_processes 2` starts a single process unless an MPI launcher
    is configured (accelerate's simple launcher); `--multi_gpu` uses torchrun, and the scripts
    ask Accelerate for the CPU when there is no CUDA, which makes it a MULTI_CPU (gloo) run."""
    data = batch2_reference["data"]
    launcher = [str(Path(sys.executable).with_name("accelerate")) if Path(sys.executable).with_name("accelerate").exists() else "accelerate",
                "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", "0"]
    ddp = tmp_path / "ddp" / "hand.safetensors"
    proc = run_script("mole_expert", *EXPERT, *tiny_args(checkpoint, data, ddp, 2, save_every=1), launcher=launcher)
    checkpoints = sorted((work_dir(ddp) / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-000001"]
    files = {p.name for p in checkpoints[0].iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainable.safetensors", "hand.safetensors"} <= files
    assert proc.stderr.count("wrote ") == 1  # only the main process writes the output
    tensors, meta = load_safetensors(ddp)
    assert len(parse_lora_state_dict(tensors)) == 192 and meta["ss_steps"] == "2"

    assert_same_training(tensors, [r["loss"] for r in read_log(work_dir(ddp))], batch2_reference)


def test_gradient_accumulation_matches_a_larger_batch(tmp_path, checkpoint, batch2_reference):
    out = tmp_path / "accum" / "hand.safetensors"
    run_script("mole_expert", *EXPERT, *tiny_args(checkpoint, batch2_reference["data"], out, 2, grad_accum=2))
    assert_same_training(load_safetensors(out)[0], [r["loss"] for r in read_log(work_dir(out))], batch2_reference)

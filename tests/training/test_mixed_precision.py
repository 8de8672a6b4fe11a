"""--mixed-precision on this machine: bf16 runs every MoLE script on the CPU (autocast, frozen
weights stored in bf16, trainable ones in fp32): stage 1 here, stages 2 and 3 in their
warm-start tests; fp16 without a CUDA GPU is refused before anything loads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from training_helpers import make_dataset, read_log, run_script, run_training, tiny_args

from mixture_core.safetensors_io import load_safetensors

pytestmark = [pytest.mark.host, pytest.mark.slow]

BF16 = ["--mixed-precision", "bf16", "--lr", "1e-3"]


def finite_run(output: Path, steps: int) -> dict:
    log = read_log(Path(str(output.with_suffix("")) + "-work"))
    assert len(log) == steps and all(math.isfinite(r["loss"]) for r in log), log
    tensors, _ = load_safetensors(output)
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    return tensors


def test_bf16_stage1(tmp_path, small_checkpoint):
    """Stage 1 in bf16: the frozen UNet weights are stored in bf16 and the trainable ones in fp32
    while training, the trainable ones moved and the frozen ones did not. Stages 2 and 3 run bf16
    in their warm-start tests (test_mole_expert.py, test_mole_gates.py: with gradient
    checkpointing and a sample image for stage 2)."""
    stage1 = tmp_path / "stage1.safetensors"
    result = run_training(
        "mole_finetune",
        "--trainable",
        r"^out\.",
        "--save-dtype",
        "fp32",
        *BF16,
        *tiny_args(small_checkpoint, make_dataset(tmp_path / "d"), stage1, 1),
    )
    tensors = finite_run(stage1, 1)
    trainable = {id(p) for p in result.stage.trainable.values()}
    stored = {name: p.dtype for name, p in result.stage.model.named_parameters() if p.is_floating_point()}
    trained_names = {name for name, p in result.stage.model.named_parameters() if id(p) in trainable}
    assert trained_names and all(name.startswith("out.") for name in trained_names), sorted(trained_names)
    assert {stored[n] for n in trained_names} == {torch.float32}
    assert {dtype for n, dtype in stored.items() if n not in trained_names} == {torch.bfloat16}

    before, _ = load_safetensors(small_checkpoint)
    unet = "model.diffusion_model."
    moved = [k for k in before if k.startswith(unet + "out.") and not torch.equal(tensors[k], before[k].float())]
    assert moved, "no trainable weight moved in a bf16 step"
    frozen = [k for k in before if k.startswith(unet + "input_blocks.") and k.endswith(".weight")]
    assert frozen
    for k in frozen:  # written from their bf16 storage: the checkpoint's values to bf16 precision
        torch.testing.assert_close(tensors[k], before[k].to(torch.bfloat16).float(), rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast is available with CUDA")
def test_fp16_without_cuda_is_refused_before_loading(tmp_path):
    proc = run_script(
        "mole_expert",
        "--part",
        "face",
        "--checkpoint",
        tmp_path / "not_loaded.safetensors",
        "--data",
        tmp_path,
        "--output",
        tmp_path / "x.safetensors",
        "--steps",
        "1",
        "--lr",
        "1e-4",
        "--mixed-precision",
        "fp16",
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "error: --mixed-precision fp16 needs a CUDA GPU" in proc.stderr

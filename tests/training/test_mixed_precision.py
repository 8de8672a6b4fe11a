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
    """Stage 1 in bf16; stages 2 and 3 run bf16 in their warm-start tests (test_mole_expert.py,
    test_mole_gates.py: with gradient checkpointing and a sample image for stage 2)."""
    stage1 = tmp_path / "stage1.safetensors"
    run_training(
        "mole_finetune",
        "--trainable",
        r"^out\.",
        *BF16,
        *tiny_args(small_checkpoint, make_dataset(tmp_path / "d"), stage1, 1),
    )
    finite_run(stage1, 1)


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

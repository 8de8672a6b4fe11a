"""`python -m bench.gpu --smoke`: the GPU benchmark's own code at tiny sizes on the CPU prints its
one table with every row, each figure finite, and the figures that must move do (the pack adds
FLOPs; gradient checkpointing recomputes, so more FLOPs, and keeps less memory)."""

from __future__ import annotations

import math
import subprocess
import sys

import hostenv
import pytest

pytestmark = pytest.mark.slow  # ~30 s: eight measurements, each with its FLOP count and memory peak

ROWS = (
    "MoLE SDXL 32 px",
    "MoLE SD1.5 32 px",
    "MoA SD1.5 32 px",
    "MoA DDIM swap SD1.5 32 px",
    "MoLE gates training SD1.5 32 px float32 weights, no autocast, batch 1",
    "MoLE gates training SD1.5 32 px float32 weights, no autocast, batch 4",
    "MoA training SD1.5 32 px float32 weights, no autocast, batch 1",
    "MoA training SD1.5 32 px float32 weights, no autocast, batch 4",
)


def test_gpu_benchmark_smoke():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--smoke", "--device", "cpu"],
        cwd=hostenv.REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    header, rows = lines[0], lines[2:]
    assert [c.strip() for c in header.strip("|").split("|")][2:] == [
        "baseline",
        "pack",
        "time ratio",
        "FLOP ratio",
        "time/FLOP",
        "peak MiB",
        "peak MiB pack",
    ]
    table = {}
    for line in rows:
        name, unit, *figures = (c.strip() for c in line.strip("|").split("|"))
        table[name] = dict(
            zip(("baseline", "pack", "time", "flops", "time/flops", "peak", "peak pack"), map(float, figures))
        )
    assert len(table) == len(ROWS)
    for prefix in ROWS:
        (name,) = [n for n in table if n.startswith(prefix)]
        row = table[name]
        assert all(math.isfinite(v) and v >= 0 for v in row.values()), (name, row)
        assert row["baseline"] > 0 and row["pack"] > 0 and row["flops"] > 1.0, (name, row)
        if "training" in name:  # checkpointing: more compute, less memory kept
            assert row["peak pack"] < row["peak"], (name, row)
    assert "SMOKE" in proc.stdout

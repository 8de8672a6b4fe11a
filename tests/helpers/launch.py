"""`accelerate launch` with two processes on one machine, as the two-process tests run it.

`--cpu --num_processes 2` would start one process without an MPI launcher; `--multi_gpu` goes
through torchrun, and without CUDA the processes run on the CPU (gloo)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

_ACCELERATE = Path(sys.executable).with_name("accelerate")
AVAILABLE = _ACCELERATE.exists() or shutil.which("accelerate") is not None
LAUNCH_TWO = [
    str(_ACCELERATE) if _ACCELERATE.exists() else "accelerate",
    "launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--main_process_port",
    "0",
]

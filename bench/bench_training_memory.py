"""Peak host memory of one training process against the data-set size (the stage-2 script,
cached data, 1 step, 64 px, random SD1.5), each run in its own process.

    python3 -m bench.bench_training_memory [--sizes 16 256] [--tree PATH]

--tree runs the training scripts of another checkout (for example the tree before the on-disk
cache, whose in-memory cache held every image's latent and text embedding in each process), so
that the two can be put side by side. Prints the peak RSS per size and its growth per image.
Measured (2 CPU cores, random SD1.5): 6641 MiB at 16 and 256 images, old and new tree alike:
the peak is the base model's load; the old per-image cache (237 KB at 64 px) stayed under it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "training"))

MEASURE = """
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if proc.returncode:
    sys.exit(proc.stderr[-3000:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def peak_of_run(tree: Path, checkpoint: Path, data: Path, work: Path) -> int:
    """Peak RSS (bytes) of `python -m training.mole_expert` run from `tree`, in a fresh parent."""
    cmd = [
        sys.executable,
        "-m",
        "training.mole_expert",
        "--part",
        "face",
        "--rank",
        "4",
        "--alpha",
        "4",
        "--lr",
        "1e-4",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data),
        "--output",
        str(work / "face.safetensors"),
        "--resolution",
        "64",
        "--steps",
        "1",
    ]
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, *cmd],
        cwd=tree,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    if out.returncode:
        raise SystemExit(out.stderr)
    return int(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--tree", type=Path, default=REPO)
    args = parser.parse_args()

    from helpers import random_models
    from training_helpers import make_dataset

    checkpoint = random_models.sd15_checkpoint()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            data = make_dataset(Path(tmp) / f"d{n}", n=n)
            for i, p in enumerate(sorted(data.glob("*.txt"))):  # distinct captions: nothing shared between images
                p.write_text(f"a close-up photo number {i} of {n}, " + " ".join(f"word{i * 7 + k}" for k in range(20)))
            rows.append((n, peak_of_run(args.tree, checkpoint, data, Path(tmp) / f"w{n}")))
    print(f"tree: {args.tree}")
    print("images  peak RSS (MiB)")
    for n, peak in rows:
        print(f"{n:6d}  {peak / 2**20:10.0f}")
    (n0, p0), (n1, p1) = rows[0], rows[-1]
    print(f"growth per image: {(p1 - p0) / max(1, n1 - n0) / 1024:.0f} KiB ({n0} -> {n1} images: x{p1 / p0:.3f})")


if __name__ == "__main__":
    main()

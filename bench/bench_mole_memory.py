"""Peak host memory of one UNet step, base vs MoLE, each in its own process (CPU runs; on a GPU
bench_mole prints peak CUDA memory instead).

    python3 -m bench.bench_mole_memory [--size 256] [--rank 256]

Reports peak RSS growth of MoLE over base minus the expert+gate weights, i.e. the extra
activations, beside tokens x total rank x batch (the order the issue allows).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(kind, size, rank):
    import torch

    from bench.bench_mole import build_unet, mole_model, step_fn

    device, dtype = torch.device("cpu"), torch.float32
    base = build_unet(device, dtype)
    model, weights = (base, 0) if kind == "base" else mole_model(base, rank, 1.0)
    run = step_fn(model, size, 2, device, dtype)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": after, "before_step": before, "weights": weights}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.size, args.rank)
    res = {}
    for kind in ("base", "mole"):
        out = subprocess.run([sys.executable, "-m", "bench.bench_mole_memory", "--child", kind, "--size", str(args.size),
                              "--rank", str(args.rank)], capture_output=True, text=True, check=True)
        res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2**20
    step_base = res["base"]["peak"] - res["base"]["before_step"]
    step_mole = res["mole"]["peak"] - res["mole"]["before_step"]
    tokens = 2 * (args.size // 8) ** 2  # batch 2 at the first level, the largest
    order = tokens * 2 * args.rank * 4
    print(f"{args.size}x{args.size}, batch 2: peak RSS base {res['base']['peak'] / mib:.0f} MiB, MoLE {res['mole']['peak'] / mib:.0f} MiB "
          f"(+{(res['mole']['peak'] - res['base']['peak']) / mib:.0f} MiB; expert+gate weights {res['mole']['weights'] / mib:.0f} MiB); "
          f"growth during the step: base {step_base / mib:.0f} MiB, MoLE {step_mole / mib:.0f} MiB; "
          f"tokens x total rank x 4 bytes at the first level = {order / mib:.1f} MiB")


if __name__ == "__main__":
    main()

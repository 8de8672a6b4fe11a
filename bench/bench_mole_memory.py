"""Peak host memory of MoLE vs the base model, through the nodes, each in its own process
(CPU runs; on a GPU bench_mole prints peak CUDA memory instead).

    python3 -m bench.bench_mole_memory [--size 256] [--rank 256]

Writes two rank-R kohya experts (fp16, as LoRAs ship) and a gate file for the 192 targeted
SD1.5 layers, then in one process per variant builds a random SD1.5 UNet and, for MoLE, runs
Load MoLE Experts + Apply MoLE Gating as a workflow does (the node outputs are kept alive, as
ComfyUI's cache keeps them), then one UNet step at batch 2. Reports the peak RSS growth of MoLE
over base next to the MoLE layers' weights, and the growth of the step itself beside
tokens x total rank (the order of the extra activations the issue allows).
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2**20


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(kind, size, folder):
    import gc

    import torch
    from helpers.fixtures import model_folders

    from bench.bench_mole import build_unet, hostenv, step_fn

    device, dtype = torch.device("cpu"), torch.float32
    model = build_unet(device, dtype)
    # Both variants import the nodes, so the difference is MoLE's and not the imports'.
    nodes = importlib.import_module(f"{hostenv.import_pack().__name__}.nodes.mole_nodes")
    gc.collect()
    before_mole = peak_rss()
    weights = 0
    if kind == "mole":
        with model_folders(loras=Path(folder), mole=Path(folder)):
            experts = nodes.LoadMoLEExperts.execute(
                "face.safetensors", "face", 1.0, "hand.safetensors", "hand", 1.0
            ).result[0]
            model = nodes.ApplyMoLEGating.execute(model, experts, "gates.safetensors", "both", 1.0).result[0]
        bank = model.get_additional_models_with_key("mole")[0].model
        weights = sum(p.numel() * p.element_size() for p in bank.parameters())
    gc.collect()
    before_step = peak_rss()
    step_fn(model, size, 2, device, dtype)()
    print(json.dumps({"before_mole": before_mole, "before_step": before_step, "peak": peak_rss(), "weights": weights}))


def write_files(folder: Path, rank: int) -> None:
    import torch
    from helpers import mole_weights as mw

    from bench.bench_mole import build_unet

    base = build_unet(torch.device("cpu"), torch.float32)
    layers, names = mw.target_layers(base), mw.kohya_names(base, "diffusers")
    mw.write_lora(folder / "face.safetensors", layers, names, rank=rank, alpha=64.0, seed=1)
    mw.write_lora(folder / "hand.safetensors", layers, names, rank=rank, alpha=128.0, seed=2)
    mw.write_pack_gates(folder / "gates.safetensors", layers)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--child", default=None)
    parser.add_argument("--folder", default=None)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.size, args.folder)
    res = {}
    with tempfile.TemporaryDirectory() as folder:
        write_files(Path(folder), args.rank)
        for kind in ("base", "mole"):
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.bench_mole_memory",
                    "--child",
                    kind,
                    "--size",
                    str(args.size),
                    "--folder",
                    folder,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    base, mole = res["base"], res["mole"]
    growth = mole["peak"] - base["peak"]
    tokens = 2 * (args.size // 8) ** 2  # batch 2 at the first level, the largest
    order = tokens * 2 * args.rank * 4
    print(f"{args.size}x{args.size}, batch 2, two rank-{args.rank} experts on 192 layers (fp32 model):")
    print(
        f"  peak RSS: base {base['peak'] / MIB:.0f} MiB, MoLE {mole['peak'] / MIB:.0f} MiB, growth {growth / MIB:.0f} MiB; "
        f"MoLE layer weights {mole['weights'] / MIB:.0f} MiB; growth / weights = {growth / mole['weights']:.3f}"
    )
    print(
        f"  loading the experts raised the peak by {(mole['before_step'] - mole['before_mole']) / MIB:.0f} MiB; "
        f"the step itself: base +{(base['peak'] - base['before_step']) / MIB:.0f} MiB, "
        f"MoLE +{(mole['peak'] - mole['before_step']) / MIB:.0f} MiB; "
        f"tokens x total rank x 4 bytes at the first level = {order / MIB:.1f} MiB"
    )
    print(
        f"  growth beyond the weights: {(growth - mole['weights']) / MIB:.0f} MiB "
        f"= {(growth - mole['weights']) / order:.1f} x tokens x total rank x 4 bytes"
    )


if __name__ == "__main__":
    main()

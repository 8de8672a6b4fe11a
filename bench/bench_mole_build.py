"""How long Apply MoLE Gating takes to build its layers for SDXL-layout files (the released
MoLE-SDXL case: 722 layers, two rank-256 kohya experts in SAI naming, released-format gates).

    python3 -m bench.bench_mole_build [--rank 256] [--reps 2] [--keep DIR]

The experts and gates are written once with random weights (about 1.4 GB per rank-256 expert in
fp16) to a temporary folder (or --keep DIR, reused when present). The model is ComfyUI's own SDXL
UNet built on the meta device (the real layer names and widths, no weights in memory), so the time
is that of the node: reading both experts' matrices layer by layer, casting them and building the
722 MoLE layers, plus the progress bar's ticks. Printed beside it: the time to only read the two
files' tensors (safetensors, the same bytes), i.e. the floor any loader pays.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import hostenv  # noqa: E402


def meta_sdxl():
    hostenv.import_host()
    import comfy.model_patcher
    import comfy.supported_models
    from helpers import random_models as rm

    config = comfy.supported_models.SDXL(dict(rm.SDXL_UNET_CONFIG))
    config.set_inference_dtype(torch.float16, None)
    base = config.get_model({}, device="meta")
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None, help="folder for the random files (kept and reused)")
    args = parser.parse_args()

    patcher = meta_sdxl()
    hostenv.import_pack()
    from helpers import mole_weights as mw
    from helpers.fixtures import model_folders
    from safetensors import safe_open

    mole = importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.mole_nodes")
    layers, names = mw.target_layers(patcher), mw.kohya_names(patcher, "sai")
    tmp = tempfile.TemporaryDirectory() if args.keep is None else None
    folder = Path(tmp.name) if tmp else args.keep
    folder.mkdir(parents=True, exist_ok=True)
    files = {part: folder / f"bench_sdxl_{part}_r{args.rank}.safetensors" for part in ("face", "hand")}
    gates = folder / "bench_sdxl_gates.safetensors"
    start = time.perf_counter()
    for seed, path in enumerate(files.values()):
        if not path.exists():
            mw.write_lora(path, layers, names, rank=args.rank, seed=seed)
    if not gates.exists():
        mw.write_released_gates(gates, layers, names, dtype=torch.bfloat16)
    size = sum(p.stat().st_size for p in files.values()) / 2**30
    print(
        f"{len(layers)} layers, rank {args.rank}: experts {size:.2f} GB on disk "
        f"(written in {time.perf_counter() - start:.0f} s)"
    )

    read_times, build_times = [], []
    with model_folders(loras=folder, mole=folder):
        for _ in range(args.reps):
            start = time.perf_counter()
            for path in files.values():
                with safe_open(str(path), "pt") as f:
                    for key in f.keys():
                        tensor = f.get_tensor(key)
                        torch.empty_like(tensor).copy_(tensor)  # touch every byte (get_tensor may map lazily)
            read_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            experts = mole.LoadMoLEExperts.execute(
                files["face"].name, "face", 1.0, files["hand"].name, "hand", 1.0
            ).result[0]
            patched = mole.ApplyMoLEGating.execute(patcher, experts, gates.name, "both", 1.0).result[0]
            build_times.append(time.perf_counter() - start)
            del patched, experts
    read, build = min(read_times), min(build_times)
    print(
        f"Load MoLE Experts + Apply MoLE Gating: {build:.1f} s (best of {args.reps}); "
        f"reading the two files alone: {read:.1f} s; ratio build/read x{build / read:.2f}"
    )
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()

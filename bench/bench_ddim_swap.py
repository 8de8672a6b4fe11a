"""MoA DDIM Swap cost against a plain KSampler generation with the same steps, in one run.

    python3 -m bench.bench_ddim_swap [--size 256] [--steps 10] [--reps 3]

Uses the random-weight SD1.5 checkpoint, CLIP ViT-L/14 and MoA file of the test helpers (made
once and cached). A swap is one inversion (prior) plus one generation (MoA) plus VAE
encode/decode; the target is at most 2.1x the plain generation (KSampler + VAE decode).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.append(str(Path(__file__).resolve().parents[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    import hostenv
    from helpers import moa_weights, random_models
    from helpers.fixtures import load_sd15

    sd15 = load_sd15()
    hostenv.import_pack()
    import comfy.clip_vision
    import folder_paths
    import nodes

    moa_nodes = importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.moa_nodes")
    ddim_nodes = importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.ddim_nodes")
    moa_path = moa_weights.cached_moa_file(sd15.model)
    folder_paths.add_model_folder_path("moa", str(moa_path.parent))
    moa = moa_nodes.LoadMoARouter.execute(moa_path.name).result[0]
    clip_vision = comfy.clip_vision.load(str(random_models.clip_vision_vit_l14()))
    gen = torch.Generator().manual_seed(0)
    photo = torch.rand(1, args.size, args.size, 3, generator=gen)
    subject = torch.rand(1, 224, 224, 3, generator=gen)
    moa_model, positive = moa_nodes.MoASubjectInject.execute(
        model=sd15.model, moa=moa, clip=sd15.clip, clip_vision=clip_vision, text="a person", subject_words="person",
        image_1=subject, subject_weights="1.0", strength=1.0, start_percent=0.0, end_percent=1.0).result
    negative = nodes.CLIPTextEncode().encode(sd15.clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}

    def plain():
        out = nodes.common_ksampler(moa_model, 1, args.steps, 1.0, "euler", "ddim_uniform", positive, negative, latent)[0]
        return sd15.vae.decode(out["samples"])

    def swap():
        return ddim_nodes.MoADDIMSwap.execute(sd15.model, moa_model, positive, negative, sd15.vae, photo,
                                              args.steps, 1.0, 1.0).result[0]

    times = {"plain": [], "swap": []}
    with torch.inference_mode():
        plain(), swap()  # warm-up: model loads outside the timing
        for _ in range(args.reps):
            for name, fn in (("plain", plain), ("swap", swap)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.size}x{args.size}, {args.steps} steps, cfg 1, CPU threads {torch.get_num_threads()}: "
          f"plain generation {med['plain']:.2f} s, MoA DDIM swap {med['swap']:.2f} s, ratio {med['swap'] / med['plain']:.2f} (target <= 2.1)")


if __name__ == "__main__":
    main()

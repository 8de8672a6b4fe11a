"""MoA DDIM Swap cost against a plain KSampler generation with the same steps, in one run; or,
with --reconstruction, how well invert -> regenerate (no MoA) returns the photo at several cfg.

    python3 -m bench.bench_ddim_swap [--size 256] [--steps 10] [--reps 3]
    python3 -m bench.bench_ddim_swap --reconstruction [--size 64] [--steps 10] [--refine 3] [--iters 10] \
        [--lr 0.01] [--cfgs 1,3,7.5] [--eps-scales 1,0.1]

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
    parser.add_argument(
        "--reconstruction",
        action="store_true",
        help="reconstruction error of plain / refined DDIM and null-text inversion at --cfgs",
    )
    parser.add_argument("--cfgs", default="1,3,7.5")
    parser.add_argument("--refine", type=int, default=3, help="refine_iters of 'refined' and null-text")
    parser.add_argument("--iters", type=int, default=10, help="null-text Adam updates per step")
    parser.add_argument("--lr", type=float, default=0.01, help="null-text learning rate")
    parser.add_argument(
        "--eps-scales",
        default="1",
        help="UNet output scales to measure with: 1 is the random model as is; below 1 a tamer model "
        "(eps times the scale, as if the UNet's output layer were scaled), smooth enough for its DDIM "
        "inversion to converge",
    )
    args = parser.parse_args()
    if args.reconstruction:
        return reconstruction(args)

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
        model=sd15.model,
        moa=moa,
        clip=sd15.clip,
        clip_vision=clip_vision,
        text="a person",
        subject_words="person",
        image_1=subject,
        subject_weights="1.0",
        strength=1.0,
        start_percent=0.0,
        end_percent=1.0,
    ).result
    negative = nodes.CLIPTextEncode().encode(sd15.clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}

    def plain():
        out = nodes.common_ksampler(moa_model, 1, args.steps, 1.0, "euler", "ddim_uniform", positive, negative, latent)[
            0
        ]
        return sd15.vae.decode(out["samples"])

    def swap():
        return ddim_nodes.MoADDIMSwap.execute(
            sd15.model, moa_model, positive, negative, sd15.vae, photo, args.steps, 1.0, 1.0
        ).result[0]

    times = {"plain": [], "swap": []}
    with torch.inference_mode():
        plain(), swap()  # warm-up: model loads outside the timing
        for _ in range(args.reps):
            for name, fn in (("plain", plain), ("swap", swap)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{args.size}x{args.size}, {args.steps} steps, cfg 1, CPU threads {torch.get_num_threads()}: "
        f"plain generation {med['plain']:.2f} s, MoA DDIM swap {med['swap']:.2f} s, ratio {med['swap'] / med['plain']:.2f} (target <= 2.1)"
    )


def reconstruction(args):
    """Invert the photo with the prior and regenerate with the same model (the swap without MoA):
    relative error of the regenerated latent to the photo's, and the cost in UNet evaluations
    (one per latent row; 'backward' = those the null-text optimization differentiates). The
    random UNet is chaotic (its eps is no score of any data); with --eps-scales below 1 the
    same rows are measured on a tamer model whose eps is scaled down.

    On this random UNet null-text's gain is bounded by its optimization budget, not by the method:
    eps barely responds to the text embedding, so the embedding must travel about its own size
    (rms ~1.4) while Adam moves each element at most lr per update. Measured (64 px, cfg 3):
    5 steps, paper's 10 it / lr 0.01: 25.1 refined -> 10.3; 2 steps, 50 it / lr 0.1: 8.49 -> 0.064."""
    import hostenv
    from helpers.fixtures import load_sd15

    sd15 = load_sd15()
    hostenv.import_pack()
    import nodes

    ddim_nodes = importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.ddim_nodes")
    counts = {"rows": 0, "backward": 0}

    def measured(scale):
        def unet(apply_model, a):
            counts["rows"] += a["input"].shape[0]
            counts["backward"] += a["input"].shape[0] if torch.is_grad_enabled() else 0
            x = a["input"]
            denoised = apply_model(x, a["timestep"], **a["c"])
            # x0 = x - sigma eps, so scaling eps by s is x - s (x - x0)
            return denoised if scale == 1 else x - scale * (x - denoised)

        model = sd15.model.clone()
        model.set_model_unet_function_wrapper(unet)
        return model

    y, x = torch.meshgrid(torch.linspace(0, 1, args.size), torch.linspace(0, 1, args.size), indexing="ij")
    photo = torch.stack([x, y, 0.5 + 0.5 * torch.sin(6 * x) * torch.cos(4 * y)], dim=-1)[None]
    positive = nodes.CLIPTextEncode().encode(sd15.clip, "a person")[0]
    negative = nodes.CLIPTextEncode().encode(sd15.clip, "")[0]
    methods = {
        "plain DDIM": {"refine_iters": 0, "inversion": "ddim"},
        f"refined DDIM ({args.refine})": {"refine_iters": args.refine, "inversion": "ddim"},
        f"null-text ({args.iters} it, lr {args.lr:g})": {
            "refine_iters": args.refine,
            "inversion": "null_text",
            "null_text_iters": args.iters,
            "null_text_lr": args.lr,
        },
    }
    print(
        f"random SD1.5, {args.size}x{args.size}, {args.steps} steps, invert at cfg 1 -> regenerate at cfg "
        f"(no MoA), relative error of the latent; CPU threads {torch.get_num_threads()}"
    )
    print(
        f"{'eps scale':>9}  {'method':<28}{'cfg':>5}{'rel. error':>12}{'UNet evals':>12}{'backward':>10}{'time s':>9}"
    )
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        target = sd15.vae.encode(photo)
        for scale in (float(s) for s in args.eps_scales.split(",")):
            model = measured(scale)
            for cfg in (float(c) for c in args.cfgs.split(",")):
                for name, options in methods.items():
                    counts.update(rows=0, backward=0)
                    start = time.perf_counter()
                    out = ddim_nodes.MoADDIMSwap.execute(
                        model, model, positive, negative, sd15.vae, photo, args.steps, cfg, 1.0, **options
                    ).result[1]["samples"]
                    seconds = time.perf_counter() - start
                    error = float((out - target).norm() / target.norm())
                    print(
                        f"{scale:>9g}  {name:<28}{cfg:>5g}{error:>12.4f}{counts['rows']:>12}"
                        f"{counts['backward']:>10}{seconds:>9.1f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()

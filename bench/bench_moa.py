"""MoA cost on the SD1.5 UNet: measured step-time ratio beside the FLOP-predicted one.

    python3 -m bench.bench_moa [--sizes 256 512] [--subjects 2] [--reps 5] [--device cpu|cuda]

Builds a random-weight SD1.5 UNet with ComfyUI's own classes (no file needed), a random MoA
model over its 32 attention layers (tests/helpers/moa_weights: the prior's shapes, perturbed
personalized attentions, routers and fusion) and patches it with the pack's host adapter
(nodes/moa_patch.apply_moa) exactly as MoA Subject Inject does. Times, interleaved, one UNet
forward of batch 2 (one cond row + one uncond row, as cfg > 1 runs):

* base: the unpatched UNet;
* MoA: strength 1, subjects fused into the cond row's context;
* patches at strength 0: the MoA patches in place with strength 0 (the stash and the output
  patch run; the router and personalized branch do not). MoA Subject Inject itself returns an
  unpatched clone at strength 0, which costs exactly the base.

The FLOP-predicted ratio comes from torch's FlopCounterMode on the same forward passes.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import hostenv  # noqa: E402

from bench.bench_mole import Elapsed, build_unet, flops, peak_cuda_memory  # noqa: E402  (the same random SD1.5 UNet)


def moa_models(patcher, subjects: int, seed: int = 0):
    """(MoA-patched clone at strength 1, at strength 0, MoA weight bytes)."""
    from helpers import moa_weights as aw

    pack = hostenv.import_pack()
    core = importlib.import_module(f"{pack.__name__}.mixture_core.moa")
    files = importlib.import_module(f"{pack.__name__}.mixture_core.moa_files")
    adapter = importlib.import_module(f"{pack.__name__}.nodes.moa_patch")
    # Through the file format, as the nodes get it (and as the pack's own classes).
    tmp = Path(f"/tmp/bench_moa_{seed}.safetensors")
    aw.write_moa_file(tmp, patcher, seed=seed, dtype=patcher.model_dtype())
    moa = files.load_moa_file(tmp)
    tmp.unlink()
    gen = torch.Generator().manual_seed(seed)
    bindings = [
        core.SubjectBinding(2 + 3 * i, torch.randn(moa.fusion.image_dim, generator=gen)) for i in range(subjects)
    ]
    model_sampling = patcher.get_model_object("model_sampling")

    weights = importlib.import_module(f"{pack.__name__}.nodes.patching").weights_patcher(moa)

    def patched(strength):
        settings = adapter.MoASettings(
            strength=strength, sigma_start=float("inf"), sigma_end=0.0, bindings=bindings, model_sampling=model_sampling
        )
        return adapter.apply_moa(patcher, moa, weights, settings)

    weight_bytes = sum(p.numel() * p.element_size() for p in moa.parameters())
    return patched(1.0), patched(0.0), weight_bytes


def step_fn(patcher, size, batch, device, dtype):
    import comfy.model_management as mm

    x = torch.randn(batch, 4, size // 8, size // 8, device=device, dtype=dtype)
    sigma = torch.full((batch // 2 or 1,), 2.0, device=device)
    t = patcher.get_model_object("model_sampling").timestep(sigma).float().repeat(2 if batch > 1 else 1)
    context = torch.randn(batch, 77, 768, device=device, dtype=dtype)
    chunks = [0, 1] if batch > 1 else [0]  # one cond chunk, one uncond chunk, as the sampler batches them

    def run():
        """Seconds of one UNet forward (loading/patching the model is not timed)."""
        mm.load_models_gpu([patcher] + patcher.get_nested_additional_models(), force_full_load=True)
        options = dict(
            patcher.model_options["transformer_options"],
            cond_or_uncond=chunks,
            sigmas=sigma,
            uuids=["cond", "uncond"][: len(chunks)],
        )
        moa_patch = importlib.import_module(f"{hostenv.import_pack().__name__}.nodes.moa_patch").find_moa_patch(patcher)
        if moa_patch is not None:  # the cond chunk carries the subjects, as the sampler's wrapper would say
            options[moa_patch.rows_key] = frozenset({(0, "cond")})
        with Elapsed(device) as timer, torch.inference_mode():
            patcher.model.diffusion_model(x, t, context=context, transformer_options=options)
        return timer.seconds

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="2 = one cond + one uncond, as cfg > 1 runs")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)

    base = build_unet(device, dtype)
    moa, moa_off, weight_bytes = moa_models(base, args.subjects)
    print(
        f"device {device} ({torch.get_num_threads()} threads), dtype {dtype}, batch {args.batch}, "
        f"MoA on 32 attention layers, {args.subjects} subject(s), MoA weights {weight_bytes / 2**20:.1f} MiB"
    )
    for size in args.sizes:
        runs = {
            name: step_fn(p, size, args.batch, device, dtype)
            for name, p in (("base", base), ("moa", moa), ("strength0", moa_off))
        }
        counted = {name: flops(run) for name, run in runs.items()}
        times = {name: [] for name in runs}
        for run in runs.values():
            run()  # warm-up (and model load) outside the timing
        for _ in range(args.reps):
            for name, run in runs.items():  # interleaved so drift hits all three alike
                times[name].append(run())
        med = {name: statistics.median(v) for name, v in times.items()}
        predicted = counted["moa"] / counted["base"]
        measured = med["moa"] / med["base"]
        print(
            f"{size}x{size}: base {med['base'] * 1e3:.1f} ms, MoA {med['moa'] * 1e3:.1f} ms, "
            f"patches at strength 0 {med['strength0'] * 1e3:.1f} ms | FLOPs base {counted['base'] / 1e9:.1f} G, "
            f"MoA +{(predicted - 1) * 100:.1f}% | ratio measured {measured:.3f} vs predicted {predicted:.3f} "
            f"(measured/predicted {measured / predicted:.3f}); patches at strength 0 cost "
            f"{(med['strength0'] / med['base'] - 1) * 100:+.1f}% (MoA Subject Inject at strength 0: an unpatched clone, +0%)"
        )
        spread = {name: (min(v) * 1e3, max(v) * 1e3) for name, v in times.items()}
        print(
            "  min..max ms: "
            + ", ".join(f"{name} {lo:.0f}..{hi:.0f}" for name, (lo, hi) in spread.items())
            + f" | ratio of the fastest runs {spread['moa'][0] / spread['base'][0]:.3f} (less sensitive to other load on the machine)"
        )
        if device.type == "cuda":
            peaks = peak_cuda_memory(runs)
            print(
                f"  peak CUDA memory: base {peaks['base'] / 2**20:.0f} MiB, MoA {peaks['moa'] / 2**20:.0f} MiB "
                f"(+{(peaks['moa'] - peaks['base']) / 2**20:.0f} MiB; MoA weights {weight_bytes / 2**20:.0f} MiB)"
            )


if __name__ == "__main__":
    main()

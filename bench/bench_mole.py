"""MoLE cost on the SD1.5 UNet: measured step-time ratio beside the FLOP-predicted one.

    python3 -m bench.bench_mole [--sizes 256 512] [--rank 256] [--reps 5] [--device cpu|cuda]

Builds a random-weight SD1.5 UNet with ComfyUI's own classes (no file needed), two rank-R
experts on the 192 targeted layers with gates, and times in one run, interleaved:
the base UNet, MoLE at strength 1 (both gates) and MoLE at strength 0. The FLOP-predicted
ratio comes from torch's FlopCounterMode on the same forward passes. Times are the best of
the reps (noise on a shared machine only adds time); the median's excess is printed beside.
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
import hostenv  # noqa: E402


class Elapsed:
    """Seconds the block took: on a CUDA device between two CUDA events (the GPU's own clock;
    the block is not synchronised inside), elsewhere by the host's clock."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def build_unet(device, dtype, unet_config: dict | None = None):
    """A random SD1.5 UNet (or, given unet_config, another SD1.5-family layout) in a ModelPatcher."""
    hostenv.import_host()
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15.unet_config | dict(
        num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        transformer_depth_middle=1,
        num_heads=8,
        num_head_channels=-1,
        in_channels=4,
        out_channels=4,
        use_spatial_transformer=True,
        legacy=False,
        image_size=32,
        num_classes=None,
        dims=2,
        disable_self_attentions=None,
        use_checkpoint=False,
    )
    config |= unet_config or {}
    model_config = comfy.supported_models.SD15(config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and name == "weight":
                    p.fill_(1.0)
                elif p.ndim > 1:
                    p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p[0].numel()) ** 0.5)
                else:
                    p.zero_()
    return comfy.model_patcher.ModelPatcher(model, device, device)


def random_experts(patcher, rank):
    """Two random rank-`rank` experts ("face", "hand") on every MoLE target layer of the model,
    keyed by module path (mixture_core.mole_files.Expert)."""
    from helpers import mole_weights as mw

    from mixture_core.lora_format import LoRAPair
    from mixture_core.mole_files import Expert

    layers = mw.target_layers(patcher)
    gen = torch.Generator().manual_seed(1)

    def expert(name):
        pairs = {
            p: LoRAPair(
                torch.randn(rank, d_in, generator=gen) / d_in**0.5,
                torch.randn(d_out, rank, generator=gen) * 0.01,
                float(rank),
                conv,
            )
            for p, (d_in, d_out, conv) in layers.items()
        }
        return Expert(name, None, 1.0, pairs)

    return [expert("face"), expert("hand")]


def mole_model(patcher, rank, strength):
    from helpers import mole_weights as mw

    from mixture_core.mole import wrap_forward
    from mixture_core.mole_files import GateFile, build_mole_layers

    pack = hostenv.import_pack()
    patching = importlib.import_module(f"{pack.__name__}.nodes.patching")
    gate = GateFile(None, "released", ["face", "hand"], mw.random_gates(mw.target_layers(patcher), 2, "released"))
    built = build_mole_layers(
        random_experts(patcher, rank), gate, lambda name: name, strength=strength, dtype=patcher.model_dtype()
    )
    patched = patcher.clone()
    for path, layer in built.items():
        patching.chain_forward(patched, path, lambda prev, layer=layer: wrap_forward(layer, prev))
    patching.attach_weights(patched, "mole", torch.nn.ModuleList(built.values()))
    weight_bytes = sum(p.numel() * p.element_size() for p in torch.nn.ModuleList(built.values()).parameters())
    return patched, weight_bytes


def step_fn(patcher, size, batch, device, dtype):
    import comfy.model_management as mm

    config = patcher.model.model_config.unet_config
    x = torch.randn(batch, 4, size // 8, size // 8, device=device, dtype=dtype)
    t = torch.full((batch,), 500.0, device=device)
    context = torch.randn(batch, 77, config.get("context_dim", 768), device=device, dtype=dtype)
    adm = config.get("adm_in_channels")  # SDXL: the pooled text and size embedding
    y = torch.randn(batch, adm, device=device, dtype=dtype) if adm else None

    def run():
        """Seconds of one UNet forward (loading/patching the model is not timed)."""
        mm.load_models_gpu([patcher] + patcher.get_nested_additional_models(), force_full_load=True)
        with Elapsed(device) as timer, torch.inference_mode():
            patcher.model.diffusion_model(x, t, context=context, y=y, transformer_options={})
        return timer.seconds

    return run


def flops(run):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def peak_cuda_memory(runs):
    """{name: peak CUDA bytes of one run}, each run from a clean unload."""
    import comfy.model_management as mm

    mm.unload_all_models()
    peaks = {}
    for name, run in runs.items():
        torch.cuda.reset_peak_memory_stats()
        run()
        peaks[name] = torch.cuda.max_memory_allocated()
    return peaks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="2 = one cond + one uncond, as cfg > 1 runs")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)

    base = build_unet(device, dtype)
    mole, weight_bytes = mole_model(base, args.rank, 1.0)
    node_off = base.clone()  # what Apply MoLE Gating returns at strength 0
    gain_off, _ = mole_model(base, args.rank, 0.0)  # every layer patched, all gains 0
    print(
        f"device {device} ({torch.get_num_threads()} threads), dtype {dtype}, batch {args.batch}, "
        f"two rank-{args.rank} experts on 192 layers, expert+gate weights {weight_bytes / 2**20:.1f} MiB"
    )
    for size in args.sizes:
        runs = {
            name: step_fn(p, size, args.batch, device, dtype)
            for name, p in (("base", base), ("mole", mole), ("strength0", node_off), ("gain0", gain_off))
        }
        counted = {name: flops(run) for name, run in runs.items()}
        times = {name: [] for name in runs}
        for run in runs.values():
            run()  # warm-up (and model load) outside the timing
        for _ in range(args.reps):
            for name, run in runs.items():  # interleaved so drift hits all three alike
                times[name].append(run())
        # Best of the reps: timing noise on a shared machine only ever adds time.
        med = {name: min(v) for name, v in times.items()}
        spread = ", ".join(f"{name} {(statistics.median(v) / min(v) - 1) * 100:.1f}%" for name, v in times.items())
        predicted = counted["mole"] / counted["base"]
        measured = med["mole"] / med["base"]
        print(
            f"{size}x{size}: base {med['base'] * 1e3:.1f} ms, MoLE {med['mole'] * 1e3:.1f} ms | FLOPs base {counted['base'] / 1e9:.1f} G, "
            f"MoLE +{(predicted - 1) * 100:.1f}% | ratio measured {measured:.3f} vs predicted {predicted:.3f} "
            f"(measured/predicted {measured / predicted:.3f}); strength 0 (node) costs {(med['strength0'] / med['base'] - 1) * 100:+.1f}%, "
            f"patched with all gains 0 {(med['gain0'] / med['base'] - 1) * 100:+.1f}% (best of {args.reps}; "
            f"median above best: {spread})"
        )
        if device.type == "cuda":
            peaks = peak_cuda_memory(runs)
            print(
                f"  peak CUDA memory: base {peaks['base'] / 2**20:.0f} MiB, MoLE {peaks['mole'] / 2**20:.0f} MiB "
                f"(+{(peaks['mole'] - peaks['base']) / 2**20:.0f} MiB; expert+gate weights {weight_bytes / 2**20:.0f} MiB)"
            )


if __name__ == "__main__":
    main()

"""The pack's cost on a CUDA GPU in one command and one table (under 8 minutes on one GPU).

    python -m bench.gpu                 # on a CUDA GPU: the real sizes
    python -m bench.gpu --smoke         # tiny sizes (the default without CUDA): the suite's smoke test

Rows (random weights in the real layouts, built on the device from ComfyUI's own model configs,
no file; times are medians after a warm-up, by CUDA events on a GPU):

* MoLE on SDXL at 1024 px and on SD1.5 at 512 px (fp16, batch 2 = one cond + one uncond row,
  two rank-256 experts on every targeted layer): one UNet step against the plain UNet, and the
  time ratio against the FLOP ratio (torch's FlopCounterMode on the same calls: bench_mole);
* MoA on SD1.5 at 512 px (two subjects, the cond row bound): against plain (bench_moa);
* MoA DDIM Swap (inversion + MoA generation + VAE encode/decode) against a plain generation
  with the same steps and cfg (KSampler + VAE decode);
* training steps (forward + backward, bf16 autocast, frozen weights in bf16) at batch 1 and 4:
  MoLE stage 3 (the gates, experts frozen) and MoA (its layers, the UNet frozen), without and with
  gradient checkpointing: samples/s (bench/gpu_training.py).

Columns: the baseline (plain model; for training: without checkpointing), the pack (for
training: with checkpointing), their time ratio, the FLOP ratio, and peak memory: on CUDA
torch.cuda.max_memory_allocated of one call (reset before each; weights resident included), on
the CPU the peak of live tensors during the call (torch's profiler; weights not included).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import hostenv  # noqa: E402

from bench import bench_moa, bench_mole  # noqa: E402


@dataclasses.dataclass
class Profile:
    sd15_config: dict  # overrides of bench_mole.build_unet's SD1.5 config
    sdxl_config: dict | None  # None: SDXL's own (random_models.SDXL_UNET_CONFIG)
    sd15_px: int
    sdxl_px: int
    dtype: torch.dtype
    rank: int
    ddim_steps: int
    reps: int
    train_px: int
    train_reps: int
    # Storage of the frozen weights in training (bf16 autocast either way). On the CPU, fp32:
    # its group_norm takes bf16 input with fp32 weights, never fp32 input (MoLE's fp32 layer
    # outputs) with bf16 weights, which autocast on CUDA casts for it.
    train_weights: torch.dtype = torch.bfloat16
    # bf16 autocast in training, and the VAE's dtype (None: ComfyUI's choice for the device). The
    # CPU smoke runs both in fp32: this CPU emulates bf16 slowly (seconds per tiny step).
    autocast: torch.dtype | None = torch.bfloat16
    vae_dtype: torch.dtype | None = None
    tiny_vae: bool = False


FULL = Profile(
    sd15_config={},
    sdxl_config=None,
    sd15_px=512,
    sdxl_px=1024,
    dtype=torch.float16,
    rank=256,
    ddim_steps=10,
    reps=10,
    train_px=512,
    train_reps=5,
)
# The same layer kinds at a width and depth a CPU runs in seconds (SD1.5- and SDXL-family configs).
_TINY = dict(model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 1], transformer_depth=[1, 1])
SMOKE = Profile(
    sd15_config={**_TINY, "transformer_depth_output": [1, 1, 1, 1]},
    sdxl_config={  # SDXL's heads are 64 channels wide whatever the config says (comfy.supported_models.SDXL)
        **_TINY,
        "model_channels": 64,
        "channel_mult": [1, 1, 1],
        "num_res_blocks": [1, 1, 1],
        "transformer_depth": [0, 1, 1],
        "transformer_depth_output": [0, 0, 1, 1, 1, 1],
        "transformer_depth_middle": 1,
    },
    sd15_px=32,
    sdxl_px=32,
    dtype=torch.float32,
    rank=4,
    ddim_steps=2,
    reps=1,
    train_px=32,
    train_reps=1,
    train_weights=torch.float32,
    autocast=None,
    vae_dtype=torch.float32,
    tiny_vae=True,
)


@dataclasses.dataclass
class Row:
    name: str
    unit: str  # of baseline / pack
    baseline: float
    pack: float
    time_ratio: float  # pack's time over the baseline's
    flop_ratio: float
    peak_baseline: int  # bytes
    peak_pack: int


COLUMNS = (
    "measurement",
    "unit",
    "baseline",
    "pack",
    "time ratio",
    "FLOP ratio",
    "time/FLOP",
    "peak MiB",
    "peak MiB pack",
)


def format_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = (
            r.name,
            r.unit,
            f"{r.baseline:.4g}",
            f"{r.pack:.4g}",
            f"{r.time_ratio:.3f}",
            f"{r.flop_ratio:.3f}",
            f"{r.time_ratio / r.flop_ratio:.3f}",
            f"{r.peak_baseline / 2**20:.1f}",
            f"{r.peak_pack / 2**20:.1f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def medians(runs: dict, reps: int) -> dict[str, float]:
    """{name: median seconds}: each run once to warm up, then `reps` rounds, interleaved so that
    drift hits every variant alike. A run returns its seconds (bench_mole.Elapsed)."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            times[name].append(run())
    return {name: statistics.median(v) for name, v in times.items()}


class LivePeak(TorchDispatchMode):
    """The peak bytes of CPU tensor storages allocated inside the mode and alive at once (each
    storage counted once, from its creation by an op to its release). torch's profiler
    (tests/helpers/cpu_memory.py) gives the same figure but takes seconds to parse a training
    step's events; this takes microseconds per op."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self.live: set[int] = set()

    def _released(self, key: int, size: int) -> None:
        self.now -= size
        self.live.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()  # one Python object per storage while it lives
                key = id(storage)
                if key not in self.live:
                    self.live.add(key)
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._released, key, storage.nbytes())
        return out


def peak_memory(runs: dict, device) -> dict[str, int]:
    """{name: peak bytes of one call}: on CUDA max_memory_allocated from a clean unload
    (bench_mole.peak_cuda_memory), on the CPU the peak of live tensors the call allocates."""
    if torch.device(device).type == "cuda":
        return bench_mole.peak_cuda_memory(runs)
    peaks = {}
    for name, run in runs.items():
        with LivePeak() as counter:
            run()
        peaks[name] = counter.peak
    return peaks


_STARTED = time.monotonic()


def note(what: str) -> None:
    """Progress on stderr (the table alone goes to stdout)."""
    print(f"[{time.monotonic() - _STARTED:6.1f} s] {what}", file=sys.stderr, flush=True)


def compare(name, base_run, pack_run, reps, device) -> Row:
    note(name)
    runs = {"base": base_run, "pack": pack_run}
    counted = {k: bench_mole.flops(run) for k, run in runs.items()}
    med = medians(runs, reps)
    peaks = peak_memory(runs, device)
    return Row(
        name,
        "ms",
        med["base"] * 1e3,
        med["pack"] * 1e3,
        med["pack"] / med["base"],
        counted["pack"] / counted["base"],
        peaks["base"],
        peaks["pack"],
    )


def sdxl_unet(profile: Profile, device):
    import comfy.model_patcher
    from helpers import random_models as rm

    config = rm.SDXL_UNET_CONFIG if profile.sdxl_config is None else {**rm.SDXL_UNET_CONFIG, **profile.sdxl_config}
    return comfy.model_patcher.ModelPatcher(rm.build_sdxl_unet(profile.dtype, unet_config=config), device, device)


def vae(device, dtype, tiny: bool):
    """A random SD1.x VAE (AutoencoderKL, ComfyUI's default configuration) as comfy.sd.VAE;
    tiny: ComfyUI's TAESD instead (the same comfy.sd.VAE calls, a few ms on a CPU)."""
    import comfy.ldm.models.autoencoder
    import comfy.sd
    import comfy.taesd.taesd
    from helpers import random_models as rm

    if tiny:
        model = comfy.taesd.taesd.TAESD(latent_channels=4)
    else:
        model = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(rm.SD_VAE_DDCONFIG), embed_dim=4)
    rm._randomize_(model, rm.SEED_SD15 + 2)
    return comfy.sd.VAE(sd=model.state_dict(), device=device, dtype=dtype)


def ddim_swap_row(base, profile: Profile, device, cfg: float = 5.0) -> Row:
    """MoA DDIM Swap (inversion at cfg 1 with the plain model, regeneration with MoA at `cfg`,
    VAE encode + decode) against a plain generation (KSampler with the MoA model + VAE decode)."""
    import nodes

    pack = hostenv.import_pack()
    ddim_nodes = importlib.import_module(f"{pack.__name__}.nodes.ddim_nodes")
    moa_patch = importlib.import_module(f"{pack.__name__}.nodes.moa_patch")
    moa, _, _ = bench_moa.moa_models(base, 1)
    gen = torch.Generator().manual_seed(3)
    px, steps = profile.sd15_px, profile.ddim_steps
    positive = moa_patch.mark_conditioning(
        [[torch.randn(1, 77, 768, generator=gen), {}]], moa_patch.find_moa_patch(moa).settings.mark
    )
    negative = [[torch.randn(1, 77, 768, generator=gen), {}]]
    photo = torch.rand(1, px, px, 3, generator=gen)
    latent = {"samples": torch.zeros(1, 4, px // 8, px // 8)}
    decoder = vae(device, profile.vae_dtype, tiny=profile.tiny_vae)

    def timed(fn):
        def run():
            with bench_mole.Elapsed(device) as timer, torch.inference_mode():
                fn()
            return timer.seconds

        return run

    def plain():
        out = nodes.common_ksampler(moa, 0, steps, cfg, "euler", "ddim_uniform", positive, negative, latent)[0]
        decoder.decode(out["samples"])

    def swap():
        ddim_nodes.MoADDIMSwap.execute(base, moa, positive, negative, decoder, photo, steps, cfg, 1.0)

    row = compare(f"MoA DDIM swap SD1.5 {px} px, {steps} steps, cfg {cfg:g}", timed(plain), timed(swap), 3, device)
    return dataclasses.replace(row, unit="ms/image")


def inference_rows(profile: Profile, device) -> tuple[list[Row], object]:
    rows = []
    dtype_name = str(profile.dtype).removeprefix("torch.")
    sdxl = sdxl_unet(profile, device)
    mole_xl, _ = bench_mole.mole_model(sdxl, profile.rank, 1.0)
    px = profile.sdxl_px
    rows.append(
        compare(
            f"MoLE SDXL {px} px {dtype_name}, step",
            bench_mole.step_fn(sdxl, px, 2, device, profile.dtype),
            bench_mole.step_fn(mole_xl, px, 2, device, profile.dtype),
            profile.reps,
            device,
        )
    )
    del sdxl, mole_xl
    free(device)
    sd15 = bench_mole.build_unet(device, profile.dtype, profile.sd15_config)
    mole, _ = bench_mole.mole_model(sd15, profile.rank, 1.0)
    moa, _, _ = bench_moa.moa_models(sd15, 2)
    px = profile.sd15_px
    for name, patched, step_fn in (("MoLE", mole, bench_mole.step_fn), ("MoA", moa, bench_moa.step_fn)):
        rows.append(
            compare(
                f"{name} SD1.5 {px} px {dtype_name}, step",
                step_fn(sd15, px, 2, device, profile.dtype),
                step_fn(patched, px, 2, device, profile.dtype),
                profile.reps,
                device,
            )
        )
    del mole, moa
    rows.append(ddim_swap_row(sd15, profile, device))
    return rows, sd15


def free(device):
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.cleanup_models_gc()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the default without CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    profile = SMOKE if args.smoke or device.type != "cuda" else FULL
    hostenv.import_host()
    from bench import gpu_training

    torch.manual_seed(0)
    rows, sd15 = inference_rows(profile, device)
    unet = sd15.model.diffusion_model
    free(device)
    rows += gpu_training.training_rows(sd15, unet, profile, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"bench.gpu on {where}, torch {torch.__version__}"
        + (" -- SMOKE: tiny models and sizes, the code path only, not a measurement" if profile is SMOKE else "")
        + f"; {time.monotonic() - _STARTED:.0f} s"
    )
    print(format_table(rows))
    bad = [r.name for r in rows if not all(math.isfinite(v) for v in dataclasses.astuple(r)[2:])]
    if bad:
        raise SystemExit(f"error: rows with a non-finite figure: {bad}")
    return rows


if __name__ == "__main__":  # through the module's own name, the one bench/gpu_training.py imports
    from bench import gpu

    gpu.main()

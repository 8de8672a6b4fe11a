"""Peak tensor memory of one training step (forward + backward) with and without
--gradient-checkpointing, on a small UNet built from ComfyUI's own UNetModel, on the CPU
(torch's profiler; tests/helpers/cpu_memory.py), side by side.

    python3 -m bench.bench_grad_checkpoint [--sizes 16 32 48] [--channels 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "training"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 48], help="latent sizes (pixels / 8)")
    parser.add_argument("--channels", type=int, default=32)
    args = parser.parse_args()

    import torch
    from helpers.cpu_memory import peak_tensor_memory
    from test_training_units import tiny_unet

    from training.grad_checkpoint import enable_gradient_checkpointing

    torch.set_num_threads(1)
    print("latent  plain MiB  checkpointed MiB  ratio")
    for size in args.sizes:
        x, ctx, t = torch.randn(1, 4, size, size), torch.randn(1, 5, 16), torch.tensor([500.0])
        peaks = []
        for checkpointing in (False, True):
            unet = tiny_unet(args.channels)
            if checkpointing:
                enable_gradient_checkpointing(unet)
            peaks.append(
                peak_tensor_memory(
                    lambda: unet(x, timesteps=t, context=ctx, transformer_options={}).square().mean().backward()
                )
            )
        print(f"{size:6d}  {peaks[0] / 2**20:9.1f}  {peaks[1] / 2**20:16.1f}  {peaks[1] / peaks[0]:.2f}")


if __name__ == "__main__":
    main()

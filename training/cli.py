"""The command line every training script shares: model and data, optimisation, engineering
options, and their checks (which run before anything is loaded)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

from .optim import lion_class
from .sampling import read_prompts

CAPTION_DATA = 'image folder: images with same-name .txt captions, or a metadata.jsonl ({"file_name", "text"})'


def base_parser(
    description: str,
    epilog: str = "",
    *,
    data_help: str = CAPTION_DATA,
    caption_pipeline: bool = True,
    diffusion_loss: bool = True,
    samples: bool = True,
) -> argparse.ArgumentParser:
    """The shared options. A script with its own data, loss or model leaves out what it would
    ignore: caption_pipeline --crop, --flip, --no-cache, --cache-dir (training.datasets);
    diffusion_loss --min-snr-gamma (training.losses); samples --sample-* (the plain UNet sampled)."""
    p = argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--checkpoint",
        required=True,
        help="single-file SD checkpoint (.safetensors), the file ComfyUI's Load Checkpoint loads",
    )
    g.add_argument("--data", required=True, help=data_help)
    g.add_argument(
        "--resolution",
        type=int,
        default=512,
        help="square training size in pixels, a multiple of 64 (default 512; 1024 for SDXL)",
    )
    if caption_pipeline:
        g.add_argument(
            "--crop",
            choices=("center", "random"),
            default="center",
            help="square crop after resizing the shorter side (default center)",
        )
        g.add_argument("--flip", action="store_true", help="random horizontal flips")
        g.add_argument(
            "--no-cache",
            dest="cache",
            action="store_false",
            help="encode images and captions at every step instead of once into the on-disk cache (random crops/flips are never cached)",
        )
        g.add_argument(
            "--cache-dir",
            default=None,
            help="folder of the latent and text-embedding cache, one file per image, kept across runs and resumes (default <work dir>/cache)",
        )
    else:
        p.set_defaults(cache=False)
    g.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader worker processes for image decoding (uncached runs)"
    )

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, required=True, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=1, help="images per process per micro-batch")
    g.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches per optimizer step (effective batch = batch-size x grad-accum x processes)",
    )
    g.add_argument("--lr", type=float, required=True, help="learning rate")
    g.add_argument(
        "--optimizer",
        choices=("adamw", "lion", "sgd"),
        default="adamw",
        help="adamw (default), lion, or plain sgd (no per-element normalisation: the runs the equivalence tests compare)",
    )
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--beta1", type=float, default=None, help="default 0.9 (AdamW), 0.9 (Lion)")
    g.add_argument("--beta2", type=float, default=None, help="default 0.999 (AdamW), 0.99 (Lion)")
    g.add_argument(
        "--lr-scheduler",
        default="constant",
        choices=("constant", "constant_with_warmup", "linear", "cosine"),
        help="transformers.get_scheduler's schedule (warmup ramps from 0)",
    )
    g.add_argument("--lr-warmup-steps", type=int, default=0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    if diffusion_loss:
        g.add_argument(
            "--min-snr-gamma",
            type=float,
            default=None,
            help="Min-SNR loss weighting, min(SNR, gamma)/SNR (the MoLE paper uses 5)",
        )
    g.add_argument(
        "--fixed-noise",
        action="store_true",
        help="draw each image's noise and timestep once (per image, not per step): an overfitting check, not for real training",
    )

    g = p.add_argument_group("engineering")
    g.add_argument(
        "--mixed-precision",
        choices=("no", "bf16", "fp16"),
        default="no",
        help="autocast precision; frozen weights are stored in it too (trainable ones stay fp32)",
    )
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute UNet blocks in the backward pass (less memory, ~30%% slower)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output", required=True, help="the file to write (.safetensors)")
    g.add_argument("--work-dir", default=None, help="checkpoints and log (default: <output without .safetensors>-work)")
    g.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="save a resumable checkpoint (and the output file as of then) every N steps",
    )
    g.add_argument("--keep-checkpoints", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    g.add_argument(
        "--resume", default=None, help="checkpoint folder to resume from, or 'latest' (newest in the work dir)"
    )
    g.add_argument("--log-every", type=int, default=1, help="log line every N steps")
    if samples:
        g.add_argument(
            "--sample-every",
            type=int,
            default=0,
            help="write sample images every N steps (and at the last), <work dir>/samples",
        )
        g.add_argument("--sample-prompts", default=None, help="text file of the sample prompts, one per line")
        g.add_argument("--sample-steps", type=int, default=20, help="sampling steps (euler) of the sample images")
        g.add_argument("--sample-cfg", type=float, default=7.0)
        g.add_argument("--sample-seed", type=int, default=0)
    else:
        p.set_defaults(sample_every=0, sample_prompts=None)
    g.add_argument(
        "--log-with",
        choices=("none", "tensorboard"),
        default="none",
        help="also log loss and lr through Accelerate's tracker (tensorboard: <work dir>/logs; needs pip install tensorboard)",
    )
    return p


def check_args(args) -> None:
    if args.resolution % 64:
        raise SystemExit(f"error: --resolution must be a multiple of 64, not {args.resolution}")
    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    if args.cache and (args.crop == "random" or args.flip):
        args.cache = False  # random crops and flips differ per step: nothing to cache
    if not str(args.output).endswith(".safetensors"):
        raise SystemExit(f"error: --output must be a .safetensors file, not {args.output}")
    if args.work_dir is None:
        args.work_dir = str(Path(args.output).with_suffix("")) + "-work"
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise SystemExit(
            "error: --mixed-precision fp16 needs a CUDA GPU (autocast on the CPU computes in bf16 only); "
            "use --mixed-precision bf16 or no"
        )
    if args.sample_every and not args.sample_prompts:
        raise SystemExit("error: --sample-every needs --sample-prompts (a text file, one prompt per line)")
    if args.sample_prompts:
        read_prompts(args.sample_prompts)
    if args.optimizer == "lion":
        lion_class()  # installed? (an optional extra)
    if (
        args.log_with == "tensorboard"
        and importlib.util.find_spec("tensorboard") is None
        and importlib.util.find_spec("tensorboardX") is None
    ):
        raise SystemExit("error: --log-with tensorboard needs the tensorboard package: pip install tensorboard")


def weight_dtype(args) -> torch.dtype:
    """The storage dtype of frozen weights for --mixed-precision."""
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]

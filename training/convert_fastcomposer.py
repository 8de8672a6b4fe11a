"""Convert FastComposer's published weights into a MoA file (and its image encoder into a clip_vision file).

    python -m training.convert_fastcomposer model/fastcomposer/pytorch_model.bin \\
        --out models/moa/fastcomposer.safetensors \\
        --clip-vision-out models/clip_vision/fastcomposer_image_encoder.safetensors

(--out and --clip-vision-out may also be given in two separate runs.)

For people who want files: Load MoA Router reads FastComposer's pytorch_model.bin put into
models/moa directly, with the same conversion (mixture_core.fastcomposer, where what becomes
what is described) and its own image encoder. This command is the thin command line over it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here] + [str(_here.parent)]
    __package__ = "training"

import torch

from mixture_core.errors import WeightFileError
from mixture_core.fastcomposer import (  # noqa: F401  (attention_layers, check_keys: the layout, for tests and users)
    DEFAULT_ENCODER_FILE,
    ROUTER_DEFAULTS,
    UNUSED_KEYS,
    attention_layers,
    check_keys,
    convert,
    expected_shapes,
    find_source,
    map_layers,
    read_state_dict,
    write,
)
from mixture_core.moa import RouterConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m training.convert_fastcomposer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="FastComposer's pytorch_model.bin (or a folder holding it, or a .safetensors copy)")
    p.add_argument("--out", help="the MoA file to write (models/moa/....safetensors)")
    p.add_argument(
        "--clip-vision-out",
        help="also write FastComposer's image encoder as a clip_vision file "
        "(models/clip_vision/....safetensors); MoA Subject Inject needs it",
    )
    p.add_argument(
        "--router",
        choices=("attention", "constant"),
        default="attention",
        help="attention: per pixel from the subject tokens' cross-attention maps (default); "
        "constant: --share everywhere",
    )
    p.add_argument(
        "--share", type=float, default=ROUTER_DEFAULTS["share"], help="the constant router's personal share (0..1)"
    )
    p.add_argument(
        "--quantile",
        type=float,
        default=ROUTER_DEFAULTS["quantile"],
        help="the attention router's normalizing quantile",
    )
    p.add_argument(
        "--prior-steps",
        type=float,
        default=ROUTER_DEFAULTS["prior_steps"],
        help="fraction of sampling run by the prior alone (FastComposer delays the subject: 10 of 50 steps)",
    )
    p.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="dtype of the written tensors")
    args = p.parse_args(argv)
    if not args.out and not args.clip_vision_out:
        p.error("give --out (the MoA file), --clip-vision-out (the image encoder) or both")
    for name in ("out", "clip_vision_out"):
        value = getattr(args, name)
        if value and not value.endswith(".safetensors"):
            p.error(f"--{name.replace('_', '-')} must be a .safetensors file, not {value}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        router = RouterConfig(
            args.router,
            share=args.share,
            quantile=args.quantile,
            prior_steps=args.prior_steps,
            map_layers=map_layers() if args.router == "attention" else (),
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        source = find_source(args.source)
        state = read_state_dict(source)
        moa, vision = convert(state, router, torch.float16 if args.dtype == "fp16" else torch.float32, source)
    except WeightFileError as e:
        raise SystemExit(f"error: {e}") from None
    fingerprint = write(moa, vision, args.out, args.clip_vision_out, source.name)
    expected = expected_shapes()
    unused = sorted({k.split(".")[0] for k in state if k not in expected and k not in UNUSED_KEYS})
    if args.out:
        print(
            f"wrote {args.out}: {len(moa.layer_ids)} MoA layers, FastComposer fusion, {router.kind} router "
            f"(image encoder fingerprint {fingerprint})"
        )
    if args.clip_vision_out:
        print(
            f"wrote {args.clip_vision_out}: FastComposer's CLIP ViT-L/14 image encoder ({len(vision)} tensors, "
            f"fingerprint {fingerprint})"
        )
    else:
        print(
            f"note: MoA Subject Inject needs FastComposer's image encoder too; write it with --clip-vision-out "
            f"models/clip_vision/{DEFAULT_ENCODER_FILE}"
        )
    print(f"not used (as intended): the rest of {', '.join(unused) or 'nothing'} (see --help)")


if __name__ == "__main__":
    main()

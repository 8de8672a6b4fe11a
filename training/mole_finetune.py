"""MoLE stage 1: fine-tune the whole UNet on the human-centric data set.

All UNet weights (or those whose names match --trainable) learn the noise-prediction loss,
with AdamW or Lion and optional Min-SNR weighting; the CLIP text encoder and the VAE stay
frozen. The result is a single-file checkpoint in the layout ComfyUI's Load Checkpoint reads:
the input checkpoint with its UNet tensors (model.diffusion_model.*) replaced, every other
tensor (text encoder, VAE, schedule buffers) copied unchanged.

    python -m training.mole_finetune --checkpoint sd15.safetensors --data people/ \\
        --output models/checkpoints/mole_sd15_stage1.safetensors --steps 300000 --lr 2e-6 \\
        --optimizer lion --min-snr-gamma 5 --batch-size 8 --grad-accum 8 --mixed-precision bf16 --gradient-checkpointing
    accelerate launch -m training.mole_finetune ...   (same arguments)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch training/mole_finetune.py)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here] + [str(_here.parent)]
    __package__ = "training"

import torch

from training import common

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = common.base_parser(
        __doc__.split("\n\n")[0],
        epilog="Paper settings (MoLE stage 1): Lion, lr 2e-6, batch 64, 300k steps, Min-SNR gamma 5.",
    )
    g = p.add_argument_group("fine-tune")
    g.add_argument("--trainable", default=None, metavar="REGEX",
                   help="train only the UNet parameters whose names (ComfyUI/SAI naming, such as output_blocks.11.1.proj_out.weight) "
                   "match this regular expression (re.search); default: all of them")
    g.add_argument("--save-dtype", choices=tuple(SAVE_DTYPES), default="fp16", help="dtype of the UNet tensors written (default fp16)")
    args = p.parse_args(argv)
    common.check_args(args)
    if args.trainable is not None:
        try:
            re.compile(args.trainable)
        except re.error as e:
            raise SystemExit(f"error: --trainable is not a regular expression: {e}") from e
    return args


def select_trainable(unet: torch.nn.Module, pattern: str | None) -> dict[str, torch.nn.Parameter]:
    trainable = {}
    for name, p in unet.named_parameters():
        wanted = p.is_floating_point() and (pattern is None or re.search(pattern, name) is not None)
        p.requires_grad_(wanted)
        if wanted:
            trainable[name] = p
    if not trainable:
        raise SystemExit(f"error: --trainable {pattern!r} matches no UNet parameter (names look like output_blocks.11.1.proj_out.weight)")
    return trainable


def write_checkpoint(path, source_path, base: common.Base, unet, dtype, metadata: dict) -> None:
    """The source checkpoint with its UNet tensors replaced by `unet`'s (ComfyUI's own key
    layout for saving: model_config.process_unet_state_dict_for_saving), everything else copied."""
    import comfy.utils
    from safetensors import safe_open

    unet_sd = base.model_patcher.model.model_config.process_unet_state_dict_for_saving(
        {k: v.detach().to(dtype).contiguous().cpu() for k, v in unet.state_dict().items()}
    )
    out = {}
    with safe_open(source_path, framework="pt", device="cpu") as f:
        source_meta = dict(f.metadata() or {})
        for key in f.keys():
            if key not in unet_sd and not key.startswith("model.diffusion_model."):
                out[key] = f.get_tensor(key)
    missing = [k for k in unet_sd if not k.startswith("model.diffusion_model.")]
    if missing:
        raise RuntimeError(f"unexpected UNet keys for saving: {missing[:3]}")
    out.update(unet_sd)
    comfy.utils.save_torch_file(out, str(path), metadata={**source_meta, **metadata})


def main(argv=None) -> common.Result:
    args = parse_args(argv)
    accelerator = common.make_accelerator(args)
    samples = common.scan_data(args)
    with common.host_session():
        base = common.load_base(args.checkpoint)
        if not str(args.checkpoint).endswith(".safetensors"):
            raise SystemExit("error: --checkpoint must be a .safetensors file (its non-UNet tensors are copied into the output)")
        unet = base.unet
        trainable = select_trainable(unet, args.trainable)
        common.cast_frozen(unet, common.weight_dtype(args))
        if args.gradient_checkpointing:
            common.enable_gradient_checkpointing(unet)
        save_dtype = SAVE_DTYPES[args.save_dtype]

        def write_output(path, step):
            write_checkpoint(path, args.checkpoint, base, unet, save_dtype, {
                "mole.stage": "finetune",
                "mole.trained_steps": str(step),
                "mole.base_family": base.family,
                "mole.source_checkpoint": Path(args.checkpoint).name,
                "mole.training_args": json.dumps({k: v for k, v in vars(args).items() if k not in ("data", "checkpoint", "output", "work_dir")}, default=str),
            })

        stage = common.Stage("finetune", unet, trainable, write_output)
        result = common.train(args, accelerator, base, stage, samples)
    common.end_accelerator(accelerator)
    return result


if __name__ == "__main__":
    main()

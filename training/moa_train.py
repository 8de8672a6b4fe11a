"""MoA: train the personalized attentions, the routers, the multimodal fusion and the last
layers of the image encoder.

The prior (the checkpoint's UNet, its CLIP, its VAE) stays frozen. Every attention layer mixes
its prior output with the personalized attention through its router, with each subject's image
embedding fused into its caption word: the core's pieces MoA Subject Inject's patch calls at
inference (mixture_core.moa: MoAModel.bind, MoALayer.forward, MoALayer.subject_attention; the
training patch is training.moa_forward, tests/training/test_moa_one.py finds both the same). The image encoder is CLIP ViT-L/14 with its last K layers trained
(``--train-image-encoder-layers``, FastComposer's ``--image_encoder_trainable_layers 2``; the
paper: "the learned image encoder", Sec. 3.4). The objective (paper Sec. 3.3, training.moa_losses):

    L = masked reconstruction (FastComposer's mse(pred * M, noise * M), M the subjects' union)
      + router_weight * || (1 - M) * (1 - mean_l R0_l) ||^2   (22 of SD1.5's 32 layers, Sec. 3.3.1)
      + localization_weight * FastComposer's balanced L1 on the subject tokens' cross-attention
                                                              (11 attn2 layers, FastComposer's)

A batch is one UNet call: each sample has its own subjects (0 to 4), padded; the VAE and the
image encoder each see the whole batch at once. Subject bindings travel with the call (in
transformer_options), so gradient checkpointing can recompute any block. Condition drop 10%,
subject drop 10%, timesteps up to 800 (paper Tab. 1; FastComposer). The personalized
attentions start as copies of the prior's (MoAModel.from_prior). Writes the pack's MoA file and,
with a trained encoder, a clip_vision file beside it that the MoA file names.

    python -m training.moa_data --data ffhq_wild_files/        # check the data first
    python -m training.moa_train --checkpoint sd15.safetensors --clip-vision clip_vit_large_patch14.safetensors \\
        --data ffhq_wild_files/ --output models/moa/moa_sd15.safetensors --steps 40000 --lr 1e-5 \\
        --batch-size 8 --grad-accum 4 --mixed-precision bf16 --gradient-checkpointing
    accelerate launch --multi_gpu --num_processes 4 -m training.moa_train ...   (same arguments)
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch training/moa_train.py)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here] + [str(_here.parent)]
    __package__ = "training"

import torch

from training import (
    accelerate_setup,
    base_model,
    cli,
    grad_checkpoint,
    host,
    loop,
    moa_checks,
    moa_data,
    moa_encoder,
    moa_forward,
    moa_losses,
    moa_samples,
)


def parse_args(argv=None):
    p = cli.base_parser(
        __doc__.split("\n\n")[0],
        data_help="MoA data folder: FastComposer's FFHQ-wild layout (image_ids_train.txt, per id .jpg, .json, .npy) "
        "or a metadata.jsonl with subjects and their masks; check it with python -m training.moa_data",
        caption_pipeline=False,
        diffusion_loss=False,
        samples=False,
        epilog="Paper settings (MoA, Sec. 4.1 and Tab. 1): lr 1e-5 in the text, 5e-5 in Tab. 1; batch 128 "
        "(4 GPUs x 32), 40k steps, router and localization weights 1e-4, 10%% condition drop, timesteps up to 800. "
        "See training/README.md.",
    )
    g = p.add_argument_group("MoA")
    g.add_argument(
        "--clip-vision", required=True, help="CLIP ViT-L/14 vision model (.safetensors), as Load CLIP Vision reads it"
    )
    g.add_argument(
        "--train-image-encoder-layers",
        type=int,
        default=2,
        help="train the last K of the image encoder's 24 layers (FastComposer: 2; 0 keeps it frozen)",
    )
    g.add_argument("--router-loss-weight", type=float, default=1e-4)
    g.add_argument("--localization-loss-weight", type=float, default=1e-4)
    g.add_argument(
        "--router-excluded-blocks",
        default=",".join(moa_losses.ROUTER_EXCLUDED_BLOCKS),
        help="diffusers UNet blocks left out of the router loss (paper Sec. 3.3.1: the first and last; '' for none)",
    )
    g.add_argument(
        "--localization-blocks",
        default=",".join(moa_losses.LOCALIZATION_BLOCKS),
        help="diffusers UNet blocks whose cross-attention the localization loss reads (FastComposer's 5 middle blocks)",
    )
    g.add_argument(
        "--cond-drop",
        type=float,
        default=moa_samples.CONDITION_DROP,
        help="share of samples trained without caption and subjects",
    )
    g.add_argument(
        "--subject-drop",
        type=float,
        default=moa_samples.SUBJECT_DROP,
        help="chance that each subject is left unbound (its word stays plain text): FastComposer's 1 - appear prob",
    )
    g.add_argument(
        "--max-subjects",
        type=int,
        default=moa_samples.MAX_SUBJECTS,
        help="subjects bound per image at most (a random choice of more)",
    )
    g.add_argument(
        "--object-types",
        default=",".join(moa_data.OBJECT_TYPES),
        help="FastComposer-layout segments kept as subjects, by coco_label (comma-separated), or 'all'",
    )
    g.add_argument(
        "--no-subject-augmentation",
        dest="subject_augmentation",
        action="store_false",
        help="subject images without FastComposer's augmentations (zoom, rotation, colour, blur, gray, flip, elastic)",
    )
    g.add_argument("--max-timestep", type=int, default=800, help="timesteps are drawn from 0..this (of 0..999)")
    g.add_argument(
        "--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="dtype of the written files' tensors"
    )
    args = p.parse_args(argv)
    cli.check_args(args)
    if not 0 < args.max_timestep <= 999:
        raise SystemExit(f"error: --max-timestep must be in 1..999, not {args.max_timestep}")
    for name in ("cond_drop", "subject_drop"):
        if not 0 <= getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be in [0, 1), not {getattr(args, name)}")
    if not 0 <= args.train_image_encoder_layers <= moa_checks.VIT_L14_LAYERS:
        raise SystemExit(
            f"error: --train-image-encoder-layers must be in 0..{moa_checks.VIT_L14_LAYERS}, not {args.train_image_encoder_layers}"
        )
    if args.max_subjects < 1:
        raise SystemExit(f"error: --max-subjects must be at least 1, not {args.max_subjects}")
    try:
        args.object_types = moa_data.parse_object_types(args.object_types)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return args


def main(argv=None) -> loop.Result:
    from training.data import DataError

    args = parse_args(argv)
    moa_checks.check_files(args)
    report = moa_data.ScanReport()
    try:
        samples = moa_data.scan_moa_dataset(args.data, args.object_types, report)
    except DataError as e:
        raise SystemExit(f"error: bad training data: {e}") from e
    accelerator = accelerate_setup.make_accelerator(
        args, find_unused_parameters=True
    )  # batches without subjects leave the fusion unused
    for line in report.lines():
        loop.log.info("MoA data: %s", line)
    with host.host_session():
        from mixture_core.moa import MoAModel, prior_weights
        from mixture_core.moa_files import save_moa_file, vision_encoder_fingerprint

        base = base_model.load_base(args.checkpoint)
        import comfy.clip_vision

        if base.family != "sd15":
            raise SystemExit(f"error: {args.checkpoint}: MoA trains on SD1.5 checkpoints, this one is {base.family}")
        clip_vision = comfy.clip_vision.load(args.clip_vision)
        if clip_vision is None:
            raise SystemExit(f"error: {args.clip_vision} is not a CLIP vision model ComfyUI can load")
        moa_host = importlib.import_module(f"{host.import_pack().__name__}.nodes.moa_host")
        moa_host.check_clip_vision(clip_vision, 768)
        moa_patch = importlib.import_module(f"{host.import_pack().__name__}.nodes.moa_patch")

        # The personalized attentions start as the checkpoint's own weights, read before the
        # frozen UNet is cast to --mixed-precision's storage dtype.
        moa = MoAModel.from_prior(prior_weights(base.unet)).float()
        base_model.freeze(base.unet)
        base_model.cast_frozen(base.unet, cli.weight_dtype(args))
        if args.gradient_checkpointing:
            grad_checkpoint.enable_gradient_checkpointing(base.unet)
        encoder_model = clip_vision.model
        encoder_layers = moa_encoder.prepare(encoder_model, args.train_image_encoder_layers)
        router_ids = moa_losses.router_layers(
            moa.layer_ids, _blocks(args.router_excluded_blocks, moa, "--router-excluded-blocks")
        )
        localization_ids = moa_losses.localization_layers(
            moa.layer_ids, _blocks(args.localization_blocks, moa, "--localization-blocks")
        )
        loop.log.info(
            "MoA: router loss on %d of %d layers: %s", len(router_ids), len(moa.layer_ids), ", ".join(router_ids)
        )
        loop.log.info(
            "MoA: localization loss on %d cross-attention layers: %s",
            len(localization_ids),
            ", ".join(localization_ids),
        )
        loop.log.info("MoA: image encoder layers trained: %s", encoder_layers or "none (frozen)")
        locations = moa_patch.block_locations(moa_patch.attention_modules(base.model_patcher))
        patch = moa_forward.TrainingPatch(moa, locations, router_ids, localization_ids)
        stage_model = moa_forward.MoATraining(args, base, moa, clip_vision, patch)
        trainable = {f"moa.{n}": p for n, p in moa.named_parameters()}
        trainable |= {f"image_encoder.{n}": p for n, p in encoder_model.named_parameters() if p.requires_grad}

        def data(args, accelerator, start_micro):
            from training.data import StreamSampler

            draws = moa_samples.Draws(
                max_subjects=args.max_subjects,
                subject_drop=args.subject_drop,
                condition_drop=args.cond_drop,
                augment=args.subject_augmentation,
            )
            sampler = StreamSampler(
                len(samples),
                args.batch_size,
                args.seed,
                accelerator.process_index,
                accelerator.num_processes,
                start_micro,
            )
            return torch.utils.data.DataLoader(
                moa_samples.MoADataset(samples, args.resolution, draws, args.seed),
                batch_sampler=sampler,
                collate_fn=moa_samples.collate_list,
                num_workers=args.num_workers,
            )

        def write_output(path, step):
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.save_dtype]
            extra = {
                "moa.trained_steps": str(step),
                "moa.source_checkpoint": Path(args.checkpoint).name,
                "moa.router_loss_layers": json.dumps(router_ids),
                "moa.localization_loss_layers": json.dumps(localization_ids),
                "moa.training_args": json.dumps(
                    {k: v for k, v in vars(args).items() if k not in ("data", "checkpoint", "output", "work_dir")},
                    default=str,
                ),
            }
            if encoder_layers:
                encoder_file = moa_encoder.image_encoder_path(path)
                state = moa_encoder.write_image_encoder(encoder_file, encoder_model, dtype)
                extra |= {
                    "moa.image_encoder_file": encoder_file.name,
                    "moa.image_encoder_fingerprint": vision_encoder_fingerprint(state, encoder_layers),
                    "moa.image_encoder_layers": ",".join(map(str, encoder_layers)),
                }
            save_moa_file(path, copy.deepcopy(moa).to(dtype), base.family, extra)

        stage = loop.Stage(
            "moa", stage_model, trainable, write_output, data=data, loss=lambda model, batch: model(batch)
        )
        result = loop.train(args, accelerator, base, stage, samples)
    accelerate_setup.end_accelerator(accelerator)
    return result


def _blocks(spec: str, moa, flag: str):
    try:
        return moa_losses.parse_blocks(spec, moa.layer_ids, flag)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()

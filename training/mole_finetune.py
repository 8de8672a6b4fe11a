"""MoLE stage 1: fine-tune the whole UNet on the human-centric data set.

All UNet weights (or those whose names match --trainable) learn the noise-prediction loss,
with AdamW or Lion and optional Min-SNR weighting; with --train-text-encoder the CLIP text
encoder learns too (captions are then encoded at every step); the VAE stays frozen. The result
is a single-file checkpoint in the layout ComfyUI's Load Checkpoint reads: the input checkpoint
with its UNet tensors (model.diffusion_model.*), and with --train-text-encoder its text encoder
tensors (cond_stage_model.*), replaced; every other tensor copied unchanged.

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

from training import accelerate_setup, base_model, checks, cli, datasets, encoding, grad_checkpoint, host, loop, losses


def parse_args(argv=None):
    p = cli.base_parser(
        __doc__.split("\n\n")[0],
        epilog="Paper settings (MoLE stage 1): Lion, lr 2e-6, batch 64, 300k steps, Min-SNR gamma 5.",
    )
    g = p.add_argument_group("fine-tune")
    g.add_argument(
        "--trainable",
        default=None,
        metavar="REGEX",
        help="train only the UNet parameters whose names (ComfyUI/SAI naming, such as output_blocks.11.1.proj_out.weight) "
        "match this regular expression (re.search); default: all of them",
    )
    g.add_argument(
        "--save-dtype",
        choices=tuple(cli.DTYPES),
        default="fp16",
        help="dtype of the UNet tensors written (default fp16)",
    )
    g.add_argument(
        "--train-text-encoder",
        action="store_true",
        help="train the CLIP text encoder with the UNet (captions are encoded at every step, not cached)",
    )
    args = p.parse_args(argv)
    cli.check_args(args)
    if args.train_text_encoder:
        args.cache = False  # the text encoder changes at every step
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
        raise SystemExit(
            f"error: --trainable {pattern!r} matches no UNet parameter (names look like output_blocks.11.1.proj_out.weight)"
        )
    return trainable


def write_checkpoint(path, source_path, base: base_model.Base, unet, dtype, metadata: dict, text_encoder=None) -> None:
    """The source checkpoint with its UNet tensors replaced by `unet`'s (ComfyUI's own key layout
    for saving: model_config.process_unet_state_dict_for_saving) and, given a text encoder, its
    text encoder tensors by that one's; everything else copied."""
    import comfy.utils
    from safetensors import safe_open

    unet_sd = base.model_patcher.model.model_config.process_unet_state_dict_for_saving(
        {k: v.detach().to(dtype).contiguous().cpu() for k, v in unet.state_dict().items()}
    )
    wrong = [k for k in unet_sd if not k.startswith("model.diffusion_model.")]
    if wrong:
        raise RuntimeError(f"unexpected UNet keys for saving: {wrong[:3]}")
    replaced = dict(unet_sd)
    with safe_open(source_path, framework="pt", device="cpu") as f:
        source_meta, known = dict(f.metadata() or {}), set(f.keys())
        if text_encoder is not None:
            text_sd = {
                k: v.detach().to(dtype).contiguous().cpu()
                for k, v in text_encoder_state_for_saving(text_encoder).items()
            }
            unknown = sorted(k for k in text_sd if k not in known)
            if unknown:
                raise RuntimeError(f"text encoder keys not in the source checkpoint: {unknown[:3]}")
            replaced.update(text_sd)
        out = {
            key: f.get_tensor(key)
            for key in known
            if key not in replaced and not key.startswith("model.diffusion_model.")
        }
    out.update(replaced)
    comfy.utils.save_torch_file(out, str(path), metadata={**source_meta, **metadata})


def trainable_text_encoder(base: base_model.Base):
    """The checkpoint's CLIP ViT-L/14 text encoder as a transformers CLIPTextModel holding the
    same weights (ComfyUI's own implementation adds residuals in place, which autograd cannot
    differentiate through); its last hidden state is the SD1.x conditioning."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if base.family != "sd15":
        raise SystemExit(
            "error: --train-text-encoder is supported for SD1.x checkpoints (one CLIP ViT-L/14 text encoder)"
        )
    prefix = "clip_l.transformer."
    state = {
        k[len(prefix) :]: v.float() for k, v in base.clip.cond_stage_model.state_dict().items() if k.startswith(prefix)
    }
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    vocab, width = state["text_model.embeddings.token_embedding.weight"].shape
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=len(layers),
        num_attention_heads=width // 64,
        intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu",
    )
    model = CLIPTextModel(config)
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 dropped the prefix
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise SystemExit(f"error: the checkpoint's text encoder lacks {missing[:3]}")
    return model.float().train()


def text_encoder_state_for_saving(text_encoder) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights under the SD1.x checkpoint's names (cond_stage_model.transformer.*)."""
    return {
        "cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
        for k, v in text_encoder.state_dict().items()
        if not k.endswith("position_ids")
    }


class UNetAndTextEncoder(torch.nn.Module):
    """Stage 1 with the text encoder: forward(batch) encodes the captions with gradients and
    returns the noise-prediction loss."""

    def __init__(self, args, base: base_model.Base, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = base.unet, text_encoder
        self.args, self.base = args, base
        self.encoder = encoding.Encoder(base, args.resolution)

    def token_ids(self, caption: str) -> torch.Tensor:
        chunks = self.base.clip.tokenize(caption)["l"]
        return torch.tensor([[t for t, _ in chunks[0]]])  # the first 77-token chunk, as SD1.x reads it

    def forward(self, batch) -> torch.Tensor:
        device = next(self.unet.parameters()).device
        latents = torch.cat(
            [self.encoder.latents(batch["pixels"][i : i + 1]) for i in range(len(batch["caption"]))]
        ).to(device)
        ids = torch.cat([self.token_ids(c) for c in batch["caption"]]).to(device)
        context = self.text_encoder(input_ids=ids).last_hidden_state
        noise, timesteps = losses.sample_noise(batch, latents, self.args.seed, self.args.fixed_noise)
        return losses.diffusion_loss(
            self.unet,
            latents,
            context,
            None,
            noise.to(device),
            timesteps.to(device),
            self.base.alphas_cumprod.to(device),
            self.args.min_snr_gamma,
            cli.weight_dtype(self.args),
        )


def with_text_encoder(args, base: base_model.Base, stage: loop.Stage, text_encoder) -> loop.Stage:
    trainable = dict(stage.trainable) | {f"text_encoder.{n}": p for n, p in text_encoder.named_parameters()}
    return loop.Stage(
        stage.name,
        UNetAndTextEncoder(args, base, text_encoder),
        trainable,
        stage.write_output,
        loss=lambda model, batch: model(batch),
    )


def main(argv=None) -> loop.Result:
    args = parse_args(argv)
    accelerator = accelerate_setup.make_accelerator(args)
    samples = datasets.scan_data(args)
    checks.require_family(args.checkpoint, ("sd15", "sdxl"))
    if args.train_text_encoder:
        checks.require_family(args.checkpoint, ("sd15",), "--checkpoint (with --train-text-encoder)")
    with host.host_session():
        base = base_model.load_base(args.checkpoint)
        if not str(args.checkpoint).endswith(".safetensors"):
            raise SystemExit(
                "error: --checkpoint must be a .safetensors file (its non-UNet tensors are copied into the output)"
            )
        unet = base.unet
        trainable = select_trainable(unet, args.trainable)
        base_model.cast_frozen(unet, cli.weight_dtype(args))
        if args.gradient_checkpointing:
            grad_checkpoint.enable_gradient_checkpointing(unet)
        save_dtype = cli.DTYPES[args.save_dtype]

        def write_output(path, step):
            write_checkpoint(
                path,
                args.checkpoint,
                base,
                unet,
                save_dtype,
                text_encoder=text_encoder,
                metadata={
                    "mole.stage": "finetune",
                    "mole.trained_steps": str(step),
                    "mole.base_family": base.family,
                    "mole.source_checkpoint": Path(args.checkpoint).name,
                    "mole.training_args": json.dumps(
                        {k: v for k, v in vars(args).items() if k not in ("data", "checkpoint", "output", "work_dir")},
                        default=str,
                    ),
                },
            )

        text_encoder = trainable_text_encoder(base) if args.train_text_encoder else None

        stage = loop.Stage("finetune", unet, trainable, write_output)
        if args.train_text_encoder:
            stage = with_text_encoder(args, base, stage, text_encoder)
        result = loop.train(args, accelerator, base, stage, samples)
    accelerate_setup.end_accelerator(accelerator)
    return result


if __name__ == "__main__":
    main()

"""MoA: train the personalized attentions, the routers, the multimodal fusion and the last
layers of the image encoder.

The prior (the checkpoint's UNet, its CLIP, its VAE) stays frozen. Every attention layer mixes
its prior output with the personalized attention through its router, exactly as MoA Subject
Inject does at inference (mixture_core.moa.MoALayer), with each subject's image embedding fused
into its caption word. The image encoder is CLIP ViT-L/14 with its last K layers trained
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
import types
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch training/moa_train.py)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here] + [str(_here.parent)]
    __package__ = "training"

import torch
import torch.nn.functional as F

from training import accelerate_setup, base_model, cli, encoding, grad_checkpoint, host, loop, moa_data, moa_losses

SD15_ATTN2_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
VIT_L14_KEYS = {  # transformers CLIPVisionModelWithProjection layout, as Load CLIP Vision reads it
    "vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14),
    "vision_model.embeddings.position_embedding.weight": (257, 1024),
    "vision_model.encoder.layers.23.layer_norm1.weight": (1024,),
    "visual_projection.weight": (768, 1024),
}
VIT_L14_LAYERS = 24


def parse_args(argv=None):
    p = cli.base_parser(
        __doc__.split("\n\n")[0],
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
        default=moa_data.CONDITION_DROP,
        help="share of samples trained without caption and subjects",
    )
    g.add_argument(
        "--subject-drop",
        type=float,
        default=moa_data.SUBJECT_DROP,
        help="chance that each subject is left unbound (its word stays plain text): FastComposer's 1 - appear prob",
    )
    g.add_argument(
        "--max-subjects",
        type=int,
        default=moa_data.MAX_SUBJECTS,
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
    p.set_defaults(cache=False)  # each sample has its own subjects: encoded per step
    args = p.parse_args(argv)
    cli.check_args(args)
    if not 0 < args.max_timestep <= 999:
        raise SystemExit(f"error: --max-timestep must be in 1..999, not {args.max_timestep}")
    for name in ("cond_drop", "subject_drop"):
        if not 0 <= getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be in [0, 1), not {getattr(args, name)}")
    if not 0 <= args.train_image_encoder_layers <= VIT_L14_LAYERS:
        raise SystemExit(
            f"error: --train-image-encoder-layers must be in 0..{VIT_L14_LAYERS}, not {args.train_image_encoder_layers}"
        )
    if args.max_subjects < 1:
        raise SystemExit(f"error: --max-subjects must be at least 1, not {args.max_subjects}")
    try:
        args.object_types = moa_data.parse_object_types(args.object_types)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return args


# ---- checks before any model loads ----------------------------------------------------------


def _header(path, flag: str):
    """{key: shape} of a .safetensors file, from its header only."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise SystemExit(f"error: {flag} {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise SystemExit(f"error: {flag} {path}: not a readable .safetensors file ({type(e).__name__}: {e})") from None


def check_files(args) -> None:
    """The checkpoint is SD1.5 and --clip-vision is CLIP ViT-L/14: read from the file headers,
    so a wrong file stops the run in a second, not after gigabytes have loaded."""
    if str(args.checkpoint).endswith(".safetensors"):
        shapes = _header(args.checkpoint, "--checkpoint")
        width = shapes.get(SD15_ATTN2_KEY, (0, 0))[1]
        if width != 768:
            family = (
                "SDXL"
                if any(k.startswith("conditioner.embedders.1.") for k in shapes)
                else "SD2.x (1024-wide text)"
                if width == 1024
                else "not an SD1.x UNet"
            )
            raise SystemExit(
                f"error: --checkpoint {args.checkpoint}: MoA trains on SD1.5 checkpoints (768-wide cross-attention); "
                f"this one is {family}"
            )
    shapes = _header(args.clip_vision, "--clip-vision")
    wrong = [f"{k} {shapes.get(k, 'missing')} (ViT-L/14: {v})" for k, v in VIT_L14_KEYS.items() if shapes.get(k) != v]
    if any(k.startswith(f"vision_model.encoder.layers.{VIT_L14_LAYERS}.") for k in shapes):
        wrong.append(f"more than {VIT_L14_LAYERS} layers")
    if wrong:
        hint = (
            " (OpenAI's original key names: convert it to the transformers layout, the file "
            "openai/clip-vit-large-patch14 ships)"
            if any(k.startswith("visual.") for k in shapes)
            else ""
        )
        raise SystemExit(
            f"error: --clip-vision {args.clip_vision}: MoA encodes subjects with CLIP ViT-L/14 "
            f"(transformers layout, 224 px, 768-wide projection); this file has {'; '.join(wrong)}{hint}"
        )


# ---- the forward pass with MoA, recording what the losses need -----------------------------


@dataclass
class Bindings:
    """The subjects of one batch, padded to n per sample: token_index (B, n), valid (B, n),
    embeds (B, n, D), timesteps (B,). A function of the batch only: a recomputed block sees
    exactly what the first pass saw."""

    token_index: torch.Tensor
    valid: torch.Tensor
    embeds: torch.Tensor
    timesteps: torch.Tensor

    def bind(self, context: torch.Tensor, fusion, layer_index: int) -> torch.Tensor:
        """context (B, S, C) with each valid subject's token replaced by its fused token."""
        rows, cols = self.valid.nonzero(as_tuple=True)
        if len(rows) == 0:
            return context
        tokens = self.token_index[rows, cols]
        fused = fusion(context[rows, tokens], self.embeds[rows, cols], self.timesteps[rows], layer_index)
        out = context.clone()
        out[rows, tokens] = fused.to(out.dtype)
        return out


@dataclass
class Record:
    """What one forward records for the losses. Closed once the losses are computed, so that a
    recomputation (gradient checkpointing) computes the same graph without recording twice."""

    router: list = field(default_factory=list)  # (B, T) prior weights of the router-loss layers
    attention: list = field(default_factory=list)  # (B, T, n) subject-token attention of the localization layers
    closed: bool = False


class TrainingPatch:
    """MoA on the training UNet through ComfyUI's attention list patches (as the node does).
    It holds no per-call state: each call brings (Bindings, Record) in transformer_options."""

    KEY = "moa_train"

    def __init__(self, moa, locations: dict, router_ids, localization_ids):
        self.moa = moa
        self.layers = {key: (moa[layer_id], moa.layer_index(layer_id), layer_id) for key, layer_id in locations.items()}
        self.router_ids, self.localization_ids = set(router_ids), set(localization_ids)

    def patches(self) -> dict:
        return {f"{attn}_patch": [self._keep(attn)] for attn in ("attn1", "attn2")} | {
            f"{attn}_output_patch": [self._mix(attn)] for attn in ("attn1", "attn2")
        }

    def _keep(self, attn):
        def patch(n, context, value, extra_options):
            extra_options[f"moa_train_{attn}"] = (n, context)
            return n, context, value

        return patch

    def _mix(self, attn):
        from mixture_core.moa import linear

        def patch(out, extra_options):
            h, context = extra_options.pop(f"moa_train_{attn}")
            block = extra_options.get("block")
            found = (
                None if block is None else self.layers.get((tuple(block), extra_options.get("block_index", 0), attn))
            )
            if found is None:
                return out
            layer, index, layer_id = found
            bindings, record = extra_options[self.KEY]
            if attn == "attn2":
                context = bindings.bind(context, self.moa.fusion, index)
            routes = layer.route(h)
            if layer_id in self.router_ids and not record.closed:
                record.router.append(routes[..., 0])
            mixed = out + routes[..., 1:] * (layer.personal(h, context if attn == "attn2" else None) - out)
            if layer_id in self.localization_ids and bindings.valid.any():
                q, k = linear(h, layer.to_q), linear(context.to(h.dtype), layer.to_k)
                q, k = (t.unflatten(-1, (layer.heads, -1)).transpose(1, 2) for t in (q, k))  # (B, heads, T, d)
                probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1).mean(1)  # (B, T, S)
                columns = bindings.token_index[:, None, :].expand(-1, probs.shape[1], -1)
                subject_attention = torch.gather(probs, 2, columns)  # also when recomputing: the same saved tensors
                if not record.closed:
                    record.attention.append(subject_attention)
            return mixed

        return patch


class MoATraining(torch.nn.Module):
    """The stage model: the frozen UNet, the trainable MoA weights and the image encoder (its
    last K layers trainable); forward(batch) is the loss of one batch in one UNet call."""

    def __init__(self, args, base: base_model.Base, moa, clip_vision, patch: TrainingPatch):
        super().__init__()
        self.unet, self.moa, self.image_encoder = base.unet, moa, clip_vision.model
        self.args, self.base, self.clip_vision, self.patch = args, base, clip_vision, patch
        self.encoder = encoding.Encoder(base, args.resolution)
        self.nodes = importlib.import_module(f"{host.import_pack().__name__}.nodes.moa_host")
        self.vocab, _, self.token_key = self.nodes.sd1_vocabulary(base.clip)
        self.last: dict[str, float] = {}

    def encode_subjects(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 224, 224, 3) subject images -> (N, 768) projected CLS, one encoder call, through
        ComfyUI's own CLIP preprocessing (as MoA Subject Inject encodes)."""
        import comfy.clip_model

        cv, device = self.clip_vision, next(self.moa.parameters()).device
        pixels = comfy.clip_model.clip_preprocess(
            images.to(device), size=cv.image_size, mean=cv.image_mean, std=cv.image_std
        )
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.args.train_image_encoder_layers > 0):
            return self.image_encoder(pixel_values=pixels, intermediate_output=-2)[2].float()

    def token_positions(self, caption: str, words: list[str]) -> list[int | None]:
        """Each subject word's token in the caption's first 77 tokens; None (left unbound) for
        one beyond them, as FastComposer truncates captions to 77 tokens."""
        from mixture_core.subjects import find_subject_tokens, parse_subject_words

        chunks = self.base.clip.tokenize(caption)[self.token_key]
        positions = []
        for word in words:
            try:
                positions.append(find_subject_tokens(self.vocab, chunks, parse_subject_words(word))[0])
            except ValueError:
                positions.append(None)
        return positions

    def forward(self, batch) -> torch.Tensor:
        args, items, device = self.args, batch["items"], next(self.moa.parameters()).device
        keys = (batch["index"] if args.fixed_noise else batch["position"]).tolist()
        latents = self.encoder.latents(torch.stack([i["pixels"] for i in items])).to(device)
        noise, timesteps = [], []
        for key in keys:  # per sample, from its key: the same draws at any batch size or resume point
            g = torch.Generator().manual_seed(
                (args.seed * 1_000_003 + key * 7 + (1 if args.fixed_noise else 0)) % (2**63)
            )
            timesteps.append(int(torch.randint(0, args.max_timestep + 1, (1,), generator=g)))
            noise.append(torch.randn(latents.shape[1:], generator=g))
        noise, timesteps = torch.stack(noise).to(device), torch.tensor(timesteps, device=device)
        context, y = self.encoder.conditioning([i["caption"] for i in items])
        context = context.to(device)

        n = max(len(i["words"]) for i in items)
        token_index = torch.zeros(len(items), n, dtype=torch.long)
        valid = torch.zeros(len(items), n, dtype=torch.bool)
        masks = torch.zeros(len(items), n, args.resolution, args.resolution)
        for b, item in enumerate(items):
            for j, position in enumerate(self.token_positions(item["caption"], item["words"])):
                if position is not None:
                    token_index[b, j], valid[b, j] = position, True
            masks[b, : len(item["words"])] = item["masks"]
        embeds = torch.zeros(len(items), n, self.moa.fusion.image_dim, device=device)
        if n:
            images = torch.cat([i["subject_images"] for i in items])
            counts = [len(i["words"]) for i in items]
            for b, e in enumerate(self.encode_subjects(images).split(counts)):
                embeds[b, : len(e)] = e
        bindings = Bindings(token_index.to(device), valid.to(device), embeds, timesteps.float())
        record = Record()

        a = self.base.alphas_cumprod.to(device)[timesteps].float()[:, None, None, None]
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = self.unet(
            noisy,
            timesteps=timesteps.float(),
            context=context,
            y=None if y is None else y.to(device),
            transformer_options={"patches": self.patch.patches(), TrainingPatch.KEY: (bindings, record)},
        )
        foreground = torch.stack([i["foreground"] for i in items]).to(device)
        reconstruction = moa_losses.masked_reconstruction(pred, noise, foreground)
        latent_foreground = F.interpolate(
            foreground[:, None], size=latents.shape[-2:], mode="bilinear", align_corners=False
        )[:, 0]
        router = moa_losses.router_loss(record.router, latent_foreground)
        loss = reconstruction + args.router_loss_weight * router
        self.last = {"reconstruction": float(reconstruction.detach()), "router": float(router.detach())}
        if record.attention:
            localization = moa_losses.localization_loss(record.attention, masks.to(device), bindings.valid)
            loss = loss + args.localization_loss_weight * localization
            self.last["localization"] = float(localization.detach())
        record.closed = True
        return loss


def out_of_place_clip_layer(self, x, mask=None, optimized_attention=None):
    """comfy.clip_model.CLIPLayer.forward without its in-place residual adds (x += ...), which
    autograd cannot differentiate through a trained layer."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def trainable_encoder_layers(clip_model, k: int) -> list[int]:
    n = len(clip_model.vision_model.encoder.layers)
    return list(range(n - k, n))


def write_image_encoder(path, clip_model, dtype) -> dict[str, torch.Tensor]:
    """The whole (partly trained) encoder as a clip_vision file in the transformers layout
    (vision_model.*, visual_projection.weight) that Load CLIP Vision reads."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in clip_model.state_dict().items()}
    save_file(state, str(path), {"moa.image_encoder": "clip-vit-l-14"})
    return state


def image_encoder_path(output) -> Path:
    output = Path(output)
    return output.with_name(output.stem + "_image_encoder.safetensors")


def main(argv=None) -> loop.Result:
    from training.data import DataError

    args = parse_args(argv)
    check_files(args)
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
        from mixture_core.moa import MoAModel
        from mixture_core.moa_files import save_moa_file, vision_encoder_fingerprint

        base = base_model.load_base(args.checkpoint)
        import comfy.clip_vision

        if base.family != "sd15":
            raise SystemExit(f"error: {args.checkpoint}: MoA trains on SD1.5 checkpoints, this one is {base.family}")
        clip_vision = comfy.clip_vision.load(args.clip_vision)
        if clip_vision is None:
            raise SystemExit(f"error: {args.clip_vision} is not a CLIP vision model ComfyUI can load")
        nodes = importlib.import_module(f"{host.import_pack().__name__}.nodes.moa_host")
        nodes.check_clip_vision(clip_vision, 768)
        moa_patch = importlib.import_module(f"{host.import_pack().__name__}.nodes.moa_patch")

        base_model.freeze(base.unet)
        base_model.cast_frozen(base.unet, cli.weight_dtype(args))
        if args.gradient_checkpointing:
            grad_checkpoint.enable_gradient_checkpointing(base.unet)
        encoder_model = clip_vision.model
        base_model.freeze(encoder_model)
        encoder_layers = trainable_encoder_layers(encoder_model, args.train_image_encoder_layers)
        for i in encoder_layers:  # FastComposer: requires_grad_(True) and float32 on the last K layers
            layer = encoder_model.vision_model.encoder.layers[i].float().requires_grad_(True)
            layer.forward = types.MethodType(out_of_place_clip_layer, layer)
        for module in encoder_model.modules():  # ComfyUI's per-call weight casts stay out of autograd's way
            if getattr(module, "comfy_cast_weights", False) and any(
                p.requires_grad for p in module.parameters(recurse=False)
            ):
                module.comfy_cast_weights = False

        moa = MoAModel.from_prior(prior_weights(base.unet)).float()
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
        patch = TrainingPatch(moa, locations, router_ids, localization_ids)
        stage_model = MoATraining(args, base, moa, clip_vision, patch)
        trainable = {f"moa.{n}": p for n, p in moa.named_parameters()}
        trainable |= {f"image_encoder.{n}": p for n, p in encoder_model.named_parameters() if p.requires_grad}

        def data(args, accelerator, start_micro):
            from training.data import StreamSampler

            draws = moa_data.Draws(
                args.object_types, args.max_subjects, args.subject_drop, args.cond_drop, args.subject_augmentation
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
                moa_data.MoADataset(samples, args.resolution, draws, args.seed),
                batch_sampler=sampler,
                collate_fn=moa_data.collate_list,
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
                encoder_file = image_encoder_path(path)
                state = write_image_encoder(encoder_file, encoder_model, dtype)
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


def prior_weights(unet: torch.nn.Module) -> dict[str, dict]:
    """The UNet's own attention weights, as MoAModel.from_prior takes them."""
    from mixture_core.moa import is_moa_target

    prior = {}
    for path, m in unet.named_modules():
        if is_moa_target(path) and hasattr(m, "to_q"):
            out = m.to_out[0]
            prior[path] = {
                "to_q": m.to_q.weight.detach().float().cpu(),
                "to_k": m.to_k.weight.detach().float().cpu(),
                "to_v": m.to_v.weight.detach().float().cpu(),
                "to_out": (out.weight.detach().float().cpu(), out.bias.detach().float().cpu()),
                "heads": m.heads,
            }
    return prior


if __name__ == "__main__":
    main()

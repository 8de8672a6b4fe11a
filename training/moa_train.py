"""MoA: train the personalized attentions, the routers and the multimodal fusion.

The prior (the checkpoint's UNet, its CLIP, its VAE) and the CLIP ViT-L/14 image encoder stay
frozen. Every attention layer mixes its prior output with the personalized attention through
its router, exactly as MoA Subject Inject does at inference (mixture_core.moa.MoALayer), with
each subject's image embedding fused into its caption word. The objective is

    L = masked noise MSE (subject pixels only)
      + router_weight * || (1 - M) * (1 - mean_l R0_l) ||^2      (background -> prior; all layers
                                                                  but the first and last blocks)
      + localization_weight * mean over subjects and cross-attention layers of
            mean(A_s on the background) - mean(A_s on the subject)  (FastComposer's balanced L1)

where M is the union of the subject masks, R0_l the prior's router weight in layer l and A_s the
personalized cross-attention map of subject s's token. The condition (caption and subjects) is
dropped for 10% of the samples and timesteps are drawn up to 800. The personalized attentions
start as copies of the prior's (MoAModel.from_prior). Writes the pack's MoA file.

    python -m training.moa_train --checkpoint sd15.safetensors --clip-vision clip_vit_large_patch14.safetensors \\
        --data ffhq_fastcomposer/ --output models/moa/moa_sd15.safetensors --steps 40000 --lr 1e-5 \\
        --batch-size 8 --grad-accum 4 --mixed-precision bf16 --gradient-checkpointing
    accelerate launch --multi_gpu --num_processes 4 -m training.moa_train ...   (same arguments)
"""

from __future__ import annotations

import copy
import importlib
import json
import random
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (accelerate launch training/moa_train.py)
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here] + [str(_here.parent)]
    __package__ = "training"

import torch
import torch.nn.functional as F

from training import common


def parse_args(argv=None):
    p = common.base_parser(
        __doc__.split("\n\n")[0],
        epilog="Paper settings (MoA): lr 1e-5, batch 128 (4 GPUs), 40k steps, router and localization weights 1e-4, "
        "10%% condition drop, timesteps up to 800.",
    )
    g = p.add_argument_group("MoA")
    g.add_argument("--clip-vision", required=True, help="CLIP ViT-L/14 vision model (.safetensors), as Load CLIP Vision reads it")
    g.add_argument("--router-loss-weight", type=float, default=1e-4)
    g.add_argument("--localization-loss-weight", type=float, default=1e-4)
    g.add_argument("--cond-drop", type=float, default=0.1, help="share of samples trained without caption and subjects")
    g.add_argument("--max-timestep", type=int, default=800, help="timesteps are drawn from 0..this (of 0..999)")
    g.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="dtype of the MoA file's tensors")
    p.set_defaults(cache=False)  # each sample has its own subjects: encoded per step
    args = p.parse_args(argv)
    common.check_args(args)
    if not 0 < args.max_timestep <= 999:
        raise SystemExit(f"error: --max-timestep must be in 1..999, not {args.max_timestep}")
    if not 0 <= args.cond_drop < 1:
        raise SystemExit(f"error: --cond-drop must be in [0, 1), not {args.cond_drop}")
    return args


def prior_weights(unet: torch.nn.Module) -> dict[str, dict]:
    """The UNet's own attention weights, as MoAModel.from_prior takes them."""
    from mixture_core.moa import is_moa_target

    prior = {}
    for path, m in unet.named_modules():
        if is_moa_target(path) and hasattr(m, "to_q"):
            out = m.to_out[0]
            prior[path] = {"to_q": m.to_q.weight.detach().float().cpu(), "to_k": m.to_k.weight.detach().float().cpu(),
                           "to_v": m.to_v.weight.detach().float().cpu(),
                           "to_out": (out.weight.detach().float().cpu(), out.bias.detach().float().cpu()), "heads": m.heads}
    return prior


def router_layers(layer_ids: list[str]) -> set[str]:
    """The layers the router loss covers: all but those of the first and the last UNet block
    holding attention (the issue's "except the first and last blocks")."""
    def block(layer_id):
        return ".".join(layer_id.split(".")[:2])

    blocks = [block(i) for i in layer_ids]
    return {i for i, b in zip(layer_ids, blocks) if b not in (blocks[0], blocks[-1])}


# ---- the forward pass with MoA, recording what the losses need -----------------------------


class TrainingPatch:
    """MoA on the training UNet through ComfyUI's attention list patches (as the node does),
    keeping each layer's router weights and the personalized cross-attention maps of the
    subject tokens for the losses."""

    def __init__(self, moa, locations: dict):
        self.moa = moa
        self.layers = {key: (moa[layer_id], moa.layer_index(layer_id), layer_id) for key, layer_id in locations.items()}
        self.begin([], None, torch.ones(1, dtype=torch.bool))

    def begin(self, bindings, timesteps, is_cond) -> None:
        self.bindings, self.timesteps, self.is_cond = bindings, timesteps, is_cond
        self.router: list[tuple[str, torch.Tensor]] = []  # (layer id, R0 (B, T))
        self.attention: list[torch.Tensor] = []  # (B, T, n subjects)

    def patches(self) -> dict:
        return {f"{attn}_patch": [self._keep(attn)] for attn in ("attn1", "attn2")} | {
            f"{attn}_output_patch": [self._mix(attn)] for attn in ("attn1", "attn2")}

    def _find(self, extra_options, attn):
        block = extra_options.get("block")
        return None if block is None else self.layers.get((tuple(block), extra_options.get("block_index", 0), attn))

    def _keep(self, attn):
        def patch(n, context, value, extra_options):
            extra_options[f"moa_train_{attn}"] = (n, context)
            return n, context, value
        return patch

    def _mix(self, attn):
        from mixture_core.moa import bind_subjects_where, linear

        def patch(out, extra_options):
            h, context = extra_options.pop(f"moa_train_{attn}")
            found = self._find(extra_options, attn)
            if found is None:
                return out
            layer, index, layer_id = found
            if attn == "attn2" and self.bindings:
                context = bind_subjects_where(context, self.is_cond, self.bindings, self.moa.fusion, self.timesteps, index)
            routes = layer.route(h)
            self.router.append((layer_id, routes[..., 0]))
            mixed = out + routes[..., 1:] * (layer.personal(h, context if attn == "attn2" else None) - out)
            if attn == "attn2" and self.bindings:
                q, k = linear(h, layer.to_q), linear(context.to(h.dtype), layer.to_k)
                heads = layer.heads
                q, k = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k))  # (B, heads, T, d)
                probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1).mean(1)  # (B, T, 77)
                self.attention.append(probs[..., [b.token_index for b in self.bindings]])
            return mixed
        return patch


def resized_maps(per_token: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, T, ...) per-pixel values of a UNet level -> (B, ..., h, w) at `size` (bilinear)."""
    from mixture_core.recording import token_grid

    grid = token_grid(per_token.shape[1], *size)
    maps = per_token.unflatten(1, grid).movedim((1, 2), (-2, -1))
    lead = maps.shape[:-2]
    return F.interpolate(maps.reshape(-1, 1, *grid).float(), size=size, mode="bilinear", align_corners=False).reshape(*lead, *size)


def router_loss(router: list, masks: torch.Tensor, included: set[str]) -> torch.Tensor:
    """|| (1 - M) * (1 - mean_l R0_l) ||^2 (mean over pixels): background pixels to the prior.
    masks (n, h, w) at the latent size."""
    size = tuple(masks.shape[-2:])
    maps = [resized_maps(r0, size) for layer_id, r0 in router if layer_id in included]
    prior = torch.stack(maps).mean(0)  # (B, h, w)
    background = 1 - masks.amax(0)
    return ((background * (1 - prior)) ** 2).mean()


def localization_loss(attention: list, masks: torch.Tensor) -> torch.Tensor:
    """FastComposer's balanced L1: for each subject token's cross-attention map, its mean on the
    background minus its mean on the subject, averaged over subjects and layers."""
    losses = []
    for probs in attention:  # (B, T, n)
        from mixture_core.recording import token_grid

        grid = token_grid(probs.shape[1], *masks.shape[-2:])
        a = probs.unflatten(1, grid).movedim(-1, 1).float()  # (B, n, gh, gw)
        m = F.adaptive_avg_pool2d(masks[None].float(), grid) if grid != tuple(masks.shape[-2:]) else masks[None].float()
        fg = (a * m).sum((-1, -2)) / m.sum((-1, -2)).clamp_min(1e-6)
        bg = (a * (1 - m)).sum((-1, -2)) / (1 - m).sum((-1, -2)).clamp_min(1e-6)
        losses.append((bg - fg).mean())
    return torch.stack(losses).mean()


class MoATraining(torch.nn.Module):
    """The stage model: the frozen UNet and the trainable MoA weights; forward(batch) is the loss."""

    def __init__(self, args, base: common.Base, moa, clip_vision, patch: TrainingPatch, included: set[str]):
        super().__init__()
        self.unet, self.moa = base.unet, moa
        self.args, self.base, self.clip_vision, self.patch, self.included = args, base, clip_vision, patch, included
        self.encoder = common.Encoder(base, args.resolution)
        nodes = importlib.import_module(f"{common.import_pack().__name__}.nodes.moa_nodes")
        self.nodes = nodes
        self.vocab, _, self.token_key = nodes.sd1_vocabulary(base.clip)
        self.last: dict[str, float] = {}

    def forward(self, batch) -> torch.Tensor:
        parts = [self.sample_loss(item, key) for item, key in zip(batch["items"], (batch["index"] if self.args.fixed_noise else batch["position"]).tolist())]
        return torch.stack(parts).mean()

    def sample_loss(self, item: dict, key: int) -> torch.Tensor:
        from mixture_core.moa import SubjectBinding
        from mixture_core.subjects import find_subject_tokens, parse_subject_words

        args, device = self.args, next(self.moa.parameters()).device
        g = torch.Generator().manual_seed((args.seed * 1_000_003 + key * 7 + (1 if args.fixed_noise else 0)) % (2**63))
        latents = self.encoder.latents(item["pixels"][None]).to(device)
        t = int(torch.randint(0, args.max_timestep + 1, (1,), generator=g))
        noise = torch.randn(latents.shape, generator=g).to(device)
        drop = random.Random(args.seed * 31 + key).random() < args.cond_drop
        caption = "" if drop else item["caption"]
        context = self.encoder.text(caption)[0].to(device)
        bindings = []
        if not drop:
            subjects = parse_subject_words(", ".join(item["words"]))
            positions = find_subject_tokens(self.vocab, self.base.clip.tokenize(caption)[self.token_key], subjects)
            images = self.nodes.encode_subject_images(self.clip_vision, [(w, im) for w, im in zip(item["words"], item["subject_images"])])
            bindings = [SubjectBinding(p, images[i].to(device)) for i, p in enumerate(positions)]
        timesteps = torch.tensor([t], device=device)
        self.patch.begin(bindings, timesteps.float(), torch.tensor([not drop], device=device))
        a = self.base.alphas_cumprod.to(device)[t].float()
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = self.unet(noisy, timesteps=timesteps.float(), context=context, y=None,
                         transformer_options={"patches": self.patch.patches()})
        masks = F.adaptive_avg_pool2d(item["masks"][None].to(device), latents.shape[-2:])[0]  # (n, h, w), soft edges
        foreground = masks.amax(0)
        reconstruction = ((pred.float() - noise.float()) ** 2 * foreground).sum() / (foreground.sum() * latents.shape[1]).clamp_min(1e-6)
        router = router_loss(self.patch.router, masks, self.included)
        loss = reconstruction + args.router_loss_weight * router
        self.last = {"reconstruction": float(reconstruction.detach()), "router": float(router.detach())}
        if bindings:
            localization = localization_loss(self.patch.attention, masks)
            loss = loss + args.localization_loss_weight * localization
            self.last["localization"] = float(localization.detach())
        self.patch.begin([], None, torch.ones(1, dtype=torch.bool))  # drop the recorded tensors
        return loss


def main(argv=None) -> common.Result:
    from training.moa_data import DataError, MoADataset, collate_list, scan_moa_dataset

    args = parse_args(argv)
    accelerator = common.make_accelerator(args, find_unused_parameters=True)  # cond-dropped samples leave the fusion unused
    try:
        samples = scan_moa_dataset(args.data)
    except DataError as e:
        raise SystemExit(f"error: bad training data: {e}") from e
    with common.host_session():
        from mixture_core.moa import MoAModel
        from mixture_core.moa_files import save_moa_file

        base = common.load_base(args.checkpoint)
        import comfy.clip_vision

        if base.family != "sd15":
            raise SystemExit(f"error: {args.checkpoint}: MoA trains on SD1.5 checkpoints, this one is {base.family}")
        clip_vision = comfy.clip_vision.load(args.clip_vision)
        if clip_vision is None:
            raise SystemExit(f"error: {args.clip_vision} is not a CLIP vision model ComfyUI can load")
        nodes = importlib.import_module(f"{common.import_pack().__name__}.nodes.moa_nodes")
        nodes.check_clip_vision(clip_vision, 768)
        moa_patch = importlib.import_module(f"{common.import_pack().__name__}.nodes.moa_patch")

        common.freeze(base.unet)
        common.cast_frozen(base.unet, common.weight_dtype(args))
        if args.gradient_checkpointing:
            common.enable_gradient_checkpointing(base.unet)
        moa = MoAModel.from_prior(prior_weights(base.unet)).float()
        locations = moa_patch.block_locations(moa_patch.attention_modules(base.model_patcher))
        stage_model = MoATraining(args, base, moa, clip_vision, TrainingPatch(moa, locations), router_layers(moa.layer_ids))
        trainable = {f"moa.{n}": p for n, p in moa.named_parameters()}

        def data(args, accelerator, start_micro):
            from training.data import StreamSampler

            sampler = StreamSampler(len(samples), args.batch_size, args.seed, accelerator.process_index, accelerator.num_processes, start_micro)
            return torch.utils.data.DataLoader(MoADataset(samples, args.resolution), batch_sampler=sampler, collate_fn=collate_list,
                                               num_workers=args.num_workers)

        def write_output(path, step):
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.save_dtype]
            save_moa_file(path, copy.deepcopy(moa).to(dtype), base.family, {
                "moa.trained_steps": str(step),
                "moa.source_checkpoint": Path(args.checkpoint).name,
                "moa.training_args": json.dumps({k: v for k, v in vars(args).items() if k not in ("data", "checkpoint", "output", "work_dir")}, default=str),
            })

        stage = common.Stage("moa", stage_model, trainable, write_output, data=data, loss=lambda model, batch: model(batch))
        common.log.info("MoA: %d layers (%d in the router loss), %d images", len(moa.layer_ids), len(stage_model.included), len(samples))
        result = common.train(args, accelerator, base, stage, samples)
    common.end_accelerator(accelerator)
    return result


if __name__ == "__main__":
    main()

"""MoA training's forward pass: the stage model (frozen UNet, trainable MoA weights, the image
encoder) whose forward(batch) is the loss of one batch in one UNet call, and the attention
patches that mix MoA into that call and record what the losses read."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import base_model, cli, encoding, host, moa_encoder, moa_losses


@dataclass(frozen=True)
class Bindings:
    """The subjects of one batch (one UNet call), made once per call from the padded form: sample
    b's subject j at caption token token_index[b, j] where valid[b, j]. index: where they bind
    (mixture_core.moa.SubjectIndex), token_index (B, n) on the model's device for the subject
    attention, timesteps (B,). A function of the batch only: a recomputed block sees exactly what
    the first pass saw."""

    index: object  # mixture_core.moa.SubjectIndex
    token_index: torch.Tensor
    timesteps: torch.Tensor

    @classmethod
    def padded(cls, token_index: torch.Tensor, valid: torch.Tensor, embeds: torch.Tensor, timesteps: torch.Tensor):
        """token_index (B, n) long and valid (B, n) bool as built, on the CPU (read there once);
        embeds (B, n, image_dim) on the model's device, with their gradient."""
        from mixture_core.moa import SubjectIndex

        index = SubjectIndex.from_padded(token_index, valid, embeds)
        return cls(index, token_index.to(embeds.device, non_blocking=True), timesteps)


@dataclass
class Record:
    """What one forward records for the losses. Closed once the losses are computed, so that a
    recomputation (gradient checkpointing) computes the same graph without recording twice."""

    router: list = field(default_factory=list)  # (B, T) prior weights of the router-loss layers
    attention: list = field(default_factory=list)  # (B, T, n) subject-token attention of the localization layers
    closed: bool = False


class TrainingPatch:
    """MoA on the training UNet through ComfyUI's attention list patches, as MoA Subject Inject's
    patch (nodes/moa_patch) puts it on the sampled model, with the core's pieces that patch calls:
    MoAModel.bind (the subjects fused into the personalized branch's context), MoALayer.forward
    (router, mix; its observer gives the router loss R0) and MoALayer.subject_attention (what the
    localization loss reads). The personalized attention runs the core's kernel (torch's SDPA)
    rather than the host's. It holds no per-call state: each call brings (Bindings, Record) in
    transformer_options."""

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
        def patch(out, extra_options):
            h, context = extra_options.pop(f"moa_train_{attn}")
            block = extra_options.get("block")
            found = (
                None if block is None else self.layers.get((tuple(block), extra_options.get("block_index", 0), attn))
            )
            if found is None:
                return out
            layer, layer_index, layer_id = found
            bindings, record = extra_options[self.KEY]
            context = (
                self.moa.bind(context, bindings.index, bindings.timesteps, layer_index) if attn == "attn2" else None
            )

            def observer(prior_weight):  # a recomputation (gradient checkpointing) records nothing
                if layer_id in self.router_ids and not record.closed:
                    record.router.append(prior_weight)

            mixed = layer(h, out, context, observer=observer)
            if layer_id in self.localization_ids and not bindings.index.empty:
                maps = layer.subject_attention(h, context, bindings.token_index)  # also when recomputing
                if not record.closed:
                    record.attention.append(maps)
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
        moa_host = importlib.import_module(f"{host.import_pack().__name__}.nodes.moa_host")
        self.vocab, _, self.token_key = moa_host.sd1_vocabulary(base.clip)
        self.last: dict[str, float] = {}

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
            encoded = moa_encoder.encode_subjects(self.clip_vision, images, device, args.train_image_encoder_layers > 0)
            for b, e in enumerate(encoded.split(counts)):
                embeds[b, : len(e)] = e
        bindings = Bindings.padded(token_index, valid, embeds, timesteps.float())
        record = Record()

        a = self.base.alphas_cumprod.to(device)[timesteps].float()[:, None, None, None]
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = self.unet(
            # In the frozen weights' storage dtype, as ComfyUI's apply_model casts its input (the
            # UNet casts h back to it before the last GroupNorm, whose bf16 weight the CPU must match).
            noisy.to(cli.weight_dtype(args)),
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
            localization = moa_losses.localization_loss(record.attention, masks.to(device), valid.to(device))
            loss = loss + args.localization_loss_weight * localization
            self.last["localization"] = float(localization.detach())
        record.closed = True
        return loss

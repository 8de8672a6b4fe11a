"""MoA training's forward pass: the stage model (frozen UNet, trainable MoA weights, the image
encoder) whose forward(batch) is the loss of one batch in one UNet call, and the attention
patches that mix MoA into that call and record what the losses read."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import base_model, cli, encoding, host, moa_encoder, moa_losses


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
        self.nodes = importlib.import_module(f"{host.import_pack().__name__}.nodes.moa_nodes")
        self.vocab, _, self.token_key = self.nodes.sd1_vocabulary(base.clip)
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
        bindings = Bindings(token_index.to(device), valid.to(device), embeds, timesteps.float())
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
            localization = moa_losses.localization_loss(record.attention, masks.to(device), bindings.valid)
            loss = loss + args.localization_loss_weight * localization
            self.last["localization"] = float(localization.detach())
        record.closed = True
        return loss

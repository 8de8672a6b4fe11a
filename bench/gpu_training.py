"""bench.gpu's training rows: samples/s of one training step (forward + backward) at batch 1 and 4,
bf16 autocast with the frozen weights stored in bf16 and the trained ones in fp32 (as the
training scripts run with --mixed-precision bf16), without and with gradient checkpointing
(training/grad_checkpoint.py). The UNet side of each trainer, through the trainers' own pieces:

* MoLE stage 3 (training/mole_gates.build_gated_unet): the UNet with the two experts frozen and
  the gates trained, the plain noise-prediction loss;
* MoA (training/moa_train's TrainingPatch, Bindings, losses): MoA's layers trained on the
  frozen UNet, one subject bound per sample, reconstruction + router (+ localization) losses.
  The VAE and image encoder (cacheable, or a fixed cost per sample) are not in the step.
"""

from __future__ import annotations

import copy
import importlib
import statistics

import torch
import torch.nn.functional as F

from bench import bench_mole


def _moa_training_pieces():
    try:  # the training forward's own module (training/moa_forward.py), where it has one
        from training.moa_forward import Bindings, Record, TrainingPatch
    except ImportError:
        from training.moa_train import Bindings, Record, TrainingPatch
    return Bindings, Record, TrainingPatch


def prepare(unet, device):
    """Frozen, on the device; ComfyUI's per-call weight casts off (they would cut gradients:
    training/base_model.load_base does the same)."""
    from training import base_model

    unet = unet.to(device)
    base_model.freeze(unet)
    for module in unet.modules():
        if getattr(module, "comfy_cast_weights", False):
            module.comfy_cast_weights = False
    return unet


def mole_step(patcher, unet, rank, weights, device):
    """(trainable module, loss(batch inputs)) of MoLE stage 3 on `unet`."""
    from training import base_model, mole_gates

    base = base_model.Base("", patcher, None, None, unet, "sd15", torch.zeros(1000))
    model = mole_gates.build_gated_unet(base, bench_mole.random_experts(patcher, rank), "released", "both", seed=0)
    model.to(device)
    base_model.cast_frozen(model, weights)

    def loss(noisy, noise, t, context):
        pred = model(noisy, timesteps=t, context=context, transformer_options={})
        return F.mse_loss(pred.float(), noise)

    return model, loss


def moa_step(patcher, unet, weights, device):
    """(trainable module, loss(batch inputs)) of MoA training on `unet`."""
    from hostenv import import_pack

    from mixture_core.moa import MoAModel
    from training import base_model, moa_losses
    from training.moa_train import prior_weights

    Bindings, Record, TrainingPatch = _moa_training_pieces()
    moa_patch = importlib.import_module(f"{import_pack().__name__}.nodes.moa_patch")
    base_model.cast_frozen(unet, weights)
    moa = MoAModel.from_prior(prior_weights(unet)).float().to(device)
    patch = TrainingPatch(
        moa,
        moa_patch.block_locations(moa_patch.attention_modules(patcher)),
        moa_losses.router_layers(moa.layer_ids),
        moa_losses.localization_layers(moa.layer_ids),
    )

    def loss(noisy, noise, t, context):
        b, size = noisy.shape[0], noisy.shape[-1] * 8
        gen = torch.Generator().manual_seed(b)
        bindings = Bindings(
            torch.full((b, 1), 2, dtype=torch.long, device=device),
            torch.ones(b, 1, dtype=torch.bool, device=device),
            torch.randn(b, 1, moa.fusion.image_dim, generator=gen).to(device),
            t,
        )
        masks = torch.zeros(b, 1, size, size, device=device)
        masks[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
        foreground = masks[:, 0]
        record = Record()
        options = {"patches": patch.patches(), TrainingPatch.KEY: (bindings, record)}
        pred = unet(noisy, timesteps=t, context=context, transformer_options=options)
        latent_foreground = F.interpolate(foreground[:, None], size=noisy.shape[-2:], mode="bilinear")[:, 0]
        total = moa_losses.masked_reconstruction(pred, noise, foreground)
        total = total + 1e-4 * moa_losses.router_loss(record.router, latent_foreground)
        if record.attention:
            total = total + 1e-4 * moa_losses.localization_loss(record.attention, masks, bindings.valid)
        record.closed = True
        return total

    return moa, loss


def measure(trainable, loss, batch, px, reps, autocast, device):
    """(seconds per step: median, FLOPs of one step, peak bytes of one step)."""
    from bench.gpu import peak_memory

    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, 4, px // 8, px // 8, generator=gen).to(device)
    noisy = torch.randn(batch, 4, px // 8, px // 8, generator=gen).to(device)
    context = torch.randn(batch, 77, 768, generator=gen).to(device)
    t = torch.randint(0, 1000, (batch,), generator=gen).float().to(device)

    def step():
        with bench_mole.Elapsed(device) as timer:
            with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
                value = loss(noisy, noise, t, context)
            value.backward()
            for p in trainable.parameters():
                p.grad = None
        return timer.seconds

    counted = bench_mole.flops(step)  # also the warm-up
    seconds = statistics.median(step() for _ in range(reps))
    return seconds, counted, peak_memory({"step": step}, device)["step"]


def training_rows(patcher, unet, profile, device) -> list:
    """Rows (bench.gpu.Row) of MoLE and MoA training at batch 1 and 4, the baseline without and
    the 'pack' column with gradient checkpointing. `unet` (patcher's) is changed: the MoLE rows
    train a copy of it, the MoA rows the UNet itself."""
    from bench.gpu import Row, note
    from training.grad_checkpoint import enable_gradient_checkpointing

    rows = []
    for name in ("MoLE gates", "MoA"):
        net = prepare(copy.deepcopy(unet) if name == "MoLE gates" else unet, device)
        if name == "MoA":
            trainable, loss = moa_step(patcher, net, profile.train_weights, device)
        else:
            trainable, loss = mole_step(patcher, net, profile.rank, profile.train_weights, device)
        results = {}
        for checkpointing in (False, True):
            if checkpointing:
                enable_gradient_checkpointing(net)
            for batch in (1, 4):
                note(f"{name} training, batch {batch}, checkpointing {checkpointing}")
                results[checkpointing, batch] = measure(
                    trainable, loss, batch, profile.train_px, profile.train_reps, profile.autocast, device
                )
        for batch in (1, 4):
            (plain_s, plain_flops, plain_peak), (ckpt_s, ckpt_flops, ckpt_peak) = (
                results[False, batch],
                results[True, batch],
            )
            rows.append(
                Row(
                    f"{name} training SD1.5 {profile.train_px} px {str(profile.train_weights)[6:]} weights, "
                    f"{str(profile.autocast)[6:] if profile.autocast else 'no'} autocast, batch {batch} (pack: grad. checkpointing)",
                    "samples/s",
                    batch / plain_s,
                    batch / ckpt_s,
                    ckpt_s / plain_s,
                    ckpt_flops / plain_flops,
                    plain_peak,
                    ckpt_peak,
                )
            )
        del net, trainable, loss
    return rows

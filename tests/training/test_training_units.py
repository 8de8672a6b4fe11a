"""The shared training pieces on small inputs: the objective and Min-SNR weights, Lion, the
scheduler horizon under Accelerate, deterministic noise, and gradient checkpointing on a
small UNet built from ComfyUI's own UNetModel (host needed for those, not slow)."""

from __future__ import annotations

import argparse

import pytest
import torch
from helpers.cpu_memory import peak_tensor_memory

from training import grad_checkpoint, host, losses, optim


def test_min_snr_weights_follow_the_formula():
    alphas = torch.linspace(0.999, 0.01, 1000)
    latents, noise = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)
    timesteps = torch.tensor([0, 500, 999])

    def unet(x, timesteps, context, y, transformer_options):  # predicts zero: per-image MSE is 1
        return torch.zeros_like(x)

    plain = losses.diffusion_loss(unet, latents, None, None, noise, timesteps, alphas)
    weighted = losses.diffusion_loss(unet, latents, None, None, noise, timesteps, alphas, min_snr_gamma=5.0)
    a = alphas[timesteps]
    snr = a / (1 - a)
    assert float(plain) == pytest.approx(1.0)
    assert float(weighted) == pytest.approx(float((torch.clamp(snr, max=5.0) / snr).mean()), rel=1e-6)


def test_lion_step_matches_its_definition():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    pytest.importorskip("lion_pytorch", reason="Lion is the optional lion-pytorch extra")
    opt = optim.lion_class()([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.1)
    m = torch.tensor([0.0, 0.0, 0.0])
    w = p.detach().clone()
    for g in (torch.tensor([0.5, -0.1, 0.0]), torch.tensor([-0.2, 0.3, 1.0])):
        p.grad = g.clone()
        opt.step()
        w = w * (1 - 0.1 * 0.1) - 0.1 * torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
        assert torch.allclose(p.detach(), w)


def test_scheduler_horizon_counts_accelerate_process_steps():
    args = argparse.Namespace(lr_warmup_steps=2, steps=10, lr_scheduler="linear")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = optim.make_scheduler(args, opt, num_processes=2)
    lrs = []
    for _ in range(20):  # Accelerate steps it once per process per optimizer step
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # transformers' warmup starts at 0: 4 process steps of warmup, then linear decay over 16.
    assert lrs[:5] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0]) and lrs[-1] == pytest.approx(1 / 16)


def test_noise_depends_on_position_not_on_batching():
    latents = torch.zeros(4, 4, 8, 8)
    whole = {"index": torch.tensor([3, 1, 0, 2]), "position": torch.tensor([10, 11, 12, 13])}
    n_all, t_all = losses.sample_noise(whole, latents, seed=5, fixed=False)
    half = {"index": torch.tensor([0, 2]), "position": torch.tensor([12, 13])}
    n_half, t_half = losses.sample_noise(half, latents[:2], seed=5, fixed=False)
    assert torch.equal(n_all[2:], n_half) and torch.equal(t_all[2:], t_half)
    assert ((t_all >= 0) & (t_all < 1000)).all()
    fixed_a, _ = losses.sample_noise(whole, latents, 5, fixed=True)
    fixed_b, _ = losses.sample_noise(
        {"index": whole["index"], "position": whole["position"] + 100}, latents, 5, fixed=True
    )
    assert torch.equal(fixed_a, fixed_b)  # --fixed-noise: per image, whatever the step


def tiny_unet(model_channels: int = 32):
    """A small UNet built from ComfyUI's own UNetModel (seeded, non-trivial weights)."""
    host.import_host()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(
        image_size=8,
        in_channels=4,
        model_channels=model_channels,
        out_channels=4,
        num_res_blocks=[1, 1],
        channel_mult=(1, 2),
        num_heads=2,
        use_spatial_transformer=True,
        transformer_depth=[1, 1],
        transformer_depth_output=[1, 1, 1, 1],
        transformer_depth_middle=1,
        context_dim=16,
        legacy=False,
        operations=comfy.ops.disable_weight_init,
    )
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.01))
    return unet


@pytest.mark.host
def test_gradient_checkpointing_recomputes_comfyui_layers(monkeypatch):
    """ComfyUI calls the blocks' layers, not the blocks' forward: the checkpoint function must be
    entered once per ResBlock/SpatialTransformer, each layer must run again in the backward pass,
    the gradients must equal those without checkpointing, the state a patch reads from
    transformer_options must be the forward's in the recomputation, and one training step's peak
    tensor memory must drop."""
    import torch.utils.checkpoint

    host.import_host()
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    x, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 16), torch.tensor([10.0, 700.0])
    entered = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: entered.append(1) or real_checkpoint(*a, **k)
    )

    def step(unet, options):
        unet(x, timesteps=t, context=ctx, transformer_options=options).square().mean().backward()

    grads, runs, seen = [], [], []
    for checkpointing in (False, True):
        unet = tiny_unet()
        layers = [m for m in unet.modules() if isinstance(m, (ResBlock, SpatialTransformer))]
        if checkpointing:
            assert (
                grad_checkpoint.enable_gradient_checkpointing(unet) == len(layers) == 15
            )  # 9 ResBlocks, 6 SpatialTransformers
        calls = []
        for m in layers:  # the layer's first submodule runs whenever the layer's body does
            next(iter(m.children())).register_forward_hook(lambda *_: calls.append(1))

        def patch(q, k, v, extra_options):  # records what a patch reads, as MoA's training patch does
            seen.append((checkpointing, extra_options["block"], extra_options["block_index"], extra_options["sample"]))
            return q, k, v

        options = {"patches": {"attn1_patch": [patch]}, "sample": "first"}
        out = unet(x, timesteps=t, context=ctx, transformer_options=options).square().mean()
        options["sample"] = "second"  # the next sample's state, set before this one's backward
        out.backward()
        runs.append(len(calls))
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters()})
    assert len(entered) == 15
    assert runs == [15, 30]  # each layer recomputed once
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
    plain = sorted(s[1:] for s in seen if not s[0])
    recorded = sorted(s[1:] for s in seen if s[0])
    assert recorded == sorted(plain + plain)  # the recomputation saw the forward's block and sample

    peaks = []
    for checkpointing in (False, True):
        unet = tiny_unet()
        if checkpointing:
            grad_checkpoint.enable_gradient_checkpointing(unet)
        peaks.append(peak_tensor_memory(lambda: step(unet, {})))
    assert peaks[1] < 0.7 * peaks[0], peaks

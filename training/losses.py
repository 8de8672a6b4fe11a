"""The diffusion objective: deterministic noise and timesteps per sample, and the
epsilon-prediction MSE (optionally Min-SNR-gamma weighted, Hang et al. 2023)."""

from __future__ import annotations

import torch


def sample_noise(batch: dict, latents: torch.Tensor, seed: int, fixed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and integer timesteps in [0, 1000) per sample, drawn from a generator seeded by the
    run seed and the sample's stream position (or, with `fixed`, its dataset index): the same
    on any number of processes and after a resume."""
    keys = batch["index"] if fixed else batch["position"]
    noise, steps = [], []
    for k, lat in zip(keys.tolist(), latents):
        g = torch.Generator().manual_seed((seed * 1_000_003 + k * 7 + (1 if fixed else 0)) % (2**63))
        steps.append(int(torch.randint(0, 1000, (1,), generator=g)))
        noise.append(torch.randn(lat.shape, generator=g))
    return torch.stack(noise), torch.tensor(steps)


def diffusion_loss(
    unet, latents, context, y, noise, timesteps, alphas_cumprod, min_snr_gamma=None, dtype=None
) -> torch.Tensor:
    """Epsilon-prediction MSE: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, loss |eps_theta(x_t, t, c) - eps|^2,
    averaged per image and, with Min-SNR, weighted by min(SNR_t, gamma) / SNR_t.
    dtype: the frozen weights' storage dtype; x_t goes in in it, as ComfyUI's apply_model casts
    the input to the model's dtype (its UNet casts h back to the input's dtype before the final
    GroupNorm, which on the CPU must then match that norm's bf16 weight)."""
    a = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = unet(
        noisy if dtype is None else noisy.to(dtype),
        timesteps=timesteps.float(),
        context=context,
        y=y,
        transformer_options={},
    )
    per_image = (pred.float() - noise.float()).square().mean(dim=(1, 2, 3))
    if min_snr_gamma:
        snr = (a / (1 - a)).view(-1)
        per_image = per_image * torch.clamp(snr, max=min_snr_gamma) / snr
    return per_image.mean()

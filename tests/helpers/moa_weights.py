"""Random MoA files in the pack's exact format (mixture_core.moa_files), made from a real
ComfyUI model's attention weights.

    random_moa(model_patcher, seed)      MoAModel.from_prior(...) with the personalized attentions,
                                         routers and fusion perturbed so that MoA visibly acts
    write_moa_file(path, model_patcher)  random_moa saved with save_moa_file (fp16 by default)
    write_moa_for_shapes(path, shapes)   a random MoA file for other attention shapes (bad-input tests)

A fresh MoA model is the prior with a router that gives the personalized branch ~2% and an
identity fusion; a test of MoA needs the opposite: the personalized attention differs from the
prior (noise on its projections), the router gives it about half of each pixel (varying per
pixel), and the fusion changes the subject token with the image (a non-zero last layer), so
that a different subject image gives a different output.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mixture_core.moa import AttentionShape, MoAModel, prior_weights
from mixture_core.moa_files import save_moa_file


@torch.no_grad()
def perturb_(moa: MoAModel, seed: int = 0, personal_noise: float = 0.5, fusion_scale: float = 1.0) -> MoAModel:
    """In place: noise on the personalized projections (relative to each weight's std), random
    router heads centred on an even split, and a non-zero fusion output layer."""
    gen = torch.Generator().manual_seed(seed)

    def randn(t):
        return torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype)

    for layer in moa.layers:
        for lin in (layer.to_q, layer.to_k, layer.to_v, layer.to_out):
            lin.weight.add_(randn(lin.weight) * lin.weight.float().std().item() * personal_noise)
        fc2 = layer.router.fc2
        fc2.weight.copy_(randn(fc2.weight) * 2.0 / fc2.weight.shape[1] ** 0.5)
        fc2.bias.zero_()
    fc2 = moa.fusion.mlp.fc2
    fc2.weight.copy_(randn(fc2.weight) * fusion_scale / fc2.weight.shape[1] ** 0.5)
    fc2.bias.copy_(randn(fc2.bias) * 0.1 * fusion_scale)
    return moa


def _seeded(seed: int, build):
    # from_prior and MoAModel() initialise routers and the fusion with torch's global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def random_moa(model_patcher, seed: int = 0, personal_noise: float = 0.5, layers=None) -> MoAModel:
    """A MoA model for `model_patcher` (all its attention layers, or `layers`), perturbed."""
    prior = prior_weights(model_patcher.model.diffusion_model)
    if layers is not None:
        prior = {k: v for k, v in prior.items() if k in set(layers)}
    moa = _seeded(seed, lambda: MoAModel.from_prior(prior))
    return perturb_(moa, seed + 1, personal_noise)


def write_moa_file(
    path,
    model_patcher,
    seed: int = 0,
    family: str = "sd15",
    dtype=torch.float16,
    layers=None,
    personal_noise: float = 0.5,
) -> Path:
    """A random MoA file for `model_patcher` in the pack's format (save_moa_file)."""
    moa = random_moa(model_patcher, seed, personal_noise, layers).to(dtype)
    save_moa_file(path, moa, family, {"description": "random weights for tests, not a trained model"})
    return Path(path)


def write_moa_for_shapes(
    path, shapes: dict[str, AttentionShape], seed: int = 0, family: str = "sd15", dtype=torch.float16, **hyper
) -> Path:
    """A random MoA file for arbitrary attention shapes (another family or width)."""
    moa = _seeded(seed, lambda: MoAModel(shapes, **hyper))
    perturb_(moa, seed + 1)
    save_moa_file(path, moa.to(dtype), family, {"description": "random weights for tests, not a trained model"})
    return Path(path)


# Bump when the recipe of random_moa / perturb_ changes: cached files are named after it.
MOA_RECIPE_VERSION = "v1"


def cached_moa_file(model_patcher, seed: int = 0, model_tag: str | None = None) -> Path:
    """write_moa_file for the random (thin) SD1.5 checkpoint of helpers.random_models, made once and
    cached beside it (the file depends on that checkpoint's weights: its recipe version is in
    the name). Link or copy it into a models/moa folder to use it."""
    from . import random_models as rm

    tag = model_tag or f"sd15thin{rm.SD15_THIN_VERSION}"
    path = rm.cache_dir() / f"moa_random_{MOA_RECIPE_VERSION}_{tag}_seed{seed}.safetensors"
    if not path.is_file():
        # Written under a temporary name and renamed: a concurrent or killed run never leaves
        # or reads a half file (two concurrent runs both write it; the last rename wins).
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            write_moa_file(tmp, model_patcher, seed=seed)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return path

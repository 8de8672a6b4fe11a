"""What the three MoLE training stages share: the host model library, the data pipeline, the
diffusion objective and the Accelerate training loop.

* Model library: the ComfyUI host's ``comfy`` package. ``load_base`` loads a single-file
  checkpoint with ``comfy.sd.load_checkpoint_guess_config`` (the same file and loader ComfyUI
  uses); the UNet trained is ``model_patcher.model.diffusion_model`` (ComfyUI/SAI module names),
  the noise schedule comes from ``model.model_sampling``, captions go through the loaded CLIP,
  images through the loaded VAE.
* Objective: epsilon-prediction MSE at timesteps uniform in [0, 1000), optionally Min-SNR-gamma
  weighted (Hang et al. 2023, gamma 5).
* Engineering: Accelerate (mixed precision, gradient accumulation, DDP under
  ``accelerate launch``, ``save_state``/``load_state``), gradient checkpointing, seeded and exactly
  resumable runs (the data order, crops, noise and timesteps of micro-batch m depend only on
  the seed and m), periodic checkpoints, a tqdm progress bar and a JSON-lines log.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("mole.training")

# --------------------------------------------------------------------------------------------
# the host


def _hostenv():
    """tests/hostenv.py, the repository's one way of finding and importing the ComfyUI host
    (COMFYUI_PATH, the ComfyUI holding this pack, or ~/comfy/ComfyUI)."""
    if "hostenv" in sys.modules:
        return sys.modules["hostenv"]
    spec = importlib.util.spec_from_file_location("hostenv", REPO / "tests" / "hostenv.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["hostenv"] = module
    spec.loader.exec_module(module)
    return module


def import_host() -> Path:
    """Put ComfyUI first on sys.path (its top-level ``nodes`` module must win over this
    repository's ``nodes/`` package, which ``python -m`` from the repo root puts on the path)
    and initialise it as ComfyUI's main.py would (no argv parsing; --cpu without CUDA)."""
    hostenv = _hostenv()
    host, reason = hostenv.find_host()
    if host is None:
        raise SystemExit(f"error: {reason}")
    shadow = sys.modules.get("nodes")
    if shadow is not None and Path(getattr(shadow, "__file__", "") or "").resolve().parent == REPO / "nodes":
        raise RuntimeError("this repository's nodes/ package was imported as the top-level 'nodes' module; "
                           "import the host first (training.common.import_host())")
    if str(host) in sys.path:
        sys.path.remove(str(host))
    sys.path.insert(0, str(host))
    hostenv.import_host()
    return host


def import_pack():
    """This repository as the package ComfyUI loads from custom_nodes/ (for the node-side
    helpers: ComfyUI's LoRA key map, the model family)."""
    import_host()
    return _hostenv().import_pack()


# --------------------------------------------------------------------------------------------
# command line


def base_parser(description: str, epilog: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--checkpoint", required=True, help="single-file SD checkpoint (.safetensors), the file ComfyUI's Load Checkpoint loads")
    g.add_argument("--data", required=True, help="image folder: images with same-name .txt captions, or a metadata.jsonl ({\"file_name\", \"text\"})")
    g.add_argument("--resolution", type=int, default=512, help="square training size in pixels, a multiple of 64 (default 512; 1024 for SDXL)")
    g.add_argument("--crop", choices=("center", "random"), default="center", help="square crop after resizing the shorter side (default center)")
    g.add_argument("--flip", action="store_true", help="random horizontal flips")
    g.add_argument("--no-cache", dest="cache", action="store_false",
                   help="encode images and captions at every step instead of once up front (needed for random crops/flips, which are never cached)")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes for image decoding (uncached runs)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, required=True, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=1, help="images per process per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (effective batch = batch-size x grad-accum x processes)")
    g.add_argument("--lr", type=float, required=True, help="learning rate")
    g.add_argument("--optimizer", choices=("adamw", "lion", "sgd"), default="adamw",
                   help="adamw (default), lion, or plain sgd (no per-element normalisation: the runs the equivalence tests compare)")
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--beta1", type=float, default=None, help="default 0.9 (AdamW), 0.9 (Lion)")
    g.add_argument("--beta2", type=float, default=None, help="default 0.999 (AdamW), 0.99 (Lion)")
    g.add_argument("--lr-scheduler", default="constant", choices=("constant", "constant_with_warmup", "linear", "cosine"))
    g.add_argument("--lr-warmup-steps", type=int, default=0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--min-snr-gamma", type=float, default=None, help="Min-SNR loss weighting, min(SNR, gamma)/SNR (the MoLE paper uses 5)")
    g.add_argument("--fixed-noise", action="store_true",
                   help="draw each image's noise and timestep once (per image, not per step): an overfitting check, not for real training")

    g = p.add_argument_group("engineering")
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="autocast precision; frozen weights are stored in it too (trainable ones stay fp32)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet blocks in the backward pass (less memory, ~30%% slower)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output", required=True, help="the file to write (.safetensors)")
    g.add_argument("--work-dir", default=None, help="checkpoints and log (default: <output without .safetensors>-work)")
    g.add_argument("--save-every", type=int, default=0, help="save a resumable checkpoint (and the output file as of then) every N steps")
    g.add_argument("--keep-checkpoints", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    g.add_argument("--resume", default=None, help="checkpoint folder to resume from, or 'latest' (newest in the work dir)")
    g.add_argument("--log-every", type=int, default=1, help="log line every N steps")
    return p


def check_args(args) -> None:
    if args.resolution % 64:
        raise SystemExit(f"error: --resolution must be a multiple of 64, not {args.resolution}")
    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    if args.cache and (args.crop == "random" or args.flip):
        args.cache = False  # random crops and flips differ per step: nothing to cache
    if not str(args.output).endswith(".safetensors"):
        raise SystemExit(f"error: --output must be a .safetensors file, not {args.output}")
    if args.work_dir is None:
        args.work_dir = str(Path(args.output).with_suffix("")) + "-work"


def setup_logging(accelerator) -> None:
    """INFO logs (ours and ComfyUI's) on the main process, warnings only on the others. An
    application that already configured logging (pytest, a notebook) keeps its handlers."""
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(level)


def make_accelerator(args, find_unused_parameters: bool = False):
    """find_unused_parameters: for stages where some trainable weights sit out a step (DDP
    would otherwise wait for their gradients forever)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    # Without CUDA, run on the CPU; under a multi-process launcher (accelerate launch --multi_gpu,
    # torchrun) that makes Accelerate use DDP over gloo (its MULTI_CPU mode).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    setup_logging(accelerator)
    set_seed(args.seed)
    return accelerator


# --------------------------------------------------------------------------------------------
# the base model


@dataclasses.dataclass
class Base:
    """A loaded checkpoint: model_patcher (comfy ModelPatcher), clip, vae (None once freed),
    unet (model_patcher.model.diffusion_model), family ("sd15", "sdxl"), alphas_cumprod (1000,)."""

    path: str
    model_patcher: object
    clip: object
    vae: object
    unet: torch.nn.Module
    family: str
    alphas_cumprod: torch.Tensor

    def free_encoders(self) -> None:
        """Drop the CLIP and VAE (after caching) and let ComfyUI forget them."""
        self.clip = self.vae = None
        import comfy.model_management as mm

        gc.collect()
        mm.cleanup_models_gc()
        mm.soft_empty_cache()


def load_base(path, load_encoders: bool = True) -> Base:
    import_host()
    import comfy.sd

    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} not found")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=load_encoders, output_clip=load_encoders, embedding_directory=None
    )
    family = node_helpers().model_family(model)
    sampling = model.model.model_sampling
    import comfy.model_base

    if model.model.model_type != comfy.model_base.ModelType.EPS or not hasattr(sampling, "sigmas"):
        raise SystemExit(f"error: {path}: only discrete epsilon-prediction models (SD1.x, SDXL) are supported, "
                         f"this one is {model.model.model_type.name}")
    sigmas = sampling.sigmas.detach().double().cpu()
    alphas_cumprod = (1.0 / (1.0 + sigmas**2)).float()  # sigma^2 = (1 - a) / a
    unet = model.model.diffusion_model
    # Training manages dtypes itself (cast_frozen + autocast): ComfyUI's per-call weight casts
    # (manual_cast ops, used when the weights' dtype is not the compute dtype) copy weights
    # outside autograd and would cut the gradients of trainable weights.
    for module in unet.modules():
        if getattr(module, "comfy_cast_weights", False):
            module.comfy_cast_weights = False
    return Base(str(path), model, clip, vae, unet, family, alphas_cumprod)


def node_helpers():
    """The pack's nodes.unet_layers (ComfyUI's LoRA key map, model family, module widths)."""
    import importlib

    return importlib.import_module(f"{import_pack().__name__}.nodes.unet_layers")


def expert_target_layers(unet: torch.nn.Module) -> dict[str, tuple[int, int, bool]]:
    """{module path: (d_in, d_out, is_conv)} of the layers MoLE experts adapt (192 on SD1.5)."""
    from mixture_core.mole import is_expert_target

    layers = {}
    for path, module in unet.named_modules():
        if is_expert_target(path) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            w = module.weight
            layers[path] = (w.shape[1], w.shape[0], w.ndim == 4)
    return layers


def kohya_names(base: Base, module_paths) -> dict[str, str]:
    """{module path: kohya LoRA layer name}: diffusers-style for SD1.x (lora_unet_down_blocks_0_
    attentions_0_proj_in, as kohya's SD1.5 LoRAs and the MoLE SD1.5 experts are named), SAI-style
    for SDXL (lora_unet_input_blocks_4_1_proj_in, as the released MoLE-SDXL files). The
    diffusers names come from ComfyUI's own comfy.utils.unet_to_diffusers."""
    import comfy.utils

    wanted = set(module_paths)
    if base.family != "sd15":
        return {p: "lora_unet_" + p.replace(".", "_") for p in wanted}
    names = {}
    for diffusers_key, sai_key in comfy.utils.unet_to_diffusers(base.model_patcher.model.model_config.unet_config).items():
        module = sai_key[: -len(".weight")] if sai_key.endswith(".weight") else None
        if module in wanted and diffusers_key.endswith(".weight"):
            names[module] = "lora_unet_" + diffusers_key[: -len(".weight")].replace(".", "_")
    missing = sorted(wanted - set(names))
    if missing:
        raise RuntimeError(f"ComfyUI's unet_to_diffusers has no diffusers name for {len(missing)} layers: {missing[:5]}")
    return names


def freeze(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def enable_gradient_checkpointing(unet: torch.nn.Module) -> int:
    """Recompute each input/middle/output block of a ComfyUI UNet in the backward pass
    (torch.utils.checkpoint, non-reentrant). Returns the number of blocks wrapped."""
    import torch.utils.checkpoint as cp

    blocks = list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)
    for block in blocks:
        inner = block.forward

        def forward(*a, _inner=inner, **k):
            if torch.is_grad_enabled():
                return cp.checkpoint(_inner, *a, use_reentrant=False, **k)
            return _inner(*a, **k)

        block.forward = forward
    return len(blocks)


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store frozen floating-point parameters in `dtype`, trainable ones in fp32."""
    for p in module.parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.float32 if p.requires_grad else dtype)


def weight_dtype(args) -> torch.dtype:
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]


# --------------------------------------------------------------------------------------------
# data


def _lcm_repeat(contexts: list[torch.Tensor]) -> torch.Tensor:
    """Stack text embeddings of different token lengths (long captions: multiples of 77) by
    repeating each to the least common multiple, as ComfyUI batches conds of unequal length."""
    lengths = [c.shape[1] for c in contexts]
    total = math.lcm(*lengths)
    return torch.cat([c.repeat(1, total // c.shape[1], 1) for c in contexts])


class Encoder:
    """Captions -> (context, pooled) with the loaded CLIP; pixels -> latents with the VAE,
    scaled as the model expects (latent_format.process_in)."""

    def __init__(self, base: Base, resolution: int):
        self.base, self.resolution = base, resolution
        self._text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def text(self, caption: str):
        if caption not in self._text:
            clip = self.base.clip
            cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
            self._text[caption] = (cond.float().cpu(), None if pooled is None else pooled.float().cpu())
        return self._text[caption]

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        raw = self.base.vae.encode(pixels)
        return self.base.model_patcher.model.latent_format.process_in(raw.float()).cpu()

    def adm(self, pooled: torch.Tensor | None) -> torch.Tensor | None:
        """The UNet's `y` input (SDXL: pooled text + size embeddings; None for SD1.x)."""
        model = self.base.model_patcher.model
        if getattr(model, "adm_channels", 0) == 0:
            return None
        r = self.resolution
        return model.encode_adm(pooled_output=pooled, width=r, height=r, crop_w=0, crop_h=0, target_width=r, target_height=r).float().cpu()

    def conditioning(self, captions: list[str]):
        texts = [self.text(c) for c in captions]
        context = _lcm_repeat([t[0] for t in texts])
        ys = [self.adm(t[1]) for t in texts]
        y = None if ys[0] is None else torch.cat(ys)
        return context, y


class CachedDataset(torch.utils.data.Dataset):
    """Latents and text embeddings computed once per image (center crop, no flip)."""

    def __init__(self, latents, contexts, ys):
        self.latents, self.contexts, self.ys = latents, contexts, ys

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, key):
        index, position = key
        return {"index": index, "position": position, "latent": self.latents[index], "context": self.contexts[index], "y": self.ys[index]}


def collate_cached(items):
    return {
        "index": torch.tensor([i["index"] for i in items]),
        "position": torch.tensor([i["position"] for i in items]),
        "latents": torch.cat([i["latent"] for i in items]),
        "context": _lcm_repeat([i["context"] for i in items]),
        "y": None if items[0]["y"] is None else torch.cat([i["y"] for i in items]),
    }


def collate_pixels(items):
    from .data import collate

    out = collate(items)
    out["position"] = torch.tensor([i["position"] for i in items])
    return out


class _PixelDataset(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        item = self.images[key]
        item["position"] = key[1]
        return item


def scan_data(args):
    """The training images and captions, checked before the model is loaded (a bad file stops
    the run at once, naming it)."""
    from .data import DataError, scan_dataset

    try:
        return scan_dataset(args.data)
    except DataError as e:
        raise SystemExit(f"error: bad training data: {e}") from e


def build_data(args, samples, base: Base, accelerator, start_micro: int):
    """(DataLoader of endless micro-batches for this process, Encoder or None, number of images).
    Cached runs encode every image once (each process encodes the whole set) and free the
    CLIP and VAE; uncached runs keep them and encode per micro-batch."""
    from .data import ImageCaptionDataset, StreamSampler

    log.info("data: %d images from %s (%s crop%s, %d px)", len(samples), args.data, args.crop, ", flips" if args.flip else "", args.resolution)
    images = ImageCaptionDataset(samples, args.resolution, args.crop, args.flip, args.seed)
    encoder = Encoder(base, args.resolution)
    sampler = StreamSampler(len(samples), args.batch_size, args.seed, accelerator.process_index, accelerator.num_processes, start_micro)
    if args.cache:
        t0 = time.perf_counter()
        latents, contexts, ys = [], [], []
        for i in range(len(samples)):
            item = images[(i, 0)]
            latents.append(encoder.latents(item["pixels"][None]))
            context, y = encoder.conditioning([item["caption"]])
            contexts.append(context)
            ys.append(y)
        log.info("cached latents and text embeddings of %d images in %.1f s", len(samples), time.perf_counter() - t0)
        base.free_encoders()
        dataset, collate_fn, encoder, workers = CachedDataset(latents, contexts, ys), collate_cached, None, 0
    else:
        dataset, collate_fn, workers = _PixelDataset(images), collate_pixels, args.num_workers
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=workers)
    return loader, encoder, len(samples)


# --------------------------------------------------------------------------------------------
# objective


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


def diffusion_loss(unet, latents, context, y, noise, timesteps, alphas_cumprod, min_snr_gamma=None) -> torch.Tensor:
    """Epsilon-prediction MSE: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, loss |eps_theta(x_t, t, c) - eps|^2,
    averaged per image and, with Min-SNR, weighted by min(SNR_t, gamma) / SNR_t."""
    a = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = unet(noisy, timesteps=timesteps.float(), context=context, y=y, transformer_options={})
    per_image = (pred.float() - noise.float()).square().mean(dim=(1, 2, 3))
    if min_snr_gamma:
        snr = (a / (1 - a)).view(-1)
        per_image = per_image * torch.clamp(snr, max=min_snr_gamma) / snr
    return per_image.mean()


# --------------------------------------------------------------------------------------------
# optimisers


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):
    update = sign(b1 m + (1 - b1) g); m <- b2 m + (1 - b2) g; decoupled weight decay.
    Use a ~3-10x smaller learning rate than AdamW."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = m.mul(b1).add_(p.grad, alpha=1 - b1).sign_()
                p.add_(update, alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss


def make_optimizer(args, params):
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == "lion":
        return Lion(params, lr=args.lr, betas=(args.beta1 or 0.9, args.beta2 or 0.99), weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, betas=(args.beta1 or 0.9, args.beta2 or 0.999), weight_decay=args.weight_decay)


def make_scheduler(args, optimizer, num_processes: int):
    """A LambdaLR. Accelerate steps a prepared scheduler once per process on each optimizer
    step, so its horizon is counted in steps x processes (as diffusers' scripts do)."""
    warm, total = args.lr_warmup_steps * num_processes, max(1, args.steps * num_processes)
    kind = args.lr_scheduler

    def factor(i):
        if kind != "constant" and warm and i < warm:
            return (i + 1) / warm
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (i - warm) / max(1, total - warm))
        return 1.0 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------
# the loop


class Progress:
    """Counters saved with accelerate's state (register_for_checkpointing)."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


@dataclasses.dataclass
class Stage:
    """What a training stage hands to the loop.
    model: the module to prepare (the UNet with its trainable parts inside);
    trainable: {name: parameter} of what is trained (saved in checkpoints);
    write_output(path, step): writes the stage's file (main process only);
    name: for logs;
    data(args, accelerator, start_micro): the stage's own DataLoader of micro-batches (default:
      images and captions, build_data);
    loss(model, batch): the stage's own objective on one micro-batch, `model` being the
      prepared stage model (default: the noise-prediction MSE of diffusion_loss)."""

    name: str
    model: torch.nn.Module
    trainable: dict[str, torch.nn.Parameter]
    write_output: Callable[[str, int], None]
    data: Callable | None = None
    loss: Callable | None = None


@dataclasses.dataclass
class Result:
    output: str
    steps: int
    losses: list[float]
    work_dir: str
    stage: Stage | None = None


def _checkpoints(work_dir) -> list[Path]:
    root = Path(work_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _resume_dir(args) -> Path | None:
    if not args.resume:
        return None
    if args.resume == "latest":
        found = _checkpoints(args.work_dir)
        if not found:
            log.info("--resume latest: no checkpoint in %s, starting from step 0", args.work_dir)
            return None
        return found[-1]
    path = Path(args.resume)
    if not (path / "trainable.safetensors").is_file():
        raise SystemExit(f"error: {path} is not a checkpoint of these scripts (no trainable.safetensors in it)")
    return path


def train(args, accelerator, base: Base, stage: Stage, samples) -> Result:
    """The shared loop: data, optimizer, scheduler, Accelerate preparation, resume, steps,
    periodic checkpoints, final output."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    trainable = stage.trainable
    if not trainable:
        raise RuntimeError(f"{stage.name}: nothing to train")
    n_params = sum(p.numel() for p in trainable.values())
    log.info("%s: %d trainable tensors, %.2fM parameters", stage.name, len(trainable), n_params / 1e6)

    resume = _resume_dir(args)
    progress = Progress()
    if resume is not None:  # the step is needed before the data stream is built
        with open(resume / "progress.json") as f:
            progress.step = json.load(f)["step"]
    if stage.data is not None:
        loader, encoder = stage.data(args, accelerator, progress.step * args.grad_accum), None
    else:
        loader, encoder, _ = build_data(args, samples, base, accelerator, progress.step * args.grad_accum)

    optimizer = make_optimizer(args, list(trainable.values()))
    scheduler = make_scheduler(args, optimizer, accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(stage.model, optimizer, scheduler)
    accelerator.register_for_checkpointing(progress)

    # Checkpoints hold the trainable tensors only (not the frozen multi-GB base): the hooks take
    # the model weights out of accelerate's hands, as diffusers' LoRA scripts do.
    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_file({n: p.detach().float().contiguous().cpu() for n, p in trainable.items()}, os.path.join(output_dir, "trainable.safetensors"))
        weights.clear()

    def load_hook(models, input_dir):
        state = load_file(os.path.join(input_dir, "trainable.safetensors"))
        missing = sorted(set(trainable) - set(state))
        if missing:
            raise SystemExit(f"error: {input_dir} does not match this run ({len(missing)} trainable tensors missing, such as {missing[0]})")
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(state[n].to(p.dtype))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    if resume is not None:
        accelerator.load_state(str(resume))
        log.info("resumed from %s at step %d", resume, progress.step)

    work = Path(args.work_dir)
    if accelerator.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
        with open(work / "args.json", "w") as f:
            json.dump(vars(args), f, indent=1, default=str)
    log_path = work / "log.jsonl"
    device = accelerator.device
    alphas = base.alphas_cumprod.to(device)

    def save_checkpoint(step):
        folder = work / "checkpoints" / f"step-{step:06d}"
        accelerator.save_state(str(folder))
        if accelerator.is_main_process:
            with open(folder / "progress.json", "w") as f:
                json.dump({"step": step}, f)
            stage.write_output(str(folder / Path(args.output).name), step)
            if args.keep_checkpoints:
                for old in _checkpoints(work)[: -args.keep_checkpoints]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()
        log.info("checkpoint: %s", folder)

    model.train()
    losses = []
    batches = iter(loader)
    bar = tqdm(total=args.steps, initial=progress.step, disable=not accelerator.is_main_process, desc=stage.name, unit="step", dynamic_ncols=True)
    t_last, step_losses = time.perf_counter(), []
    while progress.step < args.steps:
        batch = next(batches)
        if stage.loss is None:
            if encoder is not None:
                latents = torch.cat([encoder.latents(batch["pixels"][i : i + 1]) for i in range(len(batch["caption"]))])
                context, y = encoder.conditioning(batch["caption"])
            else:
                latents, context, y = batch["latents"], batch["context"], batch["y"]
            noise, timesteps = sample_noise(batch, latents, args.seed, args.fixed_noise)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                if stage.loss is not None:
                    loss = stage.loss(model, batch)
                else:
                    loss = diffusion_loss(
                        model, latents.to(device), context.to(device), None if y is None else y.to(device),
                        noise.to(device), timesteps.to(device), alphas, args.min_snr_gamma,
                    )
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(list(trainable.values()), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step_losses.append(loss.detach())
        if not accelerator.sync_gradients:
            continue
        progress.step += 1
        step_loss = float(accelerator.reduce(torch.stack(step_losses).mean(), "mean"))
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"{stage.name}: loss is {step_loss} at step {progress.step}; lower --lr or use --mixed-precision no/bf16")
        losses.append(step_loss)
        now = time.perf_counter()
        seconds, t_last, step_losses = now - t_last, now, []
        lr = scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", s_per_step=f"{seconds:.2f}")
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": progress.step, "loss": step_loss, "lr": lr, "seconds": round(seconds, 3)}) + "\n")
            if progress.step % args.log_every == 0 or progress.step == args.steps:
                log.info("step %d/%d  loss %.5f  lr %.3g  %.2f s/step", progress.step, args.steps, step_loss, lr, seconds)
        if args.save_every and progress.step % args.save_every == 0 and progress.step < args.steps:
            save_checkpoint(progress.step)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        stage.write_output(args.output, progress.step)
        log.info("wrote %s (step %d)", args.output, progress.step)
    accelerator.wait_for_everyone()
    return Result(args.output, progress.step, losses, str(work), stage)


@contextlib.contextmanager
def host_session():
    """Free ComfyUI's references to the models a run loaded when it ends (in-process runs)."""
    try:
        yield
    finally:
        gc.collect()
        if "comfy.model_management" in sys.modules:
            mm = sys.modules["comfy.model_management"]
            mm.cleanup_models_gc()
            mm.soft_empty_cache()
        gc.collect()


def end_accelerator(accelerator) -> None:
    """End a run. In a single process, also forget Accelerate's global state so that a later
    in-process run (tests, notebooks) can build an Accelerator with other settings; a
    distributed run keeps it (resetting would re-create the process group at the next log)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

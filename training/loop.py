"""The shared training loop: what a stage hands to it (Stage), Accelerate preparation, exact
resume, steps with gradient accumulation, periodic checkpoints, the log and the final output.

Seeded and exactly resumable: the data order, crops, noise and timesteps of micro-batch m depend
only on the seed and m; checkpoints hold the trainable tensors, the optimizer, the scheduler,
the step and Accelerate's RNG states.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .base_model import Base
from .cli import weight_dtype
from .datasets import build_data
from .losses import diffusion_loss, sample_noise
from .optim import make_optimizer, make_scheduler
from .sampling import PromptSampler

log = logging.getLogger("mole.training")


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


def checkpoint_folders(work_dir) -> list[Path]:
    """The checkpoints of a work dir, oldest first: Accelerate's automatic naming
    (<work dir>/checkpoints/checkpoint_<n>), with n the optimizer step here."""
    root = Path(work_dir) / "checkpoints"
    found = [p for p in root.glob("checkpoint_*") if p.is_dir() and re.fullmatch(r"checkpoint_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _resume_dir(args) -> Path | None:
    if not args.resume:
        return None
    if args.resume == "latest":
        found = checkpoint_folders(args.work_dir)
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
    # Sample prompts are encoded before the data pipeline frees the CLIP.
    sampler = (
        PromptSampler(args, base, Path(args.work_dir) / "samples")
        if args.sample_every and accelerator.is_main_process
        else None
    )
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
            save_file(
                {n: p.detach().float().contiguous().cpu() for n, p in trainable.items()},
                os.path.join(output_dir, "trainable.safetensors"),
            )
        weights.clear()

    def load_hook(models, input_dir):
        state = load_file(os.path.join(input_dir, "trainable.safetensors"))
        missing = sorted(set(trainable) - set(state))
        if missing:
            raise SystemExit(
                f"error: {input_dir} does not match this run ({len(missing)} trainable tensors missing, such as {missing[0]})"
            )
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
    if args.log_with != "none":  # hyperparameters as the trackers take them: numbers, strings, booleans
        accelerator.init_trackers(
            stage.name,
            config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()},
        )
    device = accelerator.device
    alphas = base.alphas_cumprod.to(device)

    def save_checkpoint(step, with_output=True):
        # Accelerate names (checkpoint_<iteration>) and rotates (total_limit = --keep-checkpoints)
        # the folders; the iteration is set to the step so that the name says which step it holds.
        accelerator.project_configuration.iteration = step
        folder = work / "checkpoints" / f"checkpoint_{step}"
        if folder.exists() and accelerator.is_main_process:  # left by a run resumed from an earlier checkpoint
            shutil.rmtree(folder)
        accelerator.wait_for_everyone()
        accelerator.save_state()
        if accelerator.is_main_process:
            with open(folder / "progress.json", "w") as f:
                json.dump({"step": step}, f)
            if with_output:
                stage.write_output(str(folder / Path(args.output).name), step)
        accelerator.wait_for_everyone()
        log.info("checkpoint: %s", folder)

    model.train()
    losses = []
    batches = iter(loader)
    bar = tqdm(
        total=args.steps,
        initial=progress.step,
        disable=not accelerator.is_main_process,
        desc=stage.name,
        unit="step",
        dynamic_ncols=True,
    )
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
                        model,
                        latents.to(device),
                        context.to(device),
                        None if y is None else y.to(device),
                        noise.to(device),
                        timesteps.to(device),
                        alphas,
                        args.min_snr_gamma,
                        weight_dtype(args),
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
            raise FloatingPointError(
                f"{stage.name}: loss is {step_loss} at step {progress.step}; lower --lr or use --mixed-precision no/bf16"
            )
        losses.append(step_loss)
        now = time.perf_counter()
        seconds, t_last, step_losses = now - t_last, now, []
        lr = scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", s_per_step=f"{seconds:.2f}")
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(
                    json.dumps({"step": progress.step, "loss": step_loss, "lr": lr, "seconds": round(seconds, 3)})
                    + "\n"
                )
        if args.log_with != "none":
            accelerator.log({"loss": step_loss, "lr": lr}, step=progress.step)
            if progress.step % args.log_every == 0 or progress.step == args.steps:
                log.info(
                    "step %d/%d  loss %.5f  lr %.3g  %.2f s/step", progress.step, args.steps, step_loss, lr, seconds
                )
        # Every N steps, and at the final step so that a finished run can be extended (--resume
        # latest with more --steps); the final one without a copy of the output, written next.
        if (args.save_every and progress.step % args.save_every == 0) or progress.step == args.steps:
            save_checkpoint(progress.step, with_output=progress.step < args.steps)
        if args.sample_every and (progress.step % args.sample_every == 0 or progress.step == args.steps):
            if sampler is not None:
                model.eval()
                sampler.sample(progress.step, accelerator.autocast)
                model.train()
            accelerator.wait_for_everyone()
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        stage.write_output(args.output, progress.step)
        log.info("wrote %s (step %d)", args.output, progress.step)
    accelerator.wait_for_everyone()
    return Result(args.output, progress.step, losses, str(work), stage)

"""Accelerate for the training scripts: the Accelerator (CPU without CUDA, DDP over gloo under a
multi-process launcher), logging per process, and ending a run so that another can start in the
same process."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("mole.training")


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
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    # Without CUDA, run on the CPU; under a multi-process launcher (accelerate launch --multi_gpu,
    # torchrun) that makes Accelerate use DDP over gloo (its MULTI_CPU mode).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        # Accelerate names checkpoints <work dir>/checkpoints/checkpoint_<n> and keeps the newest
        # --keep-checkpoints of them; trackers (TensorBoard) write under <work dir>/logs.
        project_config=ProjectConfiguration(
            project_dir=str(args.work_dir),
            logging_dir=str(Path(args.work_dir) / "logs"),
            automatic_checkpoint_naming=True,
            total_limit=args.keep_checkpoints or None,
        ),
        log_with=None if args.log_with == "none" else args.log_with,
    )
    setup_logging(accelerator)
    set_seed(args.seed)
    return accelerator


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

"""Optimisers and learning-rate schedules, from the libraries that maintain them: AdamW and SGD
from torch, Lion from lion-pytorch (an optional extra: pip install lion-pytorch), schedules from
transformers.get_scheduler."""

from __future__ import annotations

import torch

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


def lion_class():
    """lion_pytorch.Lion (Chen et al. 2023: update = sign(b1 m + (1 - b1) g), m <- b2 m + (1 - b2) g,
    weight decay p <- p (1 - lr wd)), or a SystemExit saying how to install it."""
    try:
        from lion_pytorch import Lion
    except ImportError as e:
        raise SystemExit(
            "error: --optimizer lion needs the lion-pytorch package: pip install lion-pytorch "
            "(or pip install .[training])"
        ) from e
    return Lion


def make_optimizer(args, params):
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == "lion":
        return lion_class()(
            params, lr=args.lr, betas=(args.beta1 or 0.9, args.beta2 or 0.99), weight_decay=args.weight_decay
        )
    return torch.optim.AdamW(
        params, lr=args.lr, betas=(args.beta1 or 0.9, args.beta2 or 0.999), weight_decay=args.weight_decay
    )


def make_scheduler(args, optimizer, num_processes: int):
    """transformers.get_scheduler. Accelerate steps a prepared scheduler once per process on each
    optimizer step, so its horizon is counted in steps x processes (as diffusers' scripts do)."""
    from transformers.optimization import (
        get_scheduler,
    )  # the top-level lazy import fails in some transformers 5 installs

    return get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max(1, args.steps * num_processes),
    )

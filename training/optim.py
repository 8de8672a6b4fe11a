"""Optimisers and learning-rate schedules."""

from __future__ import annotations

import math

import torch


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

"""The optimiser and the learning-rate schedule of the trainer (spec §5.2)."""
from __future__ import annotations

import math

import torch

from .train_config import TrainLoopConfig


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, warmup_start_lr: float,
          max_steps: int) -> float:
    """Linear warm-up from warmup_start_lr to lr over warmup_steps, then cosine from lr to min_lr."""
    if step < warmup_steps:
        return warmup_start_lr + (lr - warmup_start_lr) * step / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Spec §5.2: decay on >= 2-D weights; none on biases, 1-D parameters and names with "ln"/"bn"."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or "ln" in name or "bn" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(module: torch.nn.Module, lr: float, loop: TrainLoopConfig) -> torch.optim.AdamW:
    """AdamW over `module`'s trainable parameters with `param_groups` and the config's decay and betas."""
    return torch.optim.AdamW(param_groups(module, loop.weight_decay), lr=lr, betas=tuple(loop.betas))

"""AdamW with DPR's parameter groups and the linear warmup / linear decay schedule."""
from typing import Tuple

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

# DPR floors the decay at 1e-7 of the peak rate rather than 0.
MIN_LR_FACTOR = 1e-7


def build_optimizer(
    model: nn.Module, learning_rate: float, adam_eps: float, weight_decay: float, adam_betas: Tuple[float, float]
) -> torch.optim.Optimizer:
    """No weight decay on biases and LayerNorm weights. Frozen parameters (the unused pooler, a fixed context
    encoder) are left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if "bias" in name or "LayerNorm.weight" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, eps=adam_eps, betas=tuple(adam_betas))


def linear_schedule_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(MIN_LR_FACTOR, (total_steps - step) / max(1, total_steps - warmup_steps))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, completed_steps: int = 0
) -> LambdaLR:
    """The schedule for `total_steps`, positioned after `completed_steps`. Rebuilding it on resume, instead of
    restoring a saved lambda, keeps a changed epoch count correct (DPR #99: the rate was 0 after resuming)."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return LambdaLR(
        optimizer,
        lambda step: linear_schedule_factor(step, warmup_steps, total_steps),
        last_epoch=completed_steps - 1,
    )


def parse_adam_betas(value) -> Tuple[float, float]:
    """(beta1, beta2) from a config list or GC-DPR's string '(0.9, 0.999)'."""
    if isinstance(value, str):
        import ast

        value = ast.literal_eval(value)
    return tuple(float(v) for v in value)

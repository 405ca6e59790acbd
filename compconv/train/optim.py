"""Optimizer with weight decay off for norm and bias parameters, and per-step LR schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, wd_on_norm_and_bias: bool) -> list[dict]:
    """Two groups: decayed weights, and 1-D tensors (norm scales, biases) without weight decay."""
    if wd_on_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def effective_lr(cfg, global_batch: int) -> float:
    """``cfg.lr`` scaled linearly by ``global_batch / cfg.lr_base_batch`` when that is set."""
    return cfg.lr * global_batch / cfg.lr_base_batch if cfg.lr_base_batch else cfg.lr


def build_optimizer(model: nn.Module, cfg, global_batch: int) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.wd_on_norm_and_bias)
    lr = effective_lr(cfg, global_batch)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(cfg, step: int, steps_per_epoch: int, epochs: int) -> float:
    """LR multiplier at optimizer step ``step``: linear warmup, then cosine / multistep / constant."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / warmup
    if cfg.name == "cosine":
        total = max(1, epochs * steps_per_epoch - warmup)
        progress = min(1.0, (step - warmup) / total)
        return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "multistep":
        epoch = step // steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, steps_per_epoch: int, epochs: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch, epochs))

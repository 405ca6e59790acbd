"""The optimizer and the per-step learning-rate schedule, from timm."""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn


def effective_lr(cfg, global_batch: int) -> float:
    """``cfg.lr`` scaled linearly by ``global_batch / cfg.lr_base_batch`` when that is set."""
    return cfg.lr * global_batch / cfg.lr_base_batch if cfg.lr_base_batch else cfg.lr


def create_optimizer(model: nn.Module, cfg, global_batch: int) -> torch.optim.Optimizer:
    """timm's optimizer ``cfg.name`` at the scaled lr; no weight decay on norm and bias parameters
    (timm's ``param_groups_weight_decay``) unless ``cfg.wd_on_norm_and_bias``. Frozen parameters are left out."""
    return create_optimizer_v2(model, opt=cfg.name, lr=effective_lr(cfg, global_batch),
                               weight_decay=cfg.weight_decay, filter_bias_and_bn=not cfg.wd_on_norm_and_bias,
                               **cfg.kwargs)


def create_scheduler(optimizer: torch.optim.Optimizer, cfg, steps_per_epoch: int, epochs: int) -> Scheduler:
    """A timm scheduler stepped per optimizer step (``step_update(global_step)``), as :class:`SchedConfig` says."""
    lr = optimizer.param_groups[0]["lr"]
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    common = {"warmup_t": warmup, "warmup_lr_init": cfg.warmup_start_factor * lr, "t_in_epochs": False}
    if cfg.name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(1, epochs * steps_per_epoch - warmup),
                                 lr_min=cfg.min_lr_factor * lr, warmup_prefix=True, **common)
    milestones = cfg.milestones if cfg.name == "multistep" else []
    # timm applies decay step d at index d - 1, so d = first step of the epoch + 1.
    return MultiStepLRScheduler(optimizer, decay_t=[m * steps_per_epoch + 1 for m in milestones],
                                decay_rate=cfg.gamma, warmup_prefix=False, **common)

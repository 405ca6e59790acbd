"""Classification: Fashion-MNIST / ImageNet / ImageFolder data, a timm model, cross-entropy, top-1/top-5."""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.utils import accuracy
from torch import nn
from torch.utils.data import DataLoader

from ..complexity import complexity
from ..data import Splits, build_datasets, collate_skipping_bad, rank_loaders
from ..models import compconv_model_names, registered_model_names
from .config import ConfigError, TrainConfig
from .engine import Task, compconv_fields, fit
from .state import Runtime, create_state, in_runtime, resume
from .sums import Sums


def build_model(cfg, num_classes: int, in_chans: int, **extra: Any) -> nn.Module:
    """timm model from a :class:`ModelConfig`, with a clear error for unknown names or misplaced options."""
    name = cfg.name
    if not timm.is_model(name):
        raise ConfigError(f"unknown model {name!r}; this package registers {registered_model_names()}, "
                          "and any timm model name works (e.g. resnet50, vgg16)")
    kwargs = dict(cfg.kwargs, num_classes=num_classes, in_chans=in_chans, **extra)
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.compconv is not None:
        if name not in compconv_model_names():
            raise ConfigError(f"model.compconv is set but {name!r} is not a CompConv model; set model.compconv=null")
        kwargs["compconv"] = dict(cfg.compconv)
    return timm.create_model(name, pretrained=False, **kwargs)


def build_loaders(cfg: TrainConfig, rt: Runtime) -> tuple[DataLoader, DataLoader, DataLoader | None, Splits]:
    """Training, validation and (with ``data.val_split``) test loaders split over the ranks, and the splits."""
    splits = build_datasets(cfg.data, cfg.seed)
    train, val = rank_loaders(splits.train, splits.val, cfg.data, cfg.seed, rt.dist.rank, rt.dist.world_size,
                              rt.device, collate_skipping_bad)
    test = None
    if splits.test is not None:
        _, test = rank_loaders(splits.train, splits.test, cfg.data, cfg.seed, rt.dist.rank, rt.dist.world_size,
                               rt.device, collate_skipping_bad)
    return train, val, test, splits


def classification_sums(loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """Loss sum and top-1/top-5 hit counts of one batch as device tensors (``count`` is a host int)."""
    n = targets.numel()
    top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
    hits = torch.stack([top1, top5]).double().mul(n / 100).round()  # timm gives percentages; counts are exact
    return {"loss_sum": loss.detach().double() * n, "correct1": hits[0], "correct5": hits[1], "count": n}


def classification_metrics(sums: Sums) -> dict[str, float]:
    """Mean loss and top-1/top-5 accuracy (percent) from reduced sums."""
    n = max(sums["count"], 1.0)
    return {"loss": sums["loss_sum"] / n, "top1": 100 * sums["correct1"] / n, "top5": 100 * sums["correct5"] / n,
            "images": int(sums["count"]), "skipped_images": int(sums["skipped"])}


def _to_device(images: torch.Tensor, targets: torch.Tensor, rt: Runtime):
    images = images.to(rt.device, non_blocking=True, memory_format=rt.memory_format)
    return images, targets.to(rt.device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, rt: Runtime, max_steps: int | None = None) -> dict[str, float]:
    """Loss and top-1/top-5 of ``model`` on ``loader``, reduced over the ranks."""
    model.eval()
    criterion = nn.CrossEntropyLoss()
    sums = Sums({"count": 0.0, "skipped": 0.0, "loss_sum": 0.0, "correct1": 0.0, "correct5": 0.0})
    for step, (images, targets, skipped) in enumerate(loader):
        if max_steps and step >= max_steps:
            break
        sums.add(skipped=skipped)
        if targets.numel() == 0:
            continue
        images, targets = _to_device(images, targets, rt)
        with rt.autocast():
            logits = model(images)
        logits = logits.float()
        sums.add(**classification_sums(criterion(logits, targets), logits, targets))
    return classification_metrics(sums.reduced(rt.device))


def run_classification(cfg: TrainConfig) -> dict[str, Any]:
    """Trains (or, with ``trainer.eval_only``, evaluates) a classifier; returns the summary it writes."""
    return in_runtime(cfg, _run)


def _run(cfg, rt: Runtime) -> dict[str, Any]:
    train_loader, val_loader, test_loader, splits = build_loaders(cfg, rt)
    model = build_model(cfg.model, splits.num_classes, cfg.data.in_chans)
    cost = complexity(model, (cfg.data.in_chans, cfg.data.img_size, cfg.data.img_size))
    state = create_state(model, cfg, rt, train_loader, (cfg.data.in_chans, cfg.data.img_size, cfg.data.img_size))
    resume(state, cfg, rt)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing)

    def forward(net: nn.Module, batch) -> tuple[torch.Tensor, dict[str, Any]]:
        images, targets, skipped = batch
        images, targets = _to_device(images, targets, rt)
        logits = net(images)
        loss = criterion(logits, targets)
        return loss, {**classification_sums(loss.float(), logits.float(), targets), "skipped": skipped}

    task = Task(
        forward=forward, evaluate=lambda m: evaluate(m, val_loader, rt, cfg.trainer.max_eval_steps),
        train_metrics=classification_metrics, key_metric="top1",
        final_metrics=lambda m: {"top1": m.get("top1"), "top5": m.get("top5"), "val_loss": m.get("loss"),
                                 "val_top1": m.get("top1")},
        test=(lambda m: evaluate(m, test_loader, rt, cfg.trainer.max_eval_steps)) if test_loader is not None else None,
        summary_fields={
            **compconv_fields(model), "dataset": cfg.data.name, "splits": splits.description,
            "img_size": cfg.data.img_size, "in_chans": cfg.data.in_chans, "train_images": len(train_loader.dataset),
            "val_images": len(val_loader.dataset), "test_images": len(test_loader.dataset) if test_loader else None,
            "params": cost.params, "macs": cost.macs, "executed_macs": cost.executed_macs,
            "macs_note": "MACs of one image at the training input size: macs as Figure 2 counts them, executed_macs "
                         "as the model built here runs them"})
    return fit(state, task, cfg, rt, train_loader)

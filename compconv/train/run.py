"""Classification run: Fashion-MNIST / ImageNet / ImageFolder data, a timm model, top-1/top-5."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..complexity import complexity
from ..data import ResumableSampler, build_datasets, collate_skipping_bad, loader_options
from ..models import compconv_model_names, registered_model_names
from .base import TrainingRun
from .config import ConfigError, TrainConfig
from .engine import Sums, classification_metrics, classification_sums


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


class ClassificationRun(TrainingRun):
    """Image classification with cross-entropy (label smoothing optional); reports top-1/top-5."""

    key_metric = "top1"

    def build_data(self) -> None:
        cfg = self.cfg
        options = loader_options(cfg.data.workers, cfg.data.prefetch_factor, self.device)
        train_set, val_set, self.num_classes = build_datasets(cfg.data, cfg.seed)
        self.train_set = train_set
        self.train_sampler = ResumableSampler(len(train_set), self.dist.rank, self.dist.world_size, True, cfg.seed)
        self.train_loader = DataLoader(train_set, cfg.data.batch_size, sampler=self.train_sampler,
                                       collate_fn=collate_skipping_bad, drop_last=True, **options)
        val_sampler = ResumableSampler(len(val_set), self.dist.rank, self.dist.world_size, shuffle=False)
        self.val_loader = DataLoader(val_set, cfg.data.eval_batch_size, sampler=val_sampler,
                                     collate_fn=collate_skipping_bad, **options)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing)
        self.eval_criterion = nn.CrossEntropyLoss()

    def build_model(self) -> nn.Module:
        return build_model(self.cfg.model, self.num_classes, self.cfg.data.in_chans)

    def count_complexity(self) -> tuple[int, int]:
        data = self.cfg.data
        cost = complexity(self.model, (data.in_chans, data.img_size, data.img_size))
        return cost.macs, cost.params

    def _to_device(self, images: torch.Tensor, targets: torch.Tensor):
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return images, targets.to(self.device, non_blocking=True)

    def training_step(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets, skipped = batch
        images, targets = self._to_device(images, targets)
        logits = self.net(images)
        loss = self.criterion(logits, targets)
        return loss, {**classification_sums(loss.float(), logits.float(), targets), "skipped": skipped}

    def train_metrics(self, sums: Sums) -> dict[str, float]:
        return classification_metrics(sums)

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        model = model or self.net
        model.eval()
        sums = Sums({"count": 0.0, "skipped": 0.0, "loss_sum": 0.0, "correct1": 0.0, "correct5": 0.0})
        for step, (images, targets, skipped) in enumerate(self.val_loader):
            if self.cfg.trainer.max_eval_steps and step >= self.cfg.trainer.max_eval_steps:
                break
            sums.add(skipped=skipped)
            if targets.numel() == 0:
                continue
            images, targets = self._to_device(images, targets)
            with self.autocast():
                logits = model(images)
            logits = logits.float()
            sums.add(**classification_sums(self.eval_criterion(logits, targets), logits, targets))
        return classification_metrics(sums.reduced(self.device))

    def summary_fields(self) -> dict[str, Any]:
        report = getattr(self.model, "compconv_report", None)
        options = report.options.as_dict() if report else None
        return {
            "c0": options.get("c0") if options else None, "compconv": options,
            "dataset": self.cfg.data.name, "img_size": self.cfg.data.img_size, "in_chans": self.cfg.data.in_chans,
            "train_images": len(self.train_set), "val_images": len(self.val_loader.dataset),
            "macs_note": "MACs of one image at the training input size",
        }

    def final_metrics(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {"top1": metrics.get("top1"), "top5": metrics.get("top5"), "val_loss": metrics.get("loss")}


def run_classification(cfg: TrainConfig) -> dict[str, Any]:
    """Builds a :class:`ClassificationRun` from a validated config and fits it."""
    return ClassificationRun(cfg).fit()

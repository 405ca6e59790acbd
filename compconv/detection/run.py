"""Detection run: Faster R-CNN + FPN on a CompConv backbone; COCO data; COCOeval box AP."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ..complexity import count_macs
from ..data import EpochSeededDataset, ResumableSampler, loader_options
from ..train.base import TrainingRun
from ..train.distributed import barrier, broadcast_object
from ..train.engine import Sums
from .backbone import build_detector
from .coco import METRIC_NAMES, CocoDetection, coco_results, collate_detection, evaluate_bbox
from .config import DetTrainConfig
from .synth import write_fmnist_detection

_logger = logging.getLogger("compconv.detection")


class DetectionRun(TrainingRun):
    """Faster R-CNN training with the shared loop; evaluation reports COCO box AP (percent)."""

    key_metric = "AP"

    def build_data(self) -> None:
        cfg = self.cfg.data
        root = Path(cfg.root)
        if cfg.name == "fmnist_det" and not (root / cfg.train_ann).is_file():
            if self.dist.is_main:
                _logger.info("writing the Fashion-MNIST detection set to %s", root)
                write_fmnist_detection(root, **(cfg.generate or {}))
            barrier(self.dist)
        train = CocoDetection(root / cfg.train_images, root / cfg.train_ann, True, cfg.hflip, cfg.in_chans,
                              cfg.train_subset, cfg.skip_bad)
        self.val_set = CocoDetection(root / cfg.val_images, root / cfg.val_ann, False, 0.0, cfg.in_chans,
                                     cfg.val_subset, cfg.skip_bad)
        if train.category_ids != self.val_set.category_ids:
            raise FileNotFoundError(f"train and val annotations of {root} list different categories")
        self.num_classes = train.num_classes
        self.train_set = EpochSeededDataset(train, self.cfg.seed)
        self.train_sampler = ResumableSampler(len(train), self.dist.rank, self.dist.world_size, True, self.cfg.seed)
        options = loader_options(cfg.workers, cfg.prefetch_factor, self.device)
        self.train_loader = DataLoader(self.train_set, cfg.batch_size, sampler=self.train_sampler,
                                       collate_fn=collate_detection, drop_last=True, **options)
        val_sampler = ResumableSampler(len(self.val_set), self.dist.rank, self.dist.world_size, shuffle=False)
        self.val_loader = DataLoader(self.val_set, cfg.eval_batch_size, sampler=val_sampler,
                                     collate_fn=collate_detection, **options)

    def build_model(self) -> nn.Module:
        return build_detector(self.cfg.model, self.cfg.head, self.cfg.data, self.num_classes)

    def count_complexity(self) -> tuple[int, int]:
        """MACs of the whole detector and of its backbone body at the evaluation input size (min x max)."""
        data = self.cfg.data
        image = torch.zeros(data.in_chans, data.min_size, data.max_size)
        self.model.eval()
        with torch.no_grad():
            macs, per_module = count_macs(self.model, [image])
        self.model.train()
        self.backbone_macs = per_module.get("backbone.body", 0)
        self.backbone_params = sum(p.numel() for p in self.model.backbone.body.parameters())
        return macs, sum(p.numel() for p in self.model.parameters())

    def _to_device(self, images, targets):
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        return images, targets

    def training_step(self, batch):
        images, targets, skipped = batch
        images, targets = self._to_device(images, targets)
        losses = self.net(images, targets)
        loss = sum(losses.values())
        n = len(images)
        sums = {f"{k}_sum": v.detach().double() * n for k, v in losses.items()}
        return loss, {**sums, "loss_sum": loss.detach().double() * n, "count": n, "skipped": skipped}

    def train_metrics(self, sums: Sums) -> dict[str, float]:
        n = max(sums["count"], 1.0)
        metrics = {key[:-4]: value / n for key, value in sums.values.items() if key.endswith("_sum")}
        return {**metrics, "images": int(sums["count"]), "skipped_images": int(sums["skipped"])}

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        model = model or self.net
        model.eval()
        results, image_ids = [], []
        for step, (images, targets, _) in enumerate(self.val_loader):
            if self.cfg.trainer.max_eval_steps and step >= self.cfg.trainer.max_eval_steps:
                break
            images, targets = self._to_device(images, targets)
            with self.autocast():
                outputs = model(images)
            results += coco_results(outputs, targets, self.val_set.category_ids)
            image_ids += [t["image_id"] for t in targets]
        if self.dist.enabled:
            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, (results, image_ids))
            results = [r for part, _ in gathered for r in part]
            image_ids = [i for _, part in gathered for i in part]
        metrics = None
        if self.dist.is_main:
            metrics = evaluate_bbox(self.val_set.coco, results, image_ids, self.cfg.data.evaluator)
            metrics.update(images=len(image_ids), detections=len(results))
        return broadcast_object(metrics, self.dist)

    def final_metrics(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {name: metrics.get(name) for name in METRIC_NAMES}

    def summary_fields(self) -> dict[str, Any]:
        report = getattr(self.model, "compconv_report", None)
        options = report.options.as_dict() if report else None
        data = self.cfg.data
        return {
            "task": "detection", "c0": options.get("c0") if options else None, "compconv": options,
            "dataset": data.name, "min_size": data.min_size, "max_size": data.max_size,
            "train_images": len(self.train_set), "val_images": len(self.val_set),
            "backbone_params": self.backbone_params, "backbone_macs": self.backbone_macs,
            "backbone_checkpoint": self.cfg.model.backbone_checkpoint,
            "macs_note": f"MACs of the detector (and its backbone body) on one {data.min_size}x{data.max_size} image",
        }


def run_detection(cfg: DetTrainConfig) -> dict[str, Any]:
    """Builds a :class:`DetectionRun` from a validated config and fits it."""
    return DetectionRun(cfg).fit()

"""Detection runs: Faster R-CNN + FPN on a CompConv backbone, COCO-format data, COCOeval box AP, trained by
the loop classification shares (:func:`compconv.train.engine.fit`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ..complexity import count_macs
from ..checks import DeployError
from ..data import EpochSeededDataset, rank_loaders
from ..inference import deploy
from ..train import Runtime, Task, compconv_fields, create_state, fit, resume
from ..train.state import in_runtime
from ..train.distributed import barrier, broadcast_object
from ..train.sums import Sums
from .backbone import build_detector, input_settings
from .coco import METRIC_NAMES, CocoDetection, coco_results, collate_detection, evaluate_bbox
from .config import DetTrainConfig
from .synth import generation_record, write_fmnist_detection

_logger = logging.getLogger("compconv.detection")


def build_loaders(cfg: DetTrainConfig, rt: Runtime) -> tuple[DataLoader, DataLoader, DataLoader | None]:
    """Training, validation and (if the data has a test split) test loaders over the ranks; writes the generated set
    first if it is missing or was written with other arguments."""
    data, root = cfg.data, Path(cfg.data.root)
    test_images, test_ann = data.test_images, data.test_ann
    if data.name == "fmnist_det":
        generate = data.generate or {}
        if generate.get("test_images") and test_images is None:
            test_images, test_ann = "test2017", "annotations/instances_test2017.json"
        if rt.dist.is_main:
            with _set_lock(root):  # runs of a sweep that start together write the set once
                if _needs_writing(root, [data.train_ann, data.val_ann, *([test_ann] if test_ann else [])], generate):
                    _logger.info("writing the Fashion-MNIST detection set to %s", root)
                    write_fmnist_detection(root, **generate)
        barrier(rt.dist)
    train = CocoDetection(root / data.train_images, root / data.train_ann, True, data.hflip, data.in_chans,
                          data.train_subset, data.skip_bad)
    val = CocoDetection(root / data.val_images, root / data.val_ann, False, 0.0, data.in_chans, data.val_subset,
                        data.skip_bad)
    if train.category_ids != val.category_ids:
        raise FileNotFoundError(f"train and val annotations of {root} list different categories")
    train_loader, val_loader = rank_loaders(EpochSeededDataset(train, cfg.seed), val, data, cfg.seed, rt.dist.rank,
                                            rt.dist.world_size, rt.device, collate_detection)
    test_loader = None
    if test_images:
        test = CocoDetection(root / test_images, root / test_ann, False, 0.0, data.in_chans, data.test_subset,
                             data.skip_bad)
        _, test_loader = rank_loaders(EpochSeededDataset(train, cfg.seed), test, data, cfg.seed, rt.dist.rank,
                                      rt.dist.world_size, rt.device, collate_detection)
    return train_loader, val_loader, test_loader


@contextlib.contextmanager
def _set_lock(root: Path):
    """Holds ``root``'s lock file (``fcntl.flock``; other processes wait) while the set is checked or written."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".writing.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _needs_writing(root: Path, annotations: list[str], generate: dict) -> bool:
    """Whether the generated set under ``root`` is missing a file or was written with other arguments."""
    if not all((root / ann).is_file() for ann in annotations):
        return True
    try:
        return json.loads((root / "generate.json").read_text()) != generation_record(**generate)
    except (OSError, ValueError):  # no record: a set of an older version, arguments unknown
        return True


def _to_device(images, targets, rt: Runtime):
    images = [image.to(rt.device, non_blocking=True) for image in images]
    targets = [{k: v.to(rt.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


def detection_forward(net: nn.Module, batch, rt: Runtime) -> tuple[torch.Tensor, dict[str, Any]]:
    """The summed Faster R-CNN losses of one batch, and each loss's sum for the epoch means."""
    images, targets, skipped = batch
    images, targets = _to_device(images, targets, rt)
    losses = net(images, targets)
    loss = sum(losses.values())
    n = len(images)
    sums = {f"{k}_sum": v.detach().double() * n for k, v in losses.items()}
    return loss, {**sums, "loss_sum": loss.detach().double() * n, "count": n, "skipped": skipped}


def detection_metrics(sums: Sums) -> dict[str, float]:
    """Mean of each training loss, and the image counts."""
    n = max(sums["count"], 1.0)
    metrics = {key[:-4]: value / n for key, value in sums.values.items() if key.endswith("_sum")}
    return {**metrics, "images": int(sums["count"]), "skipped_images": int(sums["skipped"])}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, rt: Runtime, evaluator: str = "auto",
             max_steps: int | None = None) -> dict[str, float]:
    """COCO box AP (percent) of ``model`` on ``loader``: detections gathered on rank 0, COCOeval there."""
    model.eval()
    val_set = loader.dataset
    results, image_ids = [], []
    started = time.perf_counter()
    for step, (images, targets, _) in enumerate(loader):
        if max_steps and step >= max_steps:
            break
        images, targets = _to_device(images, targets, rt)
        with rt.autocast():
            outputs = model(images)
        results += coco_results(outputs, targets, val_set.category_ids)
        image_ids += [t["image_id"] for t in targets]
    seconds = time.perf_counter() - started
    if rt.dist.enabled:
        gathered = [None] * rt.dist.world_size
        dist.all_gather_object(gathered, (results, image_ids))
        results = [r for part, _ in gathered for r in part]
        image_ids = [i for _, part in gathered for i in part]
    metrics = None
    if rt.dist.is_main:
        metrics = evaluate_bbox(val_set.coco, results, image_ids, evaluator)
        # the detector's images/s over every rank, data loading included, COCOeval not
        metrics.update(images=len(image_ids), detections=len(results), images_per_s=len(image_ids) / seconds)
    return broadcast_object(metrics, rt.dist)


def run_detection(cfg: DetTrainConfig) -> dict[str, Any]:
    """Trains (or, with ``trainer.eval_only``, evaluates) a detector; returns the summary it writes. The input's
    channels and normalisation follow the backbone checkpoint, if one is given (:func:`input_settings`)."""
    cfg = dataclasses.replace(cfg, data=input_settings(cfg.model, cfg.data))
    return in_runtime(cfg, _run)


def _run(cfg, rt: Runtime) -> dict[str, Any]:
    train_loader, val_loader, test_loader = build_loaders(cfg, rt)
    data = cfg.data
    model = build_detector(cfg.model, cfg.head, data, val_loader.dataset.num_classes)
    model.eval()
    with torch.no_grad():  # MACs of the detector and its backbone body at the evaluation input size
        macs, per_module = count_macs(model, [torch.zeros(data.in_chans, data.min_size, data.max_size)])
    model.train()
    state = create_state(model, cfg, rt, train_loader, (data.in_chans, data.min_size, data.max_size))
    resume(state, cfg, rt)
    task = Task(
        forward=lambda net, batch: detection_forward(net, batch, rt),
        evaluate=lambda m: evaluate(m, val_loader, rt, data.evaluator, cfg.trainer.max_eval_steps),
        train_metrics=detection_metrics, key_metric="AP",
        final_metrics=lambda m: {name: m.get(name) for name in METRIC_NAMES},
        test=(lambda m: test_with_deployed(m, test_loader, rt, data.evaluator, cfg.trainer.max_eval_steps))
        if test_loader is not None else None,
        summary_fields={
            "task": "detection", **compconv_fields(model),
            "dataset": data.name, "min_size": data.min_size, "max_size": data.max_size,
            "train_images": len(train_loader.dataset), "val_images": len(val_loader.dataset),
            "test_images": len(test_loader.dataset) if test_loader is not None else None,
            "generated": data.generate if data.name == "fmnist_det" else None,
            "params": sum(p.numel() for p in model.parameters()), "macs": macs,
            "backbone_params": sum(p.numel() for p in model.backbone.body.parameters()),
            "backbone_macs": per_module.get("backbone.body", 0),
            "backbone_checkpoint": cfg.model.backbone_checkpoint, "backbone_code": backbone_code(cfg.model),
            "macs_note": f"MACs of the detector (and its backbone body) on one {data.min_size}x{data.max_size} image"})
    return fit(state, task, cfg, rt, train_loader)


def test_with_deployed(model: nn.Module, loader: DataLoader, rt: Runtime, evaluator: str = "auto",
                       max_steps: int | None = None) -> dict[str, Any]:
    """Test box AP of ``model`` and of a deployed copy (:func:`compconv.deploy`, checked on the first test images):
    ``AP``..., then ``deployed_AP``... (or ``deployed_error`` when deploy refuses). ``model`` is unchanged."""
    metrics = evaluate(model, loader, rt, evaluator, max_steps)
    deployed = copy.deepcopy(getattr(model, "module", model)).eval()
    images, _, _ = next(iter(loader))
    try:
        deploy(deployed, [image.to(rt.device) for image in images[:2]])
    except DeployError as error:
        _logger.warning("deploy refused the trained detector, so no deployed AP: %s", error)
        return {**metrics, "deployed_error": str(error)}
    deployed_metrics = evaluate(deployed, loader, rt, evaluator, max_steps)
    return {**metrics, **{f"deployed_{name}": deployed_metrics.get(name) for name in (*METRIC_NAMES, "images_per_s")}}


def backbone_code(model_cfg) -> str | None:
    """The commit(s) of the classification run the backbone checkpoint came from (None: no checkpoint, or one
    written before runs recorded their code)."""
    if not model_cfg.backbone_checkpoint:
        return None
    state = torch.load(model_cfg.backbone_checkpoint, map_location="cpu", weights_only=True)
    codes = [segment.get("code") for segment in state.get("segments") or []]
    return None if not codes else codes[0] if len(set(codes)) == 1 else f"{codes[0]}..{codes[-1]}"

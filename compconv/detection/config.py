"""Configuration of a detection run: shares model/optim/sched/trainer/logger with classification."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from ..train.config import ConfigError, ModelConfig, RunConfig, _check_choice, _check_positive


@dataclass
class DetModelConfig(ModelConfig):
    """A classification model config plus the checkpoint (from train_cls.py) that initialises the backbone."""

    backbone_checkpoint: Optional[str] = None


@dataclass
class DetDataConfig:
    """COCO-format detection data: ``root/<images>/`` folders and ``root/annotations/*.json``."""

    name: str = "fmnist_det"
    root: str = "data/fmnist_det"
    train_images: str = "train2017"
    val_images: str = "val2017"
    train_ann: str = "annotations/instances_train2017.json"
    val_ann: str = "annotations/instances_val2017.json"
    in_chans: int = 3
    mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])
    min_size: int = 800
    max_size: int = 1333
    hflip: float = 0.5
    batch_size: int = 2
    eval_batch_size: int = 2
    workers: int = 0
    prefetch_factor: int = 4
    train_subset: Optional[int] = None
    val_subset: Optional[int] = None
    skip_bad: bool = False
    generate: Optional[dict] = None
    evaluator: str = "auto"

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.name", self.name, ("coco", "fmnist_det"))
        for key in ("in_chans", "min_size", "max_size", "batch_size", "eval_batch_size", "train_subset", "val_subset"):
            _check_positive(f"{path}.{key}", getattr(self, key))
        _check_positive(f"{path}.workers", self.workers, allow_zero=True)
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ConfigError(f"{path}.mean and {path}.std need {self.in_chans} values (data.in_chans)")
        _check_choice(f"{path}.evaluator", self.evaluator, ("auto", "pycocotools", "faster_coco_eval"))


@dataclass
class DetHeadConfig:
    """Faster R-CNN + FPN settings (torchvision's defaults where they exist)."""

    fpn_channels: int = 256
    out_indices: list = field(default_factory=lambda: [1, 2, 3, 4])
    trainable_layers: int = 3
    frozen_bn: bool = True
    box_score_thresh: float = 0.05
    detections_per_img: int = 100
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512

    def validate(self, path: str) -> None:
        for key in ("fpn_channels", "detections_per_img", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train",
                    "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test", "box_batch_size_per_image"):
            _check_positive(f"{path}.{key}", getattr(self, key))
        if not 0 <= self.trainable_layers <= 5:
            raise ConfigError(f"{path}.trainable_layers={self.trainable_layers} must be in 0..5")


@dataclass
class DetTrainConfig(RunConfig):
    """A whole detection run."""

    other_task_datasets: ClassVar[dict[str, str]] = {
        name: "classification dataset: use train_cls.py, or data=coco / data=fmnist_det here"
        for name in ("fashion_mnist", "imagenet", "imagefolder")}

    model: DetModelConfig = field(default_factory=DetModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    head: DetHeadConfig = field(default_factory=DetHeadConfig)

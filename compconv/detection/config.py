"""The schema of a detection run: shares optim/sched/trainer/logger with classification."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..train.config import (CLASSIFICATION_DATASETS, DETECTION_DATASETS, ConfigError, ModelConfig, RunConfig,
                            check_choice, check_fraction, check_positive)


@dataclass
class DetModelConfig(ModelConfig):
    """A classification model config plus the checkpoint (a ``last.pt`` of ``train_cls.py`` for the same
    model; no ImageNet CompConv weights exist) that initialises the backbone."""

    backbone_checkpoint: Optional[str] = None


@dataclass
class DetDataConfig:
    """COCO-format detection data (``root/<images>/``, ``root/annotations/*.json``); the defaults are the generated
    Fashion-MNIST set's, written on first use; ``configs/data/coco.yaml`` holds COCO 2017's.
    """

    name: str = "fmnist_det"
    root: str = "data/fmnist_det"
    train_images: str = "train2017"
    val_images: str = "val2017"
    train_ann: str = "annotations/instances_train2017.json"
    val_ann: str = "annotations/instances_val2017.json"
    # a test split, read once after the last epoch (null: none; the generated set has one when
    # data.generate.test_images > 0, in test2017/ and annotations/instances_test2017.json)
    test_images: Optional[str] = None
    test_ann: Optional[str] = None
    test_subset: Optional[int] = None
    # null: the backbone checkpoint's (model.backbone_checkpoint), else 3 channels and the generated set's statistics
    in_chans: Optional[int] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    min_size: int = 128  # the canvases are used at their size
    max_size: int = 128
    hflip: float = 0.5
    batch_size: int = 8  # per process
    eval_batch_size: int = 16
    workers: int = 0
    prefetch_factor: int = 4
    train_subset: Optional[int] = None
    val_subset: Optional[int] = None
    skip_bad: bool = False
    generate: Optional[dict[str, Any]] = field(
        default_factory=lambda: {"train_images": 400, "val_images": 100, "test_images": 0, "canvas": 128, "seed": 0})
    evaluator: str = "auto"  # auto (faster_coco_eval when installed) | pycocotools | faster_coco_eval

    def __post_init__(self) -> None:
        if self.name in CLASSIFICATION_DATASETS:
            raise ConfigError(f"data={self.name} is a classification dataset: use train_cls.py, or "
                              "data=coco / data=fmnist_det here")
        check_choice("data.name", self.name, DETECTION_DATASETS)
        if self.name == "coco" and self.root == DetDataConfig.root:
            raise ConfigError("missing required value data.root for data=coco: pass data.root=/path/to/coco")
        for key in ("in_chans", "min_size", "max_size", "batch_size", "eval_batch_size", "train_subset",
                    "val_subset", "test_subset", "prefetch_factor"):
            check_positive(f"data.{key}", getattr(self, key))
        check_positive("data.workers", self.workers, allow_zero=True)
        check_fraction("data.hflip", self.hflip)
        channels = self.in_chans or len(self.mean or self.std or ()) or None
        if channels is not None and any(v is not None and len(v) != channels for v in (self.mean, self.std)):
            raise ConfigError(f"data.mean and data.std need {channels} values (data.in_chans)")
        check_choice("data.evaluator", self.evaluator, ("auto", "pycocotools", "faster_coco_eval"))


@dataclass
class DetHeadConfig:
    """Faster R-CNN + FPN with torchvision's defaults (COCO); ``head=frcnn_fpn_small`` for small images.

    Attributes:
        out_indices: timm feature levels (strides 4, 8, 16, 32 for ResNets).
        trainable_layers: Backbone stages trained, deepest first (3, as torchvision: stem and layer1 frozen).
        frozen_bn: BatchNorm of the backbone frozen (timm's ``freeze_batch_norm_2d``).
    """

    fpn_channels: int = 256
    out_indices: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    trainable_layers: int = 3
    frozen_bn: bool = True
    box_score_thresh: float = 0.05
    detections_per_img: int = 100
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    box_representation_size: int = 1024  # the box head's two fully connected layers (torchvision: 1024)

    def __post_init__(self) -> None:
        for key in ("fpn_channels", "detections_per_img", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train",
                    "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test", "box_batch_size_per_image",
                    "box_representation_size"):
            check_positive(f"head.{key}", getattr(self, key))
        if not 0 <= self.trainable_layers <= 5:
            raise ConfigError(f"head.trainable_layers={self.trainable_layers} must be in 0..5")


@dataclass
class DetTrainConfig(RunConfig):
    """A whole detection run (``train_det.py``)."""

    model: DetModelConfig = field(default_factory=DetModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    head: DetHeadConfig = field(default_factory=DetHeadConfig)

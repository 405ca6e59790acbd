"""Detection: Faster R-CNN + FPN on CompConv backbones, COCO data and metrics, a small real set.
Nothing here imports Hydra, wandb or mmdetection (``compconv.integrations.mmdet`` is the latter).
"""

from .backbone import TimmFPNBackbone, build_detector
from .coco import CocoDetection, evaluate_bbox, load_coco
from .config import DetTrainConfig
from .run import build_loaders, evaluate, run_detection
from .synth import write_fmnist_detection

__all__ = ["CocoDetection", "DetTrainConfig", "TimmFPNBackbone", "build_detector", "build_loaders", "evaluate", "evaluate_bbox",
           "load_coco", "run_detection", "write_fmnist_detection"]

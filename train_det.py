#!/usr/bin/env python
"""Detection training (Hydra entry point): Faster R-CNN + FPN on a (CompConv) timm backbone.

    python train_det.py model=resnet50_compconv128                  # generated Fashion-MNIST detection set
    torchrun --nproc_per_node=8 train_det.py experiment=coco_frcnn_1x data.root=/datasets/coco \\
        model=resnet50_compconv128 model.backbone_checkpoint=/runs/imagenet/resnet50_compconv128/last.pt
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from entrypoints import exit_on_config_error, register_configs, run_hydra_job
from compconv.detection import DetTrainConfig, run_detection

register_configs("train_det", DetTrainConfig)


@hydra.main(version_base="1.3", config_path="configs", config_name="train_det")
def main(cfg: DictConfig) -> float | None:
    return run_hydra_job(cfg, run_detection).get("AP")


if __name__ == "__main__":
    exit_on_config_error(main)

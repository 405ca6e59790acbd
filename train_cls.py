#!/usr/bin/env python
"""Classification training (Hydra entry point). See README.md and configs/train_cls.yaml.

    python train_cls.py model=resnet50_compconv128
    torchrun --nproc_per_node=8 train_cls.py experiment=imagenet_r50 data.root=/datasets/imagenet
    python train_cls.py -m launcher=slurm model=resnet50,resnet50_compconv64,resnet50_compconv128
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from entrypoints import exit_on_config_error, register_configs, run_hydra_job
from compconv.train import TrainConfig, run_classification

register_configs("train_cls", TrainConfig)


@hydra.main(version_base="1.3", config_path="configs", config_name="train_cls")
def main(cfg: DictConfig) -> float | None:
    return run_hydra_job(cfg, run_classification).get("top1")


if __name__ == "__main__":
    exit_on_config_error(main)

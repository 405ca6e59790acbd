"""Training: config schema, data loading, loop, checkpoints, distributed helpers and loggers.

Nothing here imports Hydra; wandb is imported only when a wandb logger is created.
"""

from .base import TrainingRun
from .config import ConfigError, TrainConfig
from .run import ClassificationRun, build_model, run_classification

__all__ = ["ClassificationRun", "ConfigError", "TrainConfig", "TrainingRun", "build_model", "run_classification"]

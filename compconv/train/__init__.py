"""Training: config schema, runtime and state, the shared loop, checkpoints, distributed helpers, loggers.
Nothing here imports Hydra; wandb is imported only when a wandb logger is created.
"""

from .classification import build_model, evaluate, run_classification
from .config import ConfigError, TrainConfig
from .engine import NonFiniteLossError, Task, compconv_fields, fit, train_one_epoch
from .state import Runtime, TrainState, create_state, resume, setup_runtime

__all__ = ["ConfigError", "NonFiniteLossError", "Runtime", "Task", "TrainConfig", "TrainState", "build_model", "compconv_fields",
           "create_state", "evaluate", "fit", "resume", "run_classification", "setup_runtime", "train_one_epoch"]

"""Glue between a Hydra entry point and the library: resolve, validate, run, fail cleanly.

Only the entry points call this; OmegaConf and Hydra are imported inside the function, so the
library stays importable without them.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

from .data import DataError, UnreadableImageError
from .train.base import NonFiniteLossError
from .train.checkpoint import CheckpointError, CheckpointMismatchError
from .train.config import ConfigError

_logger = logging.getLogger("compconv")
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, UnreadableImageError, CheckpointMismatchError,
               CheckpointError)
EXIT_BAD_INPUT, EXIT_DIVERGED = 2, 3


def run_hydra_job(cfg: Any, schema: type, runner: Callable[[Any], dict]) -> dict:
    """Validates a composed Hydra config against ``schema`` and calls ``runner``.

    A bad configuration or input (unknown key, invalid value, missing data, unreadable image,
    checkpoint of another model, no checkpoint that loads) is reported in one ``error:`` line and
    exits with status 2; a diverged run (non-finite loss) likewise with status 3.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
        script = sys.argv[0].rsplit("/", 1)[-1]
        values["command"] = " ".join(["python", script, *overrides])
        config = schema.from_dict(values)
        return runner(config)
    except MissingMandatoryValue as error:
        key = getattr(error, "full_key", "") or str(error)
        _fail(f"missing required value {key}: pass {key}=... on the command line")
    except USER_ERRORS as error:
        _fail(f"{type(error).__name__}: {error}")
    except NonFiniteLossError as error:
        _fail(f"{type(error).__name__}: {error}", EXIT_DIVERGED)
    raise AssertionError("unreachable")


def _fail(message: str, status: int = EXIT_BAD_INPUT) -> None:
    if os.environ.get("RANK", "0") == "0":  # one line per run, not one per process
        _logger.error(message)
        print(f"error: {message}", file=sys.stderr)
    sys.exit(status)

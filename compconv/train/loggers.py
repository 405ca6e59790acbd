"""Run loggers. wandb is imported lazily, and a wandb failure never stops training."""

from __future__ import annotations

import logging
import os
from typing import Any

_logger = logging.getLogger(__name__)


class NullLogger:
    """Logs nothing (``logger=none``)."""

    run_dir: str | None = None
    run_id: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    """Weights & Biases logger, offline unless ``mode='online'`` or WANDB_MODE says otherwise."""

    def __init__(self, cfg, run_dir: str, config: dict[str, Any], name: str, resume_id: str | None = None) -> None:
        self._run = None
        try:
            import wandb

            mode = os.environ.get("WANDB_MODE", cfg.mode)
            self._run = wandb.init(
                project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags), name=name,
                config=config, dir=run_dir, mode=mode, id=resume_id, resume="allow" if resume_id else None,
                settings=wandb.Settings(console="off", x_disable_stats=True),
            )
            self.run_dir = self._run.dir
        except Exception as error:  # logging must never stop training
            _logger.warning("wandb disabled: %s", error)
            self._run = None

    @property
    def run_id(self) -> str | None:
        return self._run.id if self._run is not None else None

    def _guard(self, action: str, call) -> None:
        if self._run is None:
            return
        try:
            call()
        except Exception as error:
            _logger.warning("wandb %s failed, disabling it: %s", action, error)
            self._run = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._guard("log", lambda: self._run.log(metrics, step=step))

    def summary(self, values: dict[str, Any]) -> None:
        self._guard("summary", lambda: self._run.summary.update(values))

    def finish(self) -> None:
        self._guard("finish", lambda: self._run.finish())

"""Run loggers. wandb is imported lazily, and a wandb failure never stops training, unless the storage
of the run directory failed (then the run ends with a :class:`compconv.io.StorageError`: a full disk
is not wandb's problem, and the checkpoint after it would fail as well)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..io import STORAGE_ERRNOS, StorageError, storage_errno

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
            _raise_if_storage(error, Path(run_dir) / "wandb")
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
            _raise_if_storage(error, Path(self.run_dir or "."))
            _logger.warning("wandb %s failed, disabling it: %s", action, error)
            self._run = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._guard("log", lambda: self._run.log(metrics, step=step))

    def summary(self, values: dict[str, Any]) -> None:
        self._guard("summary", lambda: self._run.summary.update(values))

    def finish(self) -> None:
        self._guard("finish", lambda: self._run.finish())


def _raise_if_storage(error: Exception, where: Path) -> None:
    code = storage_errno(error)
    if code is None:  # wandb often wraps the OSError into its own errors, keeping only the text
        text = str(error).lower()
        code = next((c for c, reason in STORAGE_ERRNOS.items() if reason in text), None)
    if code is not None:
        raise StorageError(where, code, str(error).splitlines()[0] if str(error) else type(error).__name__) from error

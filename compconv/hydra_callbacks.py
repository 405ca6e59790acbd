"""Hydra callbacks of the entry points (configured under ``hydra.callbacks`` in ``configs/train_*.yaml``).

:class:`RunDirLock` takes the run directory's lock (:func:`compconv.train.rundir.lock_run_dir`) before
Hydra writes anything there (``.hydra/``, the log), so a second run on a live run's directory stops
with one line and leaves it as it was. Multirun jobs each lock their own subdirectory.
"""

from __future__ import annotations

import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .cli import EXIT_STORAGE, fail
from .io import StorageError
from .train.rundir import RunDirInUseError, lock_run_dir


def launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun's RANK, srun's SLURM_PROCID), else 0."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


class RunDirLock(Callback):
    """Locks ``hydra.run.dir`` (or a multirun job's directory) on rank 0 for the life of the job."""

    def __init__(self) -> None:
        self._lock = None

    def _take(self, run_dir: Any) -> None:
        if launch_rank() != 0 or run_dir is None:
            return
        try:
            self._lock = lock_run_dir(os.path.abspath(str(run_dir)))
        except RunDirInUseError as error:
            fail(str(error), log=False)
        except OSError as error:
            fail(str(StorageError(os.path.join(str(run_dir), ".run.lock"), error.errno, str(error))),
                 EXIT_STORAGE, log=False)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._take(OmegaConf.select(config, "hydra.run.dir"))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._take(OmegaConf.select(config, "hydra.runtime.output_dir"))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

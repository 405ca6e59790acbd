"""What the Hydra entry points share: register the schema, run, fail in one line, lock the run directory.

``train_cls.py`` and ``train_det.py`` call this; the library (``compconv/``) imports neither Hydra nor this.
``RunDirLock`` is the Hydra callback of ``configs/hydra/default.yaml``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Callable

from compconv.data import DataError, UnreadableImageError
from compconv.efficient import TrainingFormError
from compconv.io import StorageError, as_storage_error, storage_errno
from compconv.train.checkpoint import CheckpointError, CheckpointMismatchError, kept_checkpoint
from compconv.models import compconv_model_names, registered_model_names, variant_base, variant_options
from compconv.train.config import DETECTION_DATASETS, ConfigError
from compconv.train.engine import NonFiniteLossError
from compconv.train.rundir import RunDirInUseError, lock_run_dir

_logger = logging.getLogger("compconv")
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, UnreadableImageError, CheckpointMismatchError,
               CheckpointError, TrainingFormError)
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_STORAGE = 2, 3, 4
_task_started = False  # set once Hydra has composed the config and called the task


def model_options() -> dict[str, dict[str, Any]]:
    """The ``model=`` options: every model this package registers and the timm model each one patches.

    A CompConv model's option lists its full CompConv options (so ``model.compconv.c0=256`` works);
    a baseline's and the Ghost peer's set only the name.
    """
    import timm

    options: dict[str, dict[str, Any]] = {}
    for name in registered_model_names():
        base = variant_base(name) or name.rsplit("_", 1)[0]
        if timm.is_model(base):
            options[base] = {"name": base}
        options[name] = {"name": name}
        if name in compconv_model_names():
            options[name]["compconv"] = variant_options(name)
    return dict(sorted(options.items()))


def init_label(backbone_checkpoint: Any = None) -> str:
    """How a detection run's backbone starts, for its directory name: ``pre`` (a checkpoint) or ``scratch``."""
    return "pre" if backbone_checkpoint else "scratch"


def register_configs(config_name: str, schema: type) -> None:
    """Registers ``schema`` as ``<config_name>_schema`` and every registered model as a ``model=`` option.

    The primary config (``configs/<config_name>.yaml``) lists the schema first in its defaults, so every
    group option and command-line override is merged into typed fields: a wrong type or an unknown key
    fails while composing, and the YAML files hold only what differs from the schema's defaults.
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from compconv.models import model_label

    def label(name: str, compconv: Any = None) -> str:
        options = OmegaConf.to_container(compconv) if OmegaConf.is_config(compconv) else compconv
        return model_label(name, options)

    OmegaConf.register_new_resolver("model_label", label, replace=True)  # run directories name the options
    OmegaConf.register_new_resolver("init_label", init_label, replace=True)
    store = ConfigStore.instance()
    store.store(name=f"{config_name}_schema", node=schema)
    for name, node in model_options().items():
        store.store(group="model", name=name, node=node)


def run_hydra_job(cfg: Any, runner: Callable[[Any], dict]) -> dict:
    """Builds the typed config from a composed Hydra config and calls ``runner`` with it.

    A bad configuration or input (invalid value, missing or damaged data, unreadable image, checkpoint
    of another model, no checkpoint that loads, a run directory another run holds) is reported in one
    ``error:`` line with exit status 2; a diverged run (non-finite loss) likewise with status 3; a
    storage failure (full disk, quota, I/O error, read-only) with status 4, naming the file, the cause
    and the newest checkpoint that survived.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    global _task_started
    _task_started = True
    try:
        hydra = HydraConfig.get() if HydraConfig.initialized() else None
        overrides = hydra.overrides.task if hydra else []
        # the entry point, not sys.argv[0]: a SLURM or submitit job runs as submitit's _submit.py
        script = f"{hydra.job.name}.py" if hydra and hydra.job.name in ("train_cls", "train_det") else _script()
        cfg.command = " ".join(["python", script, *overrides])
        # merging into a fresh schema also refuses keys added with +key=value
        values = OmegaConf.to_container(cfg, resolve=True)
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OmegaConf.get_type(cfg)), values))
        return runner(config)
    except MissingMandatoryValue as error:
        key = getattr(error, "full_key", "") or str(error)
        fail(f"missing required value {key}: pass {key}=... on the command line")
    except OmegaConfBaseException as error:
        fail(describe_config_error(error))
    except RunDirInUseError as error:
        fail(str(error), log=False)  # the log file is the other run's
    except USER_ERRORS as error:
        fail(f"{type(error).__name__}: {error_message(error)}")
    except NonFiniteLossError as error:
        fail(f"{type(error).__name__}: {error}", EXIT_DIVERGED)
    except StorageError as error:
        fail_storage(error, _run_dir(cfg))
    except Exception as error:
        if storage_errno(error) is None:
            raise
        fail_storage(StorageError(getattr(error, "filename", None) or "the run directory", storage_errno(error),
                                  str(error)), _run_dir(cfg))
    raise AssertionError("unreachable")


def error_message(error: BaseException) -> str:
    """The message of ``error``; for an error re-raised from a DataLoader worker (whose message is the
    worker's whole traceback), the original message only."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def _run_dir(cfg: Any) -> str | None:
    try:
        return str(cfg.run_dir)
    except Exception:  # an unresolvable config has no run directory yet
        return None


def fail_storage(error: StorageError, run_dir: str | None) -> None:
    """Exits with :data:`EXIT_STORAGE` and one line: the file, the cause, what survived, the fix.

    Nothing is written to the run's log (the disk that failed is usually the log's too).
    """
    if error.kept is None and run_dir is not None:
        error.kept = kept_checkpoint(run_dir)
    fail(str(error), EXIT_STORAGE, log=False)


def exit_on_config_error(main: Callable[[], Any]) -> None:
    """Calls a ``@hydra.main`` function; a composition error (unknown key or option, wrong type, bad
    override syntax) becomes one ``error:`` line and exit status 2 instead of Hydra's report."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises composition errors instead of printing them
    try:
        main()
    except (HydraException, OmegaConfBaseException) as error:  # before OSError: MissingConfigException is one
        fail(describe_config_error(error), log=False)
    except OSError as error:  # Hydra writing .hydra/ or the log before the task starts
        if storage_errno(error) is None:
            raise
        fail(str(StorageError(error.filename or "the run directory", storage_errno(error), str(error))),
             EXIT_STORAGE, log=False)
    except AssertionError as error:  # OmegaConf's reply to setting a key below a null value
        if _task_started:
            raise
        fail(f"cannot apply the overrides ({error}): a key below a null value cannot be set, e.g. model.compconv.c0 "
             "of a baseline model; pick a CompConv model or pass the whole mapping, model.compconv={c0: 64}", log=False)


def describe_config_error(error: BaseException) -> str:
    """One line for a Hydra or OmegaConf composition error: the key or option, and what to do."""
    from hydra.errors import MissingConfigException

    if isinstance(error, MissingConfigException) and error.options:
        group, _, wanted = (error.missing_cfg_file or "").rpartition("/")
        hint = " (or model.name=<any timm model>)" if group == "model" else ""
        return f"{group}={wanted} is not an option; choose one of {sorted(error.options)}{hint}"
    text = str(error)
    cause = error.__cause__ or error
    key = getattr(cause, "full_key", None) or next(iter(re.findall(r"full_key: (\S+)", text)), None)
    option = re.search(r"In '(\w+)/(\w+)'", text)
    if option and option.groups()[0] == "data" and ("not in 'DataConfig'" in text or "not in 'DetDataConfig'" in text):
        name = option.groups()[1]
        kind, script = ("detection", "train_det.py") if name in DETECTION_DATASETS else ("classification", "train_cls.py")
        return f"data={name} is a {kind} dataset: use {script}"
    if key and re.search(r"Key '[^']+' not in|Could not override", text + str(cause)):
        return f"unknown config key {key}; the valid keys and their defaults: python {_script()} --cfg job"
    reason = str(getattr(cause, "msg", None) or cause).strip().splitlines()[0]
    return f"{key}: {reason}" if key else " ".join(text.split())


def _script() -> str:
    return sys.argv[0].rsplit("/", 1)[-1]


def fail(message: str, status: int = EXIT_BAD_INPUT, log: bool = True) -> None:
    """Prints ``error: <message>`` once per run (rank 0), also to the run's log, and exits with ``status``."""
    if os.environ.get("RANK", "0") == "0":
        if log:
            _logger.error(message)
        print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


try:  # the Hydra callback; the entry points need Hydra anyway
    from hydra.experimental.callback import Callback
    from omegaconf import DictConfig, OmegaConf
except ImportError:  # pragma: no cover - Hydra missing: the entry points say so when they import it
    Callback, DictConfig, OmegaConf = object, dict, None


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


class StrictFileHandler(logging.FileHandler):
    """A ``logging.FileHandler`` whose storage failures end the run as a :class:`StorageError`.

    logging's default prints a ``--- Logging error ---`` traceback for every record it cannot write
    and goes on; on a full disk that buries the one line that matters. The entry points use this
    class for the run's log file (``hydra.job_logging.handlers.file.class``).
    """

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        error = sys.exc_info()[1]
        storage = as_storage_error(error, self.baseFilename) if error is not None else None
        if storage is None:
            super().handleError(record)
            return
        for logger in (logging.getLogger(), *logging.Logger.manager.loggerDict.values()):
            if isinstance(logger, logging.Logger) and self in logger.handlers:
                logger.removeHandler(self)  # later records must not fail (and raise) again
        try:
            self.close()
        except OSError:
            pass
        raise storage

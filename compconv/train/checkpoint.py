"""Checkpoints: ``last.pt``, ``prev.pt`` and ``best.pt``, written atomically; resume loads the newest one
that loads, warning about each newer one that does not.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import StorageError, atomic_write, free_bytes

_logger = logging.getLogger(__name__)
LAST, PREVIOUS, BEST = "last.pt", "prev.pt", "best.pt"
LOW_SPACE_FACTOR = 2  # warn before a save when less than this many checkpoints' worth of space is free
_warned_low_space: set[str] = set()


# the config keys that change what a run computes: an automatic resume continues a checkpoint only if they agree
# (trainer.epochs is not one of them: raising it and resuming extends a run)
RUN_DEFINING = ("seed", "model", "optim", "sched", "data.name", "data.img_size", "data.in_chans", "data.num_classes",
                "data.mean", "data.std", "data.batch_size", "data.train_subset", "data.crop_padding", "data.hflip",
                "data.crop_pct", "data.interpolation", "data.color_jitter", "data.val_split", "data.split_seed",
                "trainer.amp", "trainer.clip_grad",
                "trainer.label_smoothing", "trainer.ema_decay")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint belongs to another model, architecture or run configuration."""


class CheckpointError(RuntimeError):
    """No checkpoint to resume from could be loaded."""


def model_signature(model: nn.Module) -> str:
    """Hash of the state-dict keys and shapes: equal for two builds of the same architecture."""
    text = ";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Writes ``state`` with ``torch.save`` to a temporary file, then renames it over ``path``."""
    return atomic_write(path, lambda f: torch.save(state, f), mode="wb")


def save_rotating(run_dir: str | Path, state: dict[str, Any], is_best: bool = False) -> Path:
    """Writes ``run_dir/last.pt``, keeping the one it replaces as ``prev.pt`` (renamed first, so a complete
    checkpoint always exists), and copies it to ``best.pt`` if best.
    """
    run_dir = Path(run_dir)
    last = run_dir / LAST
    try:
        if last.is_file():
            warn_if_low_space(run_dir, last.stat().st_size)
            os.replace(last, run_dir / PREVIOUS)
        save_checkpoint(last, state)
        if is_best:
            def copy_last(handle) -> None:
                with open(last, "rb") as source:
                    shutil.copyfileobj(source, handle)

            atomic_write(run_dir / BEST, copy_last, mode="wb")
    except StorageError as error:
        error.kept = error.kept or kept_checkpoint(run_dir)
        raise
    return last


def warn_if_low_space(run_dir: Path, checkpoint_bytes: int) -> None:
    """Warns once per run directory when less than about twice a checkpoint's size is free there."""
    free = free_bytes(run_dir)
    key = os.path.realpath(run_dir)
    if free < LOW_SPACE_FACTOR * checkpoint_bytes and key not in _warned_low_space:
        _warned_low_space.add(key)
        _logger.warning("only %.0f MiB free in %s, less than %d checkpoints of %.0f MiB: the next saves may fail; "
                        "free space", free / 2**20, run_dir, LOW_SPACE_FACTOR, checkpoint_bytes / 2**20)


def kept_checkpoint(run_dir: str | Path) -> str:
    """What a failed save left to resume from: ``kept <path> (epoch E, step S)``, the newest that loads."""
    for path in resume_candidates(run_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return f"kept {path} (epoch {state['epoch']}, step {state['step_in_epoch']})"
        except Exception:  # a damaged file is not what survived
            continue
    return "no checkpoint was kept"


def load_checkpoint(path: str | Path, model_name: str, model: nn.Module) -> dict[str, Any]:
    """Loads a training checkpoint and checks it belongs to ``model``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointMismatchError: the checkpoint was written for another model or architecture.
        Exception: whatever ``torch.load`` raises for a damaged file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (trainer.resume=auto|never|<path>)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError("not a checkpoint of this project (no 'model' entry)")
    saved_name, saved_sig = state.get("model_name"), state.get("model_signature")
    if saved_name != model_name or saved_sig != model_signature(model):
        raise CheckpointMismatchError(
            f"checkpoint {path} was saved from model '{saved_name}' (signature {saved_sig}) but this run builds "
            f"'{model_name}' (signature {model_signature(model)}); pass the matching model=... or another checkpoint"
        )
    return state


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for each :data:`RUN_DEFINING` key whose value differs between a checkpoint's
    config and this run's (a key either config lacks, as an older checkpoint may, is not compared)."""
    missing = object()

    def lookup(config: dict[str, Any], key: str) -> Any:
        for part in key.split("."):
            config = config.get(part, missing) if isinstance(config, dict) else missing
        return config

    changes = []
    for key in RUN_DEFINING:
        before, now = lookup(saved, key), lookup(current, key)
        if before is not missing and now is not missing and before != now:
            changes.append(f"{key}: {before!r} -> {now!r}")
    return changes


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """``last.pt``, ``prev.pt`` and ``best.pt`` of a run directory that exist, newest first."""
    paths = [Path(run_dir) / name for name in (LAST, PREVIOUS, BEST)]
    return sorted((p for p in paths if p.is_file()), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def load_newest(paths: list[Path], model_name: str, model: nn.Module) -> tuple[dict[str, Any], Path] | None:
    """The first of ``paths`` (newest first) that loads, warning about each damaged one before it.

    Returns None when none of them exists.

    Raises:
        CheckpointError: files exist but none loads (each named with its error).
        CheckpointMismatchError: a file loads but belongs to another model.
    """
    failures = []
    for path in paths:
        if not path.is_file():
            continue
        try:
            state = load_checkpoint(path, model_name, model)
        except CheckpointMismatchError:
            raise
        except Exception as error:  # torch.load raises RuntimeError, EOFError, pickle or zip errors on damage
            text = str(error).splitlines()[0].split(". ")[0] if str(error) else "unreadable"
            reason = f"{type(error).__name__}: {text}"
            failures.append(f"{path} ({reason})")
            _logger.warning("checkpoint %s does not load (%s); trying an older one", path, reason)
            continue
        if failures:
            _logger.warning("resuming from %s instead of the damaged %s", path, ", ".join(failures))
        return state, path
    if failures:
        raise CheckpointError(f"no checkpoint loads: {'; '.join(failures)}. Move them away to start afresh, "
                              "or pass trainer.resume=never or trainer.resume=<a good checkpoint>")
    return None

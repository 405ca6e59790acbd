"""Checkpoints: written atomically, loaded with ``weights_only=True``, refused when from another model."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import atomic_write


class CheckpointMismatchError(RuntimeError):
    pass


def model_signature(model: nn.Module) -> str:
    """Hash of the state-dict keys and shapes: equal for two builds of the same architecture."""
    text = ";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Writes ``state`` with ``torch.save`` to a temporary file, then renames it over ``path``."""
    return atomic_write(path, lambda f: torch.save(state, f), mode="wb")


def load_checkpoint(path: str | Path, model_name: str, model: nn.Module) -> dict[str, Any]:
    """Loads a training checkpoint and checks it belongs to ``model``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointMismatchError: the checkpoint was written for another model or architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (trainer.resume=auto|never|<path>)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved_name, saved_sig = state.get("model_name"), state.get("model_signature")
    if saved_name != model_name or saved_sig != model_signature(model):
        raise CheckpointMismatchError(
            f"checkpoint {path} was saved from model '{saved_name}' (signature {saved_sig}) but this run builds "
            f"'{model_name}' (signature {model_signature(model)}); pass the matching model=... or another checkpoint"
        )
    return state

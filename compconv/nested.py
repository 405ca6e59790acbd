"""Tensors inside a model's nested inputs and outputs (dicts, lists, tuples), without torch's private pytree."""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["leaves", "map_tensors", "tensors"]


def leaves(value: Any) -> list[Any]:
    """Every leaf of ``value`` (what is not a dict, list or tuple), in order; dict values in stored order."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in leaves(item)]
    return [value]


def tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value`` (a tensor, or dicts, lists and tuples of them), in :func:`leaves` order."""
    return [leaf for leaf in leaves(value) if isinstance(leaf, torch.Tensor)]


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (same nesting and container types)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return type(value)((k, map_tensors(fn, v)) for k, v in value.items())
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(map_tensors(fn, v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(fn, v) for v in value)
    return value

"""Tensors inside a model's nested inputs and outputs (dicts, lists, tuples), without torch's private pytree."""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["map_tensors", "tensors"]


def tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value`` (a tensor, or dicts, lists and tuples of them, in order; dict values by key
    order as stored)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors(item)]
    return []


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

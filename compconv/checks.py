"""How this package checks that a rewrite kept a model's outputs: one relative error, one tolerance per dtype,
one error for a refused rewrite. :meth:`compconv.CompConv2d.fuse`, :func:`compconv.deploy`,
:func:`compconv.export_onnx` and the training-form check all measure with :func:`relative_error`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .nested import tensors

__all__ = ["DeployError", "RTOL_FP32", "RTOL_HALF", "relative_error", "tolerance_for"]

RTOL_FP32, RTOL_HALF = 1e-4, 2e-2  # largest |rewritten - original| accepted, relative to max |original output|


class DeployError(RuntimeError):
    """A rewritten model's (or layer's) outputs differ from the original's; the original was not changed."""


def tolerance_for(dtype: torch.dtype) -> float:
    """The accepted relative error of a rewritten model computing in ``dtype``."""
    return RTOL_HALF if dtype in (torch.float16, torch.bfloat16) else RTOL_FP32


def relative_error(got: Any, want: Any, floor: float = 1e-12) -> float:
    """``max |got - want| / max(max |want|, floor)``, the worst over the tensors of two nested outputs (tensors,
    dicts, lists, tuples); ``inf`` where their structure or shapes differ or a difference is not finite.
    """
    got, want = tensors(got), tensors(want)
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return math.inf
    worst = 0.0
    for g, w in zip(got, want):
        if not w.numel():
            continue
        scale = float(w.detach().abs().max())
        error = float((g.detach().double() - w.detach().double()).abs().max())
        worst = max(worst, error / max(scale, floor) if math.isfinite(error) else math.inf)
    return worst

"""MACs and parameters: multiply-accumulates of convolutions and linear layers (the paper's "FLOPs"), counted
with ``torch.utils.flop_counter.FlopCounterMode`` and divided by 2; norms and elementwise ops are not counted.

Two counts where they differ: Figure 2's (every CompConv as the paper draws it: what the paper's FLOPs mean) and
the executed count (what the model built here runs: the training fast path computes some 1x1 layers as one dense
GEMM, which any FLOP counter, fvcore's or timm's, sees). A model built with ``efficient=False`` runs Figure 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .efficient import figure2_forms
from .ghost import GhostConv2d
from .layers import CompConv2d

__all__ = ["ComplexityReport", "LayerCost", "complexity", "count_macs"]

_COMPOUND = (CompConv2d, GhostConv2d)  # reported as one layer
_LAYER_TYPES = (nn.Conv2d, nn.Linear, *_COMPOUND)


@dataclass(frozen=True)
class LayerCost:
    name: str
    type: str
    macs: int
    params: int


@dataclass
class ComplexityReport:
    """MACs (batch 1) and parameters of a model at one input size.

    Attributes:
        input_size: (C, H, W) of the counted forward pass.
        macs: Total MACs of one image with every CompConv as Figure 2 draws it (the paper's count).
        params: Total parameters (unique tensors).
        module_macs: MACs of every module that ran a counted op, by qualified name ("" = model).
        layers: One row per conv / linear / CompConv2d layer (the layers a patch acts on).
        activations: Output elements of every conv and linear op of one image (as timm's benchmark reports
            beside MACs: they predict memory traffic, and so GPU speed, better than MACs do).
        executed_macs: Total MACs of one image as the model runs them (the fast path's forms, see the module
            doc); equal to ``macs`` for a model without :class:`compconv.EfficientCompConv2d` layers.
    """

    input_size: tuple[int, int, int]
    macs: int
    params: int
    module_macs: dict[str, int] = field(default_factory=dict)
    layers: list[LayerCost] = field(default_factory=list)
    activations: int = 0
    executed_macs: int = 0

    def macs_of(self, prefix: str) -> int:
        """MACs of the module called ``prefix`` (e.g. ``layer3``), 0 if it ran no counted op."""
        return self.module_macs.get(prefix, 0)


def count_macs(model: nn.Module, inputs: torch.Tensor, figure2: bool = True) -> tuple[int, dict[str, int]]:
    """MACs of ``model(inputs)`` in total and per module name (FlopCounterMode FLOPs / 2), with every CompConv as
    Figure 2 draws it (``figure2``) or as the model runs it."""
    with FlopCounterMode(display=False) as counter:
        if figure2:
            with figure2_forms(model):
                model(inputs)
        else:
            model(inputs)
    per_module: dict[str, int] = {}
    root = type(model).__name__
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        name = "" if key == root else key[len(root) + 1:] if key.startswith(root + ".") else key
        per_module[name] = sum(ops.values()) // 2
    return counter.get_total_flops() // 2, per_module


@torch.no_grad()
def complexity(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> ComplexityReport:
    """Counts MACs (one image) and parameters of ``model`` per layer and in total.

    Args:
        model: Any module taking an ``(N, C, H, W)`` tensor (outputs may be tensors, lists or dicts).
        input_size: ``(C, H, W)`` of the input.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, args, out: outputs.append(out.numel()))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    x = torch.zeros(1, *input_size, device=device, dtype=dtype)
    try:
        total, per_module = count_macs(model, x)
    finally:
        for hook in hooks:
            hook.remove()
    try:
        executed, _ = count_macs(model, x, figure2=False)
    finally:
        model.train(was_training)
    layers = [
        LayerCost(name, type(m).__name__, per_module.get(name, 0), sum(p.numel() for p in m.parameters()))
        for name, m in model.named_modules()
        if isinstance(m, _LAYER_TYPES) and not _inside_compconv(name, model)
    ]
    params = sum(p.numel() for p in model.parameters())
    return ComplexityReport(tuple(input_size), total, params, per_module, layers, sum(outputs), executed)


def _inside_compconv(name: str, model: nn.Module) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), _COMPOUND) for i in range(1, len(parts)))

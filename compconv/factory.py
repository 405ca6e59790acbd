"""Which CompConv class a model is built with: the training fast path or the plain Figure 2 module, picked at
build time as timm's ``create_act`` picks memory-efficient activations. The one module that knows both.
"""

from __future__ import annotations

from typing import Any

from timm.layers import is_exportable, is_scriptable
from torch import nn

from .efficient import EfficientCompConv2d
from .layers import CompConv2d
from .options import CompConvOptions
from .sizing import plan as plan_layer

__all__ = ["compconv_class", "create_conv2d"]


def compconv_class(options: CompConvOptions) -> type:
    """:class:`compconv.efficient.EfficientCompConv2d` unless ``options.efficient`` is false or timm builds a
    scriptable or exportable model; then the plain :class:`compconv.CompConv2d`."""
    if options.efficient and not (is_scriptable() or is_exportable()):
        return EfficientCompConv2d
    return CompConv2d


def create_conv2d(in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride=1, padding=0,
                  dilation=1, bias: bool = True, *, options: CompConvOptions | None = None, **option_overrides: Any) -> nn.Module:
    """A CompConv layer of :func:`compconv_class`, or a plain ``nn.Conv2d`` where the planned depth is 0.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: As for ``nn.Conv2d``.
        options: A :class:`compconv.CompConvOptions`; keyword options (``c0``, ``depth``, ...) override its fields.
    """
    layer_plan = plan_layer(in_channels, out_channels, kernel_size, bias=bias, options=options, **option_overrides)
    if layer_plan.depth == 0:
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias)
    return compconv_class(layer_plan.options)(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                              bias=bias, plan=layer_plan)

"""How a call is being run: recorded into a graph (and by which capture), and in which memory format. The
fast paths ask these questions; the plain :class:`compconv.CompConv2d` never does.
"""

import torch

__all__ = ["compiling_training_graph", "memory_format_of", "recording_graph"]


def recording_graph(x: torch.Tensor) -> bool:
    """True while ``x`` is being recorded into a graph rather than computed: ``torch.jit.trace``, ``torch.export``
    (and the ONNX exporters built on either), ``torch.fx`` symbolic tracing. Such graphs hold the plain ops."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or isinstance(x, torch.fx.Proxy)


def compiling_training_graph() -> bool:
    """True while ``torch.compile`` records a training graph (not ``torch.export``, whose graphs hold standard ops)."""
    return torch.is_grad_enabled() and torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-d tensor laid out NHWC (and not also NCHW-contiguous, as 1x1 images are),
    else ``torch.contiguous_format``: the one rule every fast path uses to keep a caller's layout."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format

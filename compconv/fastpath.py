"""Training forms of :class:`compconv.CompConv2d`: Figure 2's function and gradients, less memory traffic.

- :class:`ConcatShuffle`: ``channel_shuffle(torch.cat(parts))`` as one autograd node. Its forward
  writes each part once into an output of the first part's memory format; its backward hands each part
  a *view* of the output gradient through the inverse shuffle (a strided slice of channels), where
  autograd's in-place assembly would clone the whole output gradient once per part (``CopySlices``).
  Graph capture (dynamo, FX, export, ONNX, TorchScript) never sees it: it records the plain ops, which
  compilers fuse.
- :func:`composed_weight`: a 1x1 CompConv (no inner norms) is the linear map ``x -> M x`` with ``M`` a
  small product of its factors. One dense 1x1 conv with ``M`` computes the same output, and autograd
  through the product gives the same parameter gradients, in one GEMM forward and backward instead of
  a chain of memory-bound passes. :func:`dense_pays` decides where that is faster.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List

import torch
import torch.nn.functional as F

__all__ = ["ConcatShuffle", "composed_weight", "dense_pays", "figure2_forms", "unshuffle_views"]

# dense_pays: train a pointwise layer through its composed weight when its output has at least this many
# positions per image (measured, results/benchmark_cpu_train_layers.md) or when it saves at most half the MACs
DENSE_MIN_POSITIONS = 28 * 28


def assemble(parts: List[torch.Tensor], groups: int) -> torch.Tensor:
    """``channel_shuffle(torch.cat(parts, 1), groups)`` with one copy of each part, in ``parts[0]``'s memory format."""
    first = parts[0]
    n, _, h, w = first.shape
    channels = sum(part.shape[1] for part in parts)
    channels_last = first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()
    out = torch.empty((n, channels, h, w), dtype=first.dtype, device=first.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    size = channels // groups
    view = out.view(n, size, groups, h, w)  # out channel i * groups + j  <-  concatenated channel j * size + i
    offset = 0
    for part in parts:
        start, stop = offset, offset + part.shape[1]
        while start < stop:
            group = start // size
            end = min(stop, (group + 1) * size)
            view[:, start - group * size:end - group * size, group].copy_(part[:, start - offset:end - offset])
            start = end
        offset = stop
    return out


def unshuffle_views(grad: torch.Tensor, widths: List[int], groups: int) -> List[torch.Tensor]:
    """The gradient of each part of :func:`assemble` from the output gradient: views where a part lies in one
    shuffle group (every part of a CompConv does), a concatenation of views otherwise."""
    n, channels, h, w = grad.shape
    size = channels // groups
    view = grad.view(n, size, groups, h, w)
    grads, offset = [], 0
    for width in widths:
        start, stop, pieces = offset, offset + width, []
        while start < stop:
            group = start // size
            end = min(stop, (group + 1) * size)
            pieces.append(view[:, start - group * size:end - group * size, group])
            start = end
        grads.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
        offset = stop
    return grads


class ConcatShuffle(torch.autograd.Function):
    """``channel_shuffle(torch.cat(parts, 1), groups)`` as one autograd node (eager only; see the module doc)."""

    @staticmethod
    def forward(ctx, groups: int, *parts: torch.Tensor) -> torch.Tensor:
        ctx.groups, ctx.widths = groups, [part.shape[1] for part in parts]
        return assemble(list(parts), groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, *unshuffle_views(grad, ctx.widths, ctx.groups))


def composed_weight(module) -> torch.Tensor:
    """``M`` (C_out x C_in) with ``module(x) == conv1x1(x, M) + bias`` for a pointwise CompConv, differentiable
    in the module's parameters (the dense training form)."""
    first = module.convs[0].weight
    in_channels = first.shape[1]
    b = first[:, :, 0, 0]  # B(d-1) = U x
    rows = [b]
    for index, conv in enumerate(list(module.convs)[1:]):
        start, stop = module.identity_starts[index], module.identity_stops[index]
        width = stop - start
        selection = F.pad(torch.eye(width, dtype=first.dtype, device=first.device), (start, in_channels - stop))
        weight = conv.weight[:, :, 0, 0]  # acts on [B(i+1) ; A(i+1)]
        b = weight[:, :b.shape[0]] @ b + F.pad(weight[:, b.shape[0]:], (start, in_channels - stop))
        rows += [selection, b]
    if module.tail is not None:
        tail = module.tail.weight
        source = b[:module.tail_in]
        rows.append(tail[:, 0, 0, :1] * source if module.tail.groups != 1 else tail[:, :, 0, 0] @ source)
    matrix = torch.cat(rows)
    groups = module.shuffle_groups
    if groups > 1:  # output channel i * groups + j is concatenated channel j * size + i
        matrix = matrix.view(groups, -1, in_channels).transpose(0, 1).reshape(-1, in_channels)
    return matrix


def dense_pays(module, x: torch.Tensor) -> bool:
    """Whether the dense training form is faster than the chain for this layer and input (a rule measured on
    a 2-core AVX-512 CPU, batch 16 at 224: see :data:`DENSE_MIN_POSITIONS`)."""
    positions = (x.shape[-2] // module.stride[0]) * (x.shape[-1] // module.stride[1])
    return module.plan.macs_ratio > 0.5 or positions >= DENSE_MIN_POSITIONS


@contextmanager
def figure2_forms(model: torch.nn.Module) -> Iterator[None]:
    """Runs every CompConv of ``model`` as Figure 2 is written (``pointwise_form="chain"``) inside the block:
    what MACs accounting counts, since a dense training form computes the plain conv's MACs."""
    saved = {m: m.pointwise_form for m in model.modules() if hasattr(m, "pointwise_form")}
    try:
        for module in saved:
            module.pointwise_form = "chain"
        yield
    finally:
        for module, form in saved.items():
            module.pointwise_form = form

"""The 1x1 algebra of CompConv as pure functions, shared by the training forms and deploy.

A 1x1 CompConv without inner norms is ``x -> V [U; S] x``: ``[U; S]`` stacks its first conv and the selection
of the identity channels, ``V`` is a small product of its other factors. Nothing here changes the module.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .shuffle import shuffled_rows

__all__ = ["LOWRANK_MAX_SHARE", "composed_weight", "factorised_weights", "is_pointwise", "lowrank_macs", "part_map",
           "scaled_tail"]

# The low-rank pair ([U; S] then V) is used, in training and in deploy alike, where it costs at most this share of
# the plain conv's MACs (measured: results/benchmark_cpu_train.md, per-layer table; docs/performance.md)
LOWRANK_MAX_SHARE = 0.6


def is_pointwise(module) -> bool:
    """Whether a CompConv layer is a per-pixel linear map: 1x1 kernels, no padding, no BatchNorm inside (the
    algebra of this module applies to it)."""
    tail = module.plan.tail
    return (module.kernel_size == (1, 1) and module.padding == (0, 0)
            and (tail is None or tail.kernel_size == (1, 1))
            and not any(isinstance(m, nn.BatchNorm2d) for m in module.modules() if m is not module))


def scaled_tail(module) -> bool:
    """Depth 1 with a depthwise 1x1 tail: ``y = shuffle([b; w * b])`` with ``b = U x`` (``V`` is a scale)."""
    tail = module.tail
    return len(module.convs) == 1 and tail is not None and tail.groups != 1 and tail.kernel_size == (1, 1)


def lowrank_macs(module, *, identities_by_gemm: bool, scale_v: bool) -> int:
    """MACs per output position of a pointwise layer as ``V [U; S] x``, the one cost formula of the low-rank form:
    ``U`` costs ``C_in * C_prim``; the identity selection ``S`` costs ``C_in`` per identity channel where it runs as
    one-hot GEMM rows (``identities_by_gemm``: the training form), nothing where it is sliced (deploy's form); ``V``
    costs ``(C_prim + identities) * C_out``, or ``C_out`` where it runs as a per-channel scale (``scale_v``: the
    training form of a :func:`scaled_tail` layer).
    """
    plan = module.plan
    rank = plan.c_prim + plan.identity_channels
    first = plan.in_channels * (rank if identities_by_gemm else plan.c_prim)
    return first + (plan.out_channels if scale_v else rank * plan.out_channels)


def _times(weight: torch.Tensor, rows, columns: int) -> torch.Tensor:
    """``weight @ rows`` where ``rows`` is a dense map (a matrix) or a selection of basis columns (a slice):
    a selection costs a zero pad, not a product with one-hot rows."""
    if isinstance(rows, slice):
        return F.pad(weight, (rows.start, columns - rows.stop))
    return weight @ rows


def _parts_in_basis(module, first, identities: List[slice], columns: int, dtype: Optional[torch.dtype],
                    with_bias: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The concatenated parts as ``M b + f`` in a basis ``b`` (``columns`` entries) where ``B(d-1)`` is ``first`` and
    each identity part a selection ``identities[i]`` (see :func:`part_map`).
    """
    def matrix(conv: torch.nn.Conv2d) -> torch.Tensor:
        weight = conv.weight if dtype is None else conv.weight.to(dtype)
        return weight[:, :, 0, 0]

    def bias(conv: torch.nn.Conv2d) -> torch.Tensor:
        if conv.bias is None:
            return torch.zeros(conv.out_channels, dtype=dtype or conv.weight.dtype, device=conv.weight.device)
        return conv.bias if dtype is None else conv.bias.to(dtype)

    like = module.convs[0].weight.to(dtype) if dtype is not None else module.convs[0].weight

    def dense(rows) -> torch.Tensor:
        if not isinstance(rows, slice):
            return rows
        eye = torch.eye(rows.stop - rows.start, dtype=like.dtype, device=like.device)
        return F.pad(eye, (rows.start, columns - rows.stop))

    def height(rows) -> int:
        return rows.stop - rows.start if isinstance(rows, slice) else rows.shape[0]

    b = first
    b_bias = bias(module.convs[0]) if with_bias else None
    rows, biases = [b], [b_bias]
    for conv, a in zip(list(module.convs)[1:], identities):
        weight = matrix(conv)
        split = height(b)  # W(i) [B(i+1); A(i+1)] = W[:, :split] B(i+1) + W[:, split:] A(i+1)
        if isinstance(b, slice) and b.stop == a.start:  # adjacent selections: W selects one run of columns
            b_next = _times(weight, slice(b.start, a.stop), columns)
        elif isinstance(b, slice):
            b_next = _times(weight[:, :split], b, columns) + _times(weight[:, split:], a, columns)
        else:
            b_next = torch.addmm(_times(weight[:, split:], a, columns), weight[:, :split], b)
        rows += [a, b_next]
        if b_bias is not None:
            b_bias = weight[:, :split] @ b_bias + bias(conv)
            biases += [b_bias.new_zeros(height(a)), b_bias]
        b = b_next
    if module.tail is not None:
        tail = module.tail
        weight = (tail.weight if dtype is None else tail.weight.to(dtype))[:, :, 0, 0]
        source = slice(b.start, b.start + module.tail_in) if isinstance(b, slice) else b[:module.tail_in]
        if tail.groups != 1:  # a depthwise 1x1 tail is a per-channel scale
            rows.append(weight[:, :1] * dense(source))
        else:
            rows.append(_times(weight, source, columns))
        if b_bias is not None:
            source_bias = b_bias[:module.tail_in]
            biases.append((weight[:, 0] * source_bias if tail.groups != 1 else weight @ source_bias) + bias(tail))
    return torch.cat([dense(r) for r in rows]), (torch.cat(biases) if with_bias else None)


def part_map(module, dtype: Optional[torch.dtype] = None,
             with_bias: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(M, f)``: the concatenated parts of a pointwise CompConv (before the shuffle) as ``M z + f``, with
    ``z = [U x; A(d-1); ...; A1]`` (rank C_prim + identity channels). The one copy of this algebra, which the
    training forms and deploy's exact forms both read.

    Args:
        module: A pointwise :class:`compconv.CompConv2d` (1x1 kernels, no norms left inside).
        dtype: Compute in this dtype (deploy: float64); default the weights' own, differentiable.
        with_bias: Also return ``f`` from the internal convs' biases (after ``reparameterize()``); else None.
    """
    c = module.plan.c_prim
    identities, offset = [], c
    for start, stop in zip(module.identity_starts, module.identity_stops):
        identities.append(slice(offset, offset + stop - start))
        offset += stop - start
    return _parts_in_basis(module, slice(0, c), identities, offset, dtype, with_bias)


def factorised_weights(module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W1, V)`` with ``module(x) == conv1x1(conv1x1(x, W1), V) + bias`` for a pointwise CompConv, differentiable:
    ``W1 = [U; S]`` stacks the first conv's weight and one-hot rows selecting the identity channels, ``V`` is
    :func:`part_map`'s ``M`` in the shuffled order.
    """
    first = module.convs[0].weight[:, :, 0, 0]
    in_channels = first.shape[1]
    selections = [F.pad(torch.eye(stop - start, dtype=first.dtype, device=first.device), (start, in_channels - stop))
                  for start, stop in zip(module.identity_starts, module.identity_stops)]
    w1 = torch.cat([first, *selections]) if selections else first
    return w1, shuffled_rows(part_map(module)[0], module.shuffle_groups)


def composed_weight(module) -> torch.Tensor:
    """``M`` (C_out x C_in) with ``module(x) == conv1x1(x, M) + bias``, differentiable (the dense form)."""
    first = module.convs[0].weight[:, :, 0, 0]
    identities = [slice(start, stop) for start, stop in zip(module.identity_starts, module.identity_stops)]
    matrix, _ = _parts_in_basis(module, first, identities, first.shape[1], None, False)
    return shuffled_rows(matrix, module.shuffle_groups)



"""The channel shuffle of Figure 2 (ShuffleNet's), defined once as a permutation: output channel ``o`` is the
pre-shuffle channel ``shuffle_source(C, g)[o]``. Every other form of it here is that permutation written for one
use (a reshape of a tensor, rows of a matrix, runs of channels that land in one group), each tested against it.
"""

# (no `from __future__ import annotations` here: TorchScript reads these annotations as types)
from typing import Iterator, List

import torch

from .capture import memory_format_of, recording_graph

__all__ = ["channel_shuffle", "group_runs", "shuffle_keeping_format", "shuffle_source", "shuffled_rows"]


def shuffle_source(channels: int, groups: int) -> torch.Tensor:
    """``source[o]``: the pre-shuffle channel at output channel ``o`` (``o = i * groups + j`` reads
    ``j * channels / groups + i``)."""
    return torch.arange(channels).view(groups, channels // groups).t().reshape(-1)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``x[:, shuffle_source(C, groups)]`` as a reshape (no gather): what graph captures record."""
    if groups == 1:
        return x
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def shuffle_keeping_format(x: torch.Tensor, groups: int) -> torch.Tensor:
    """:func:`channel_shuffle` that keeps a channels_last input channels_last (graph captures record the plain op)."""
    if groups == 1 or recording_graph(x) or memory_format_of(x) != torch.channels_last:
        return channel_shuffle(x, groups)
    n, c, h, w = x.shape
    nhwc = x.permute(0, 2, 3, 1)
    return nhwc.view(n, h, w, groups, c // groups).transpose(3, 4).reshape(n, h, w, c).permute(0, 3, 1, 2)


def shuffled_rows(matrix: torch.Tensor, groups: int) -> torch.Tensor:
    """``matrix[shuffle_source(rows, groups)]``: a concatenation's linear map in the shuffled output order."""
    if groups == 1:
        return matrix
    return matrix.view(groups, -1, matrix.shape[1]).transpose(0, 1).reshape(-1, matrix.shape[1])


def group_runs(widths: List[int], groups: int) -> Iterator[tuple[int, int, int, int, int]]:
    """The permutation as runs: ``(part, start, stop, group, offset)`` for every run of part ``part``'s channels
    ``[start, stop)`` (of parts concatenated with these ``widths``) that lands in shuffle group ``group`` from
    channel ``offset`` of it, i.e. at output channels ``(offset + k) * groups + group``.
    """
    size = sum(widths) // groups
    offset = 0
    for index, width in enumerate(widths):
        start, stop = offset, offset + width
        while start < stop:
            group = start // size
            end = min(stop, (group + 1) * size)
            yield index, start - offset, end - offset, group, start - group * size
            start = end
        offset = stop

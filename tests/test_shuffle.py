"""Every form of the channel shuffle is the one permutation ``shuffle_source``: the reshape, the
channels_last-keeping reshape, the rows of a matrix, the runs of :func:`group_runs`, the fused copy of the fast
path and the fold deploy applies to a norm and the next conv."""

from __future__ import annotations

import pytest
import torch

from compconv.efficient import assemble, unshuffle_views
from compconv.shuffle import channel_shuffle, group_runs, shuffle_keeping_format, shuffle_source, shuffled_rows

CASES = [(8, 1), (8, 2), (12, 4), (24, 8), (6, 3)]


@pytest.mark.parametrize("channels, groups", CASES)
def test_every_shuffle_form_is_the_permutation(channels, groups):
    source = shuffle_source(channels, groups)
    assert sorted(source.tolist()) == list(range(channels))
    x = torch.randn(2, channels, 3, 4)
    want = x[:, source]
    assert torch.equal(channel_shuffle(x, groups), want)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    got = shuffle_keeping_format(nhwc, groups)
    assert torch.equal(got, want) and (groups == 1 or got.is_contiguous(memory_format=torch.channels_last))
    matrix = torch.randn(channels, 5)
    assert torch.equal(shuffled_rows(matrix, groups), matrix[source])


@pytest.mark.parametrize("channels, groups", CASES)
def test_group_runs_and_the_fused_copy_place_each_channel_where_the_permutation_does(channels, groups):
    widths = [channels // 4, channels // 4, channels - 2 * (channels // 4)]
    parts = [torch.randn(2, w, 3, 3) for w in widths]
    concatenated = torch.cat(parts, dim=1)
    want = concatenated[:, shuffle_source(channels, groups)]
    placed = torch.empty_like(want)
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    for part, start, stop, group, at in group_runs(widths, groups):
        for k in range(stop - start):
            placed[:, (at + k) * groups + group] = concatenated[:, offsets[part] + start + k]
    assert torch.equal(placed, want)
    assert torch.equal(assemble(parts, groups), want)
    back = unshuffle_views(want, widths, groups)
    assert all(torch.equal(b, p) for b, p in zip(back, parts))

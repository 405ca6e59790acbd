"""The sizing rule: depth, C_prim, truncation and the paper's reference figures."""

import pytest
import torch

from compconv import CompConvOptions, adaptive_depth, c_prim_for, plan


@pytest.mark.parametrize("c_in, depth", [(3, 1), (64, 1), (255, 1), (256, 2), (511, 2), (512, 3), (2048, 3)])
def test_adaptive_depth_compconv128(c_in, depth):
    assert adaptive_depth(c_in, 128) == depth


def test_larger_c0_gives_smaller_depth():
    assert [adaptive_depth(512, c0) for c0 in (32, 64, 128, 256, 512)] == [3, 3, 3, 2, 1]


@pytest.mark.parametrize("c_out, c_prim", [(64, 5), (128, 10)])
def test_c_prim_fraction_at_depth3(c_out, c_prim):
    assert c_prim_for(c_out, 3) == c_prim
    assert plan(c_out, c_out, 3, depth=3).c_prim == c_prim


@pytest.mark.parametrize("channels, ratio", [(64, 20.4), (128, 20.2), (256, 18.5), (512, 17.7)])
def test_macs_ratio_matches_spec(channels, ratio):
    for k in (1, 3, 5):  # k cancels
        p = plan(channels, channels, k, depth=3)
        assert round(100 * p.macs_ratio, 1) == ratio


def test_eq8_closed_form_without_truncation():
    # C_out divisible by 14: Eq. 8 holds exactly, times k^2.
    c_in, c_out, k = 300, 140, 3
    p = plan(c_in, c_out, k, depth=3)
    c = 10
    assert p.c_prim == c and p.dropped == 0
    assert p.macs_per_position == k * k * (c_in * c + (2 * c) ** 2 + (4 * c) ** 2 + 4 * c)


def test_parts_follow_figure2():
    p = plan(128, 128, 3, depth=3)
    assert [(q.name, q.kind, q.channels) for q in p.parts] == [
        ("B2", "conv", 10), ("A2", "identity", 10), ("B1", "conv", 20),
        ("A1", "identity", 20), ("B0", "conv", 40), ("A0", "tail", 28),
    ]
    assert [q.identity_slice for q in p.identities] == [(0, 10), (10, 30)]
    assert sum(q.channels for q in p.parts) == 128 and p.dropped == 12
    assert p.shuffle_groups == 8


def test_depth_lowered_when_identity_slices_do_not_fit(caplog):
    p = plan(16, 256, 3, depth=3)
    assert p.requested_depth == 3 and p.depth == 1
    assert "identity slices need" in p.depth_note


def test_depth_lowered_when_truncation_cuts_past_a0():
    p = plan(64, 7, 3, depth=2)  # c=2 -> 12 channels, 5 dropped > |A0| = 4
    assert p.depth == 1 and "truncating" in p.depth_note


def test_depth_zero_is_plain_conv():
    p = plan(64, 64, 3, depth=0)
    assert p.macs_per_position == p.plain_macs_per_position and p.macs_ratio == 1


def test_shuffle_groups_fall_back_to_a_divisor():
    assert plan(512, 100, 3, depth=3).shuffle_groups == 4
    assert plan(512, 99, 3, depth=3).shuffle_groups == 1
    assert plan(512, 128, 3, depth=3, shuffle=False).shuffle_groups == 1


def test_dense_tail_costs_more():
    dw, dense = plan(128, 128, 3, depth=3), plan(128, 128, 3, depth=3, tail="dense")
    assert dense.macs_per_position - dw.macs_per_position == 9 * 28 * 40 - 9 * 28
    assert round(100 * dense.macs_ratio) == 27


@pytest.mark.parametrize("bad, message", [
    ({"c0": 0}, "c0"), ({"depth": 4}, "depth"), ({"tail": "conv"}, "tail"),
    ({"tail_kernel": 0}, "tail_kernel"), ({"shuffle": "yes"}, "shuffle"), ({"colour": 1}, "unknown"),
])
def test_invalid_options_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        CompConvOptions.from_mapping(bad)


@pytest.mark.parametrize("divisor", [8, 16])
@pytest.mark.parametrize("c_in, c_out, k", [(256, 64, 1), (1024, 256, 1), (512, 512, 3), (2048, 512, 1)])
def test_c_prim_divisor_rounds_up_and_keeps_the_closed_forms(divisor, c_in, c_out, k):
    from compconv import CompConv2d
    from compconv.complexity import count_macs

    p = plan(c_in, c_out, k, c0=128, c_prim_divisor=divisor)
    assert p.c_prim % divisor == 0 and p.c_prim >= plan(c_in, c_out, k, c0=128, depth=p.depth).c_prim
    assert sum(part.channels for part in p.parts) == c_out  # the excess is dropped from A0
    module = CompConv2d(c_in, c_out, k, padding=k // 2, bias=False, plan=p)
    x = torch.randn(1, c_in, 5, 5)
    assert module(x).shape == (1, c_out, 5, 5)
    assert count_macs(module, x)[0] == p.macs_per_position * 25
    assert sum(t.numel() for t in module.parameters()) == p.params


def test_c_prim_divisor_default_keeps_the_papers_widths_and_is_validated():
    assert plan(128, 128, 3, depth=3).c_prim == plan(128, 128, 3, depth=3, c_prim_divisor=1).c_prim == 10
    with pytest.raises(ValueError, match="c_prim_divisor must be a positive integer"):
        plan(128, 128, 3, c_prim_divisor=0)

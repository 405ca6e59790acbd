"""The Ghost-module peer: same accounting and drop-in guarantees as CompConv2d."""

import pytest
import timm
import torch
from torch import nn

import compconv
from compconv.complexity import count_macs
from compconv.ghost import GhostConv2d, GhostOptions


@pytest.mark.parametrize("c_in, c_out, k, s, p, ratio, bias", [
    (64, 64, 1, 1, 0, 2, False), (64, 256, 1, 1, 0, 2, True), (128, 128, 3, 2, 1, 2, False),
    (32, 33, 3, 1, 1, 2, False), (48, 50, 3, 1, 1, 3, True), (16, 7, 5, 2, 2, 4, False),
])
def test_shape_macs_params_match_closed_form(c_in, c_out, k, s, p, ratio, bias):
    module = GhostConv2d(c_in, c_out, k, s, p, bias=bias, ratio=ratio)
    x = torch.randn(2, c_in, 9, 9)
    y = module(x)
    assert y.shape == nn.Conv2d(c_in, c_out, k, s, p)(x).shape
    macs, _ = count_macs(module, x[:1])
    assert macs == module.plan.macs_per_position * y.shape[-2] * y.shape[-1]
    assert sum(q.numel() for q in module.parameters()) == module.plan.params
    y.sum().backward()
    assert all(q.grad is not None for q in module.parameters())


def test_ratio_two_halves_a_pointwise_conv():
    plan = GhostConv2d(256, 256, 1, bias=False).plan
    assert plan.primary == 128 and plan.cheap == 128
    assert plan.macs_per_position == 256 * 128 + 128 * 9


def test_patch_method_ghost_and_registration():
    model = timm.create_model("resnet18", num_classes=10)
    report = compconv.patch(model, method="ghost")
    assert len(report.replaced) == 19 and isinstance(model.layer1[0].conv1, GhostConv2d)
    r50 = compconv.complexity(timm.create_model("resnet50_ghost"))
    assert 2.1e9 < r50.macs < 2.2e9  # the Ghost paper reports 2.2 B for Ghost-ResNet-50 (s=2)
    with pytest.raises(ValueError, match="unknown patch method"):
        compconv.patch(model, method="octconv")
    with pytest.raises(ValueError, match="ratio"):
        GhostOptions(ratio=1)

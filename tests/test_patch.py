"""The patcher on timm, torchvision and hand-written models."""

import pytest
import timm
import torch
import torchvision
from torch import nn

import compconv
from compconv import CompConv2d


def _convs(model, kind):
    return [name for name, m in model.named_modules() if isinstance(m, kind) and type(m).__module__ != "compconv.inference.forms" and ".convs." not in name and not name.endswith(".tail")]


def test_patches_torchvision_resnet_keeping_outputs_shaped():
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    report = compconv.patch(model, c0=128)
    assert _convs(model, nn.Conv2d) == ["conv1"]  # the RGB stem stays plain
    assert len(report.replaced) == 19 and len(_convs(model, CompConv2d)) == 19
    assert [s.name for s in report.skipped] == ["conv1"] and "in_channels=3" in report.skipped[0].reason
    assert model(x).shape == (2, 10)


def test_report_rows_match_the_installed_modules():
    model = timm.create_model("resnet50", num_classes=10)
    report = compconv.patch(model, c0=128)
    for row in report.replaced:
        module = model.get_submodule(row.name)
        assert module.plan == row.plan
        assert sum(p.numel() for p in module.parameters()) == row.plan.params
    depths = {row.plan.depth for row in report.replaced}
    assert depths == {1, 2, 3}
    assert "| layer4.0.conv2 | 512 | 512 | 3x3 | 2 | 3 | 37 |" in report.table()


def test_vgg_pre_logits_and_classifier_are_left_alone():
    model = timm.create_model("vgg16", num_classes=10)
    report = compconv.patch(model)
    skipped = {s.name: s.reason for s in report.skipped}
    assert set(skipped) == {"features.0", "pre_logits.fc1", "pre_logits.fc2"}
    assert "classifier" in skipped["pre_logits.fc1"]
    assert type(model.pre_logits.fc1) is nn.Conv2d and len(report.replaced) == 12


def test_include_and_exclude_patterns():
    model = timm.create_model("resnet18", num_classes=10)
    report = compconv.patch(model, include=["layer4.*"], exclude=["*downsample*"])
    assert {r.name for r in report.replaced} == {"layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"}
    assert any(s.reason.startswith("excluded") for s in report.skipped)


def test_skips_grouped_and_subclassed_convs_with_reasons():
    class Custom(nn.Conv2d):
        pass

    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), Custom(32, 32, 1), nn.Conv2d(32, 64, 1))
    report = compconv.patch(model)
    reasons = {s.name: s.reason for s in report.skipped}
    assert "groups=32" in reasons["0"] and "Custom" in reasons["1"]
    assert isinstance(model[2], CompConv2d)


class _ReadsWeight(nn.Module):
    """As timm's edgenext positional encoding: the forward reads a conv's ``.weight`` for its dtype."""

    def __init__(self):
        super().__init__()
        self.proj, self.body = nn.Conv2d(32, 32, 1), nn.Conv2d(32, 32, 3, padding=1)
        nn.init.zeros_(self.body.weight)  # an initialiser reading .weight does not stop the patch

    def forward(self, x):
        return self.body(x) + self.proj(x.to(self.proj.weight.dtype))


def test_convs_whose_weight_the_forward_reads_are_left_with_a_reason():
    model = nn.Sequential(_ReadsWeight())
    report = compconv.patch(model)
    reasons = {s.name: s.reason for s in report.skipped}
    assert "_ReadsWeight reads its .weight or .bias" in reasons["0.proj"]
    assert type(model[0].proj) is nn.Conv2d and isinstance(model[0].body, CompConv2d)
    assert model(torch.randn(1, 32, 8, 8)).shape == (1, 32, 8, 8)


def test_patching_twice_leaves_compconv_internals_alone():
    model = timm.create_model("resnet18", num_classes=10)
    first = compconv.patch(model)
    second = compconv.patch(model)
    assert len(first.replaced) == 19 and second.replaced == [] and [s.name for s in second.skipped] == ["conv1"]


def test_depth_zero_keeps_the_original_conv():
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1))
    original = model[0]
    report = compconv.patch(model, depth=0)
    assert model[0] is original and report.replaced[0].plan.depth == 0


def test_patch_options_reach_the_modules():
    model = nn.Sequential(nn.Conv2d(512, 512, 3, padding=1))
    compconv.patch(model, c0=64, tail="dense", tail_kernel=1, inner_norm=True, shuffle=False)
    opts = model[0].plan.options
    assert (opts.c0, opts.tail, opts.tail_kernel, opts.inner_norm, opts.shuffle) == (64, "dense", 1, True, False)


def test_invalid_option_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown CompConv option"):
        compconv.patch(nn.Sequential(nn.Conv2d(32, 32, 1)), taill="dense")

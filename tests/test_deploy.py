"""deploy(): folded inner norms, biases and shuffles leave eval outputs unchanged."""

import pytest
import timm
import torch
from torch import nn

from compconv import CompConv2d, deploy


def _randomise_norms(model):
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.8, 1.2)
            module.weight.data.uniform_(0.8, 1.2)
            module.bias.data.uniform_(-0.1, 0.1)


@pytest.mark.parametrize("name, options, norms, shuffles", [
    ("resnet50_compconv128", {}, 0, 32),
    ("resnet18_compconv128", {"inner_norm": True}, 49, 8),
    ("vgg16_bn_compconv128", {"inner_norm": True}, 37, 0),
])
@torch.no_grad()
def test_deploy_keeps_eval_outputs(name, options, norms, shuffles):
    model = timm.create_model(name, num_classes=10, compconv=options)
    _randomise_norms(model)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    reference = model(x)
    report = deploy(model)
    assert (report.norms_folded, report.shuffles_folded) == (norms, shuffles)
    torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    assert not any(isinstance(m, nn.BatchNorm2d) for c in model.modules() if isinstance(c, CompConv2d)
                   for m in c.modules())


@torch.no_grad()
def test_deploy_folds_output_bias_into_following_norm():
    block = nn.Module()
    block.conv1, block.bn1 = CompConv2d(64, 64, 3, padding=1, bias=True, depth=2), nn.BatchNorm2d(64)
    block.forward = lambda x: block.bn1(block.conv1(x))
    _randomise_norms(block)
    block.eval()
    x = torch.randn(1, 64, 6, 6)
    reference = block.forward(x)
    assert deploy(block).biases_folded == 1 and block.conv1.bias is None
    torch.testing.assert_close(block.forward(x), reference, rtol=1e-5, atol=1e-5)


def test_deployed_model_compiles_and_exports():
    model = timm.create_model("resnet18_compconv128", num_classes=5)
    deploy(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), expected)
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), expected)

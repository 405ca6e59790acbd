"""Registered timm models: build, forward/backward, features_only, export, compile, complexity."""

import pytest
import timm
import torch

import compconv
from compconv import CompConv2d
from compconv.ghost import GhostConv2d

NAMES = compconv.models.registered_model_names()


def test_registry_is_the_models_table():
    """Every row of compconv.models.MODELS is a timm model with its options, and nothing else is registered."""
    rows = {row[0]: row for row in compconv.models.MODELS}
    compconv_rows = {name for name, (_, _, method, _, _) in rows.items() if method == "compconv"}
    assert set(NAMES) == set(rows) and set(compconv.compconv_model_names()) == compconv_rows
    assert set(timm.list_models("*compconv*")) == compconv_rows
    for name in compconv_rows:
        _, base, _, options, _ = rows[name]
        assert compconv.models.variant_base(name) == base
        assert compconv.models.variant_options(name) == compconv.CompConvOptions(**options).as_dict()
    assert {"resnet50_compconv128", "resnet18_compconv128", "resnet50_ghost", "vgg16_compconv128"} <= set(rows)


def test_forward_backward(model_name):
    model = timm.create_model(model_name, num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.pretrained_cfg["architecture"] == model_name


@pytest.mark.parametrize("name", ["resnet50_compconv128", "vgg16_compconv128", "resnet50_ghost"])
def test_features_only(name):
    model = timm.create_model(name, features_only=True, in_chans=1)
    baseline = timm.create_model(name.split("_")[0], features_only=True, in_chans=1)
    feats = model(torch.randn(1, 1, 64, 64))
    assert model.feature_info.channels() == baseline.feature_info.channels()
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert any(isinstance(m, (CompConv2d, GhostConv2d)) for m in model.modules())


def test_compconv_kwargs_and_pretrained_refusal():
    model = timm.create_model("resnet50_compconv128", compconv={"tail": "dense", "c0": 256})
    assert model.layer4[0].conv2.plan.options.tail == "dense" and model.layer4[0].conv2.plan.depth == 2
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("resnet50_compconv128", pretrained=True)
    with pytest.raises(ValueError, match="unknown CompConv option"):
        timm.create_model("resnet50_compconv128", compconv={"dpeth": 2})


def test_torch_export(model_name):
    model = timm.create_model(model_name, num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_dynamo_traces_without_graph_breaks(model_name):
    model = timm.create_model(model_name, num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50_compconv128", "vgg16_compconv128"])
def test_torch_compile_inductor(name):
    model = timm.create_model(name, num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_baseline_complexity_matches_published_counts():
    r50 = compconv.complexity(timm.create_model("resnet50"))
    assert round(r50.macs / 1e9, 2) == 4.09 and round(r50.params / 1e6, 3) == 25.557
    vgg = compconv.complexity(timm.create_model("vgg16"))
    assert round(vgg.macs / 1e9, 2) == 15.47 and round(vgg.params / 1e6, 2) == 138.36


def test_counted_model_macs_equal_plans():
    model = timm.create_model("resnet50_compconv128")
    sizes = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: sizes.__setitem__(n, o.shape[-2] * o.shape[-1]))
             for n, m in model.named_modules() if isinstance(m, CompConv2d)]
    report = compconv.complexity(model)
    for h in hooks:
        h.remove()
    for row in model.compconv_report.replaced:
        assert report.macs_of(row.name) == row.plan.macs_per_position * sizes[row.name], row.name
    assert report.params == sum(p.numel() for p in model.parameters())

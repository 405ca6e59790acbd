"""The checks timm runs on its own models (tests/test_models.py), parametrised over our registry."""

import pytest
import timm
import torch
from timm.layers import create_feature_extractor, get_graph_node_names

import compconv  # noqa: F401  (registers the models with timm)



def _fx_model(model, train: bool):
    """timm's FX feature extraction of the model's last node (its leaf modules and autowrapped functions)."""
    train_nodes, eval_nodes = get_graph_node_names(model)
    model.train(train)
    return create_feature_extractor(model, [train_nodes[-1] if train else eval_nodes[-1]])


def test_default_cfg(model_name):
    """As timm's test_model_default_cfgs: unpooled features match pool_size at the default input size."""
    model = timm.create_model(model_name).eval()
    cfg, state = model.pretrained_cfg, model.state_dict()
    x = torch.randn(1, *cfg["input_size"])
    hidden = getattr(model, "head_hidden_size", model.num_features)  # VGG: fc6/fc7 (pre_logits) come before fc
    with torch.no_grad():
        assert model.forward_features(x).shape[-2:] == cfg["pool_size"]
        model.reset_classifier(0)
        assert model(x).shape == (1, hidden)
        model.reset_classifier(0, "")
        unpooled = model(x)
        assert unpooled.ndim == 4 and (hidden != model.num_features or unpooled.shape[-2:] == cfg["pool_size"])
    classifiers = cfg["classifier"] if isinstance(cfg["classifier"], (list, tuple)) else (cfg["classifier"],)
    assert all(f"{c}.weight" in state for c in classifiers)
    assert f"{cfg['first_conv']}.weight" in state


def test_fx_forward_and_backward(model_name):
    model = timm.create_model(model_name, num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        (got,) = _fx_model(model, train=False)(x).values()
    torch.testing.assert_close(got, expected)
    fx_train = _fx_model(model, train=True)
    (out,) = fx_train(x).values()
    out.mean().backward()
    assert all(p.grad is not None for p in fx_train.parameters())


@pytest.mark.slow
def test_torchscript_and_fx_torchscript(model_name):
    model = timm.create_model(model_name, num_classes=7).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected)
        (got,) = torch.jit.script(_fx_model(model, train=False))(x).values()
    torch.testing.assert_close(got, expected)


def test_vgg_pool_size_is_the_unpooled_feature_size():
    assert timm.create_model("vgg16_compconv128").pretrained_cfg["pool_size"] == \
        timm.create_model("vgg16").pretrained_cfg["pool_size"] == (7, 7)

"""timm registrations of CompConv models: ``timm.create_model('resnet50_compconv128')`` after ``import compconv``.

Each variant is a tiny registered function that builds the plain timm architecture and patches
it with :func:`compconv.patch`. Baselines keep their plain timm names (``resnet50``, ``vgg16``).
CompConv options other than C_0 are passed as ``compconv={"tail": "dense", ...}``.
"""

from __future__ import annotations

from typing import Any

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .options import CompConvOptions
from .patch import patch

__all__: list[str] = []  # filled by register_model


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # No url / hf_hub_id: no pretrained CompConv weights exist.
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0", "paper_ids": "arXiv:2106.10486",
        **kwargs,
    }


_VGG = {"first_conv": "features.0", "classifier": "head.fc", "pool_size": (7, 7)}  # as timm's vgg16
default_cfgs = generate_default_cfgs({
    **{f"resnet50_compconv{c0}": _cfg() for c0 in (32, 64, 128, 256, 512)},
    "resnet18_compconv128": _cfg(),
    "resnet34_compconv128": _cfg(),
    "resnet101_compconv128": _cfg(),
    "vgg16_compconv128": _cfg(**_VGG),
    "vgg16_bn_compconv128": _cfg(**_VGG),
    "resnet50_ghost": _cfg(paper_ids="arXiv:1911.11907"),
})


def _create_patched(variant: str, base: str, pretrained: bool, method: str, options: dict[str, Any],
                    **kwargs: Any) -> nn.Module:
    if pretrained:
        raise ValueError(
            f"no pretrained weights exist for {variant}: build it with pretrained=False and train it "
            "(train_cls.py), or load your own checkpoint with checkpoint_path=..."
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = timm.create_model(base, pretrained=False, **kwargs)
    cfg = timm.models.get_pretrained_cfg(variant).to_dict()
    model.pretrained_cfg = model.default_cfg = cfg
    model.compconv_report = patch(model, method=method, **options)
    return model


def _create_compconv(variant: str, base: str, c0: int, pretrained: bool = False,
                     compconv: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    options = CompConvOptions.from_mapping({"c0": c0, **(compconv or {})}).as_dict()
    return _create_patched(variant, base, pretrained, "compconv", options, **kwargs)


@register_model
def resnet18_compconv128(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-18 with CompConv128 in place of every conv with C_in >= 16."""
    return _create_compconv("resnet18_compconv128", "resnet18", 128, pretrained, **kwargs)


@register_model
def resnet34_compconv128(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-34 with CompConv128."""
    return _create_compconv("resnet34_compconv128", "resnet34", 128, pretrained, **kwargs)


@register_model
def resnet50_compconv32(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-50 with CompConv32 (strongest compression of the family)."""
    return _create_compconv("resnet50_compconv32", "resnet50", 32, pretrained, **kwargs)


@register_model
def resnet50_compconv64(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-50 with CompConv64."""
    return _create_compconv("resnet50_compconv64", "resnet50", 64, pretrained, **kwargs)


@register_model
def resnet50_compconv128(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-50 with CompConv128, the paper's recommended setting."""
    return _create_compconv("resnet50_compconv128", "resnet50", 128, pretrained, **kwargs)


@register_model
def resnet50_compconv256(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-50 with CompConv256."""
    return _create_compconv("resnet50_compconv256", "resnet50", 256, pretrained, **kwargs)


@register_model
def resnet50_compconv512(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-50 with CompConv512 (lightest compression of the family)."""
    return _create_compconv("resnet50_compconv512", "resnet50", 512, pretrained, **kwargs)


@register_model
def resnet101_compconv128(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-101 with CompConv128."""
    return _create_compconv("resnet101_compconv128", "resnet101", 128, pretrained, **kwargs)


@register_model
def vgg16_compconv128(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """VGG-16 with CompConv128 in its feature convs (fc6/fc7 in ``pre_logits`` stay dense)."""
    return _create_compconv("vgg16_compconv128", "vgg16", 128, pretrained, **kwargs)


@register_model
def vgg16_bn_compconv128(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """VGG-16-BN with CompConv128."""
    return _create_compconv("vgg16_bn_compconv128", "vgg16_bn", 128, pretrained, **kwargs)


@register_model
def resnet50_ghost(pretrained: bool = False, ghost: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """ResNet-50 with Ghost modules (ratio 2, depthwise 3x3 cheap op) in place of every conv with C_in >= 16:
    the peer CompConv is benchmarked against. Options: ``ghost={"ratio": 2, "dw_size": 3}``."""
    return _create_patched("resnet50_ghost", "resnet50", pretrained, "ghost", dict(ghost or {}), **kwargs)


def compconv_model_names() -> list[str]:
    """Names of every CompConv model registered by this package."""
    return sorted(name for name in __all__ if "_compconv" in name)


def registered_model_names() -> list[str]:
    """Every model this package registers: the CompConv models and the Ghost peer."""
    return sorted(__all__)

"""timm registrations of CompConv models: ``timm.create_model('resnet50_compconv128')`` after ``import compconv``.

Each variant is a tiny registered function that builds the plain timm architecture and patches
it with :func:`compconv.patch`. Baselines keep their plain timm names (``resnet50``, ``vgg16``).
CompConv options other than C_0 are passed as ``compconv={"tail": "dense", ...}``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .deploy import ReparameterizableStage
from .layers import CompConv2d
from .options import CompConvOptions
from .patch import patch

__all__: list[str] = []  # filled by register_model
_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {}  # CompConv model name -> (timm base, its CompConv options)


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
    registered = timm.models.get_pretrained_cfg(variant)
    cfg = registered.to_dict() if registered is not None else _cfg()
    model.pretrained_cfg = model.default_cfg = cfg
    model.compconv_report = patch(model, method=method, **options)
    if method == "compconv":
        _reparameterizable_stages(model)
    return model


def _reparameterizable_stages(model: nn.Module) -> None:
    """Makes each top-level ``nn.Sequential`` holding CompConv layers (ResNet ``layerN``, VGG ``features``) a
    :class:`ReparameterizableStage`, so ``timm.utils.reparameterize_model`` deploys it. Keys, parameters and
    forward are those of the Sequential."""
    for name, child in list(model.named_children()):
        if type(child) is nn.Sequential and any(isinstance(m, CompConv2d) for m in child.modules()):
            setattr(model, name, ReparameterizableStage(OrderedDict(child.named_children())))


def _create_compconv(variant: str, base: str, c0: int, pretrained: bool = False,
                     compconv: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    defaults = variant_options(variant) or CompConvOptions(c0=c0).as_dict()
    options = CompConvOptions.from_mapping({**defaults, **(compconv or {})}).as_dict()
    return _create_patched(variant, base, pretrained, "compconv", options, **kwargs)


def register_compconv_variant(name: str, base: str, **options: Any) -> None:
    """Registers ``name`` with timm as ``base`` patched with these CompConv options (e.g.
    ``register_compconv_variant("resnet50_compconv128_dense", "resnet50", c0=128, tail="dense")``);
    the entry points then offer it as ``model=name`` with its options in full."""
    _VARIANTS[name] = (base, CompConvOptions.from_mapping(options).as_dict())

    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create_compconv(name, base, _VARIANTS[name][1]["c0"], pretrained, **kwargs)

    create.__name__ = name
    create.__module__ = __name__
    create.__doc__ = f"{base} with CompConv options {_VARIANTS[name][1]}."
    globals()[name] = create
    timm.models.register_model(create)


def variant_options(name: str) -> dict[str, Any] | None:
    """The CompConv options a registered CompConv model is built with by default (None for other models)."""
    entry = _VARIANTS.get(name)
    return dict(entry[1]) if entry else None


def variant_base(name: str) -> str | None:
    """The timm model a registered CompConv model patches (None for other models)."""
    entry = _VARIANTS.get(name)
    return entry[0] if entry else None


def model_label(name: str, compconv: dict[str, Any] | None) -> str:
    """``name``, plus the CompConv options that differ from the variant's own, so that a run of
    ``model=resnet50_compconv128 model.compconv.c0=256`` is labelled ``resnet50_compconv128-c0_256``."""
    defaults = variant_options(name)
    if not compconv or defaults is None:
        return name
    options = CompConvOptions.from_mapping({**defaults, **compconv}).as_dict()
    changed = [f"{key}_{value}" for key, value in options.items() if defaults.get(key) != value]
    return "-".join([name, *changed])


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


_VARIANTS.update({name: (base, CompConvOptions(c0=c0).as_dict()) for name, base, c0 in (
    *((f"resnet50_compconv{c0}", "resnet50", c0) for c0 in (32, 64, 128, 256, 512)),
    ("resnet18_compconv128", "resnet18", 128), ("resnet34_compconv128", "resnet34", 128),
    ("resnet101_compconv128", "resnet101", 128), ("vgg16_compconv128", "vgg16", 128),
    ("vgg16_bn_compconv128", "vgg16_bn", 128))})


def compconv_model_names() -> list[str]:
    """Names of every CompConv model registered by this package."""
    return sorted(name for name in __all__ if name in _VARIANTS)


def registered_model_names() -> list[str]:
    """Every model this package registers: the CompConv models and the Ghost peer."""
    return sorted(__all__)

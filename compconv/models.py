"""timm registrations: ``timm.create_model('resnet50_compconv128')`` after ``import compconv``. Every variant
is one row of :data:`MODELS`, registered by :func:`register_variant`; baselines keep their timm names.
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
_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {}  # CompConv model name -> (timm base, its CompConv options)
_GHOST_PAPER = "arXiv:1911.11907"
default_cfgs: dict[str, Any] = {}  # filled by register_variant; timm reads it by this name


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # No url / hf_hub_id: no pretrained CompConv weights exist.
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0", "paper_ids": "arXiv:2106.10486",
        **kwargs,
    }


_VGG = {"first_conv": "features.0", "classifier": "head.fc", "pool_size": (7, 7)}  # as timm's vgg16


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
    model.pretrained_cfg = model.default_cfg = timm.models.get_pretrained_cfg(variant).to_dict()
    model.compconv_report = patch(model, method=method, **options)
    return model


def register_variant(name: str, base: str, method: str = "compconv", doc: str = "", **options: Any) -> None:
    """Registers ``name`` with timm: the timm model ``base`` patched by ``method`` with these options; it takes
    ``compconv={...}`` (or ``ghost={...}``) overrides at ``timm.create_model``.
    """
    if method == "compconv":
        options = CompConvOptions.from_mapping(options).as_dict()
        _VARIANTS[name] = (base, options)
    paper = _GHOST_PAPER if method == "ghost" else "arXiv:2106.10486"
    cfg = _cfg(paper_ids=paper, **(_VGG if base.startswith("vgg") else {}))
    default_cfgs.update(generate_default_cfgs({name: cfg}))  # timm's register_model reads the module's cfgs

    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        overrides = kwargs.pop(method, None) or {}
        if method == "compconv":
            chosen = CompConvOptions.from_mapping({**_VARIANTS[name][1], **overrides}).as_dict()
        else:
            chosen = {**options, **overrides}
        return _create_patched(name, base, pretrained, method, chosen, **kwargs)

    create.__name__ = name
    create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = doc or f"{base} patched by {method} with options {options}."
    globals()[name] = create
    register_model(create)


# The registry: (name, timm base, method, options, docstring). A new variant is one row.
MODELS: tuple[tuple[str, str, str, dict[str, Any], str], ...] = (
    ("resnet18_compconv64", "resnet18", "compconv", {"c0": 64}, "ResNet-18 with CompConv64."),
    ("resnet18_compconv128", "resnet18", "compconv", {"c0": 128},
     "ResNet-18 with CompConv128 in place of every conv with C_in >= 16."),
    ("resnet18_compconv256", "resnet18", "compconv", {"c0": 256}, "ResNet-18 with CompConv256."),
    ("resnet34_compconv128", "resnet34", "compconv", {"c0": 128}, "ResNet-34 with CompConv128."),
    ("resnet50_compconv32", "resnet50", "compconv", {"c0": 32},
     "ResNet-50 with CompConv32 (strongest compression of the family)."),
    ("resnet50_compconv64", "resnet50", "compconv", {"c0": 64}, "ResNet-50 with CompConv64."),
    ("resnet50_compconv128", "resnet50", "compconv", {"c0": 128},
     "ResNet-50 with CompConv128, the paper's recommended setting."),
    ("resnet50_compconv256", "resnet50", "compconv", {"c0": 256}, "ResNet-50 with CompConv256."),
    ("resnet50_compconv512", "resnet50", "compconv", {"c0": 512},
     "ResNet-50 with CompConv512 (lightest compression of the family)."),
    ("resnet101_compconv128", "resnet101", "compconv", {"c0": 128}, "ResNet-101 with CompConv128."),
    ("vgg16_compconv128", "vgg16", "compconv", {"c0": 128},
     "VGG-16 with CompConv128 in its feature convs (fc6/fc7 in ``pre_logits`` stay dense)."),
    ("vgg16_bn_compconv128", "vgg16_bn", "compconv", {"c0": 128}, "VGG-16-BN with CompConv128."),
    ("resnet18_ghost", "resnet18", "ghost", {},
     "ResNet-18 with Ghost modules (ratio 2, depthwise 3x3 cheap op): the peer of ``resnet18_compconv128``."),
    ("resnet50_ghost", "resnet50", "ghost", {},
     "ResNet-50 with Ghost modules (ratio 2, depthwise 3x3 cheap op) in place of every conv with C_in >= 16: the "
     "peer CompConv is benchmarked against. Options: ``ghost={'ratio': 2, 'dw_size': 3}``."),
)
for _name, _base, _method, _options, _doc in MODELS:
    register_variant(_name, _base, _method, _doc, **_options)


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


def compconv_model_names() -> list[str]:
    """Names of every CompConv model registered by this package."""
    return sorted(name for name in __all__ if name in _VARIANTS)


def registered_model_names() -> list[str]:
    """Every model this package registers: the CompConv models and the Ghost peer."""
    return sorted(__all__)

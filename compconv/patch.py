"""Replace the eligible ``nn.Conv2d`` layers of any model by CompConv (or Ghost) modules, in place."""

from __future__ import annotations

import fnmatch
import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from torch import nn

from .ghost import GhostConv2d, GhostOptions, GhostPlan, ghost_plan
from .factory import compconv_class
from .layers import CompConv2d
from .options import CompConvOptions
from .sizing import CompConvPlan, plan

METHODS = {
    "compconv": (CompConvOptions, plan, CompConv2d),
    "ghost": (GhostOptions, ghost_plan, GhostConv2d),
}

__all__ = ["PatchReport", "PatchedLayer", "SkippedLayer", "default_exclude", "patch"]

# timm's VGG implements fc6/fc7 as convolutions inside `pre_logits`; they are classifier layers.
_CLASSIFIER_PATTERNS = ("pre_logits", "pre_logits.*")


@dataclass(frozen=True)
class PatchedLayer:
    """One replaced layer: its geometry and the plan's numbers before/after (MACs per output position)."""

    name: str
    plan: CompConvPlan | GhostPlan
    stride: tuple[int, int]

    def row(self) -> dict[str, Any]:
        p = self.plan
        return {
            "name": self.name, "c_in": p.in_channels, "c_out": p.out_channels,
            "kernel": f"{p.kernel_size[0]}x{p.kernel_size[1]}", "stride": self.stride[0],
            "depth": p.depth, "c_prim": p.c_prim,
            "macs_per_pos_before": p.plain_macs_per_position, "macs_per_pos_after": p.macs_per_position,
            "params_before": p.plain_params, "params_after": p.params, "note": p.depth_note,
        }


@dataclass(frozen=True)
class SkippedLayer:
    name: str
    reason: str


@dataclass
class PatchReport:
    """What :func:`patch` did: one row per replaced layer and every skipped conv with the reason."""

    options: CompConvOptions | GhostOptions
    replaced: list[PatchedLayer] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(layer.plan.plain_params for layer in self.replaced)

    @property
    def params_after(self) -> int:
        return sum(layer.plan.params for layer in self.replaced)

    def table(self) -> str:
        """Markdown table of the replaced and skipped layers (MACs per output position)."""
        head = ["name", "c_in", "c_out", "kernel", "stride", "depth", "c_prim",
                "macs_per_pos_before", "macs_per_pos_after", "params_before", "params_after", "note"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(layer.row()[h]) for h in head) + " |" for layer in self.replaced]
        if self.skipped:
            lines += ["", "Skipped:"] + [f"- `{s.name}`: {s.reason}" for s in self.skipped]
        return "\n".join(lines)

    def __str__(self) -> str:
        return (f"PatchReport({len(self.replaced)} replaced, {len(self.skipped)} skipped, "
                f"conv params {self.params_before:,} -> {self.params_after:,})")


def default_exclude(model: nn.Module) -> tuple[str, ...]:
    """Classifier layers that are never CompConv layers: timm's classifier and VGG's ``pre_logits``."""
    patterns = list(_CLASSIFIER_PATTERNS)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") if isinstance(cfg, dict) else None
    if classifier:
        names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        patterns += [n for name in names for n in (name, f"{name}.*")]
    return tuple(patterns)


def _parent(model: nn.Module, name: str) -> nn.Module:
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


@functools.lru_cache(maxsize=None)
def _parameters_read(owner: type) -> frozenset[str]:
    """Attributes ``a`` whose ``self.a.weight`` or ``.bias`` a ``forward*`` method of ``owner`` reads (for a device
    or dtype, say): a CompConv there would fail the model's forward.
    """
    read = set()
    for cls in owner.__mro__:
        if cls.__module__.startswith("torch.nn") or cls is object:
            continue
        for name, member in vars(cls).items():
            if not name.startswith("forward") or not inspect.isfunction(member):
                continue
            try:
                source = inspect.getsource(member)
            except (OSError, TypeError):  # defined in a REPL or built: nothing to read
                continue
            read.update(re.findall(r"self\.(\w+)\.(?:weight|bias)\b", source))
    return frozenset(read)


def _skip_reason(module: nn.Conv2d, min_in_channels: int) -> str:
    if type(module) is not nn.Conv2d:
        return f"{type(module).__name__} subclasses nn.Conv2d with its own forward"
    if module.groups != 1:
        return f"grouped/depthwise conv (groups={module.groups})"
    if module.in_channels < min_in_channels:
        return f"in_channels={module.in_channels} < min_in_channels={min_in_channels}"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    if isinstance(module.padding, str) and module.padding == "same" and any(
        d * (k - 1) % 2 for k, d in zip(module.kernel_size, module.dilation)
    ):
        return "asymmetric 'same' padding"
    return ""


def patch(
    model: nn.Module,
    c0: int | None = None,
    *,
    method: str = "compconv",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    min_in_channels: int = 16,
    options: CompConvOptions | GhostOptions | None = None,
    **option_overrides: Any,
) -> PatchReport:
    """Replaces eligible ``nn.Conv2d`` layers of ``model`` by CompConv modules, in place.

    Eligible: exactly ``nn.Conv2d``, ``groups == 1``, ``in_channels >= min_in_channels`` (the RGB stem stays
    plain), zero padding, matching ``include`` and not ``exclude``, and its ``.weight``/``.bias`` not read by its
    parent's ``forward``. The classifier (timm ``pretrained_cfg['classifier']``) is excluded by default.

    Args:
        model: Any ``nn.Module`` (timm, torchvision, your own).
        c0: C_0 of the adaptive depth rule; shortcut for ``c0=`` in the options.
        method: ``"compconv"`` (default) or ``"ghost"`` (the Ghost-module peer, options ``ratio``, ``dw_size``).
        include: fnmatch patterns of module names to consider (default: all).
        exclude: fnmatch patterns of module names to leave alone (default: :func:`default_exclude`).
        min_in_channels: Smallest C_in that is replaced.
        options: CompConv options; keyword overrides (``tail="dense"``, ``efficient=False``...) apply on top.

    Returns:
        A :class:`PatchReport` with one row per replaced layer and the skipped convs with reasons.
    """
    if method not in METHODS:
        raise ValueError(f"unknown patch method {method!r}; choose one of {sorted(METHODS)}")
    options_cls, plan_fn, module_cls = METHODS[method]
    if c0 is not None:
        option_overrides["c0"] = c0
    opts = options_cls.from_mapping(options.as_dict() if options else None, **option_overrides)
    exclude = tuple(exclude) if exclude is not None else default_exclude(model)
    include = tuple(include) if include is not None else None
    report = PatchReport(opts)
    targets = _targets(model, include, exclude, min_in_channels, report)
    for name, conv in targets:
        bias = conv.bias is not None
        layer_plan = plan_fn(conv.in_channels, conv.out_channels, conv.kernel_size, bias=bias, options=opts)
        if layer_plan.depth > 0:  # depth 0 keeps the original conv and its weights
            parent, attr = _parent(model, name), name.rpartition(".")[2]
            # each layer is planned once: the module is built from the plan the report holds
            sizing = {"plan": layer_plan} if module_cls is CompConv2d else {"options": opts}
            layer_cls = compconv_class(opts) if module_cls is CompConv2d else module_cls
            new = layer_cls(
                conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                bias=bias, device=conv.weight.device, dtype=conv.weight.dtype, **sizing,
            )
            new.train(conv.training)
            setattr(parent, attr, new)
        report.replaced.append(PatchedLayer(name, layer_plan, tuple(conv.stride)))
    return report


def _targets(model: nn.Module, include: tuple | None, exclude: tuple, min_in_channels: int,
             report: PatchReport) -> list[tuple[str, nn.Conv2d]]:
    """The convs :func:`patch` replaces, by name; every other conv goes to ``report.skipped`` with the reason."""
    targets = []
    inside = ()  # prefixes of existing CompConv modules: their internal convs are never patched again
    for name, module in model.named_modules():
        if isinstance(module, (CompConv2d, GhostConv2d)):
            inside += (name + ".",)
        if not isinstance(module, nn.Conv2d) or name.startswith(inside):
            continue
        if include is not None and not _matches(name, include):
            report.skipped.append(SkippedLayer(name, "not matched by include"))
        elif _matches(name, exclude):
            report.skipped.append(SkippedLayer(name, "excluded (classifier or exclude pattern)"))
        elif reason := _skip_reason(module, min_in_channels):
            report.skipped.append(SkippedLayer(name, reason))
        elif name.rpartition(".")[2] in _parameters_read(owner := type(_parent(model, name))):
            report.skipped.append(SkippedLayer(name, f"{owner.__name__} reads its .weight or .bias"))
        else:
            targets.append((name, module))
    return targets

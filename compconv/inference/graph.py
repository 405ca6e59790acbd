"""Where deploy may fold, read from the traced dataflow (``torch.fx``), never from module names or order.

For each :class:`CompConv2d`: ``norm``, the ``nn.BatchNorm2d`` that is the only user of its output, and
``consumer``, the conv reading that norm's output through per-channel ops only (each intermediate with one
user). Anything else is reported with the reason, and left as it is.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..layers import CompConv2d
from ..lowrank import LowRankConv2d

__all__ = ["Site", "analyse", "plain_conv_norms"]

_PER_CHANNEL_MODULES = (nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Hardswish,
                        nn.Mish, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d)
_PER_CHANNEL_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.leaky_relu, F.elu, F.hardswish, F.mish,
                          F.dropout, F.max_pool2d, F.avg_pool2d, torch.relu_}
_PER_CHANNEL_METHODS = {"relu", "relu_", "contiguous", "clone"}
_CONSUMERS = (nn.Conv2d, CompConv2d, LowRankConv2d)


@dataclass
class Site:
    """What the dataflow says about one CompConv layer (module names; reasons when a fold is not proven)."""

    name: str
    norm: Optional[str] = None
    norm_reason: Optional[str] = None
    consumer: Optional[str] = None
    consumer_reason: Optional[str] = None
    between: tuple[str, ...] = ()  # modules on the way from the norm to the consumer (per-channel ops)


class _Tracer(fx.Tracer):
    """FX tracer with CompConv layers and norms as leaves, and timm's own leaf modules and functions."""

    def __init__(self) -> None:
        from timm.layers import get_notrace_functions, get_notrace_modules

        self._timm_leaves = tuple(get_notrace_modules())
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (CompConv2d, LowRankConv2d, nn.BatchNorm2d) + self._timm_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.Graph:
    """The model's graph with CompConv layers and norms as single nodes (raises what FX raises)."""
    return _Tracer().trace(model)


def _only_user(node: fx.Node) -> tuple[Optional[fx.Node], Optional[str]]:
    users = list(node.users)
    if len(users) != 1:
        return None, f"its output has {len(users)} users"
    return users[0], None


def _is_per_channel(node: fx.Node, source: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True when ``node`` applies a per-channel op to ``source`` and reads no other tensor."""
    others = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, fx.Node)]
    if not node.args or node.args[0] is not source or others:
        return False
    if node.op == "call_module":
        return type(modules[node.target]) in _PER_CHANNEL_MODULES
    if node.op == "call_function":
        return node.target in _PER_CHANNEL_FUNCTIONS
    if node.op == "call_method":
        return node.target in _PER_CHANNEL_METHODS
    return False


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} {node.target}"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return "a residual sum" if node.target in (operator.add, torch.add) else name
    return f"{node.op} {node.target}"


def plain_conv_norms(model: nn.Module, graph: fx.Graph) -> list[tuple[str, str]]:
    """``(conv, norm)`` for each plain ``nn.Conv2d`` whose only user is an ``nn.BatchNorm2d`` with running
    statistics (both exactly those classes, each called once): the norm folds into the conv.
    """
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) is not nn.Conv2d or calls[node.target] > 1:
            continue
        user, _ = _only_user(node)
        norm = modules.get(user.target) if user is not None and user.op == "call_module" else None
        if (type(norm) is nn.BatchNorm2d and calls[user.target] == 1 and user.args == (node,) and not user.kwargs
                and norm.track_running_stats and norm.running_mean is not None):
            pairs.append((node.target, user.target))
    return pairs


def analyse(model: nn.Module, graph: Optional[fx.Graph] = None) -> dict[str, Site]:
    """A :class:`Site` for every CompConv layer the traced ``model`` calls, by module name (``graph``: its trace,
    or traced here; raises what ``torch.fx`` raises for a model it cannot trace).
    """
    graph = graph if graph is not None else trace(model)
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    sites: dict[str, Site] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], CompConv2d):
            continue
        site = sites[node.target] = Site(node.target)
        if calls[node.target] > 1:
            site.norm_reason = site.consumer_reason = f"the layer is called {calls[node.target]} times"
            continue
        user, reason = _only_user(node)
        if user is None:
            site.norm_reason = site.consumer_reason = reason
            continue
        norm = modules.get(user.target) if user.op == "call_module" else None
        if type(norm) is not nn.BatchNorm2d:
            what = _describe(user, modules)
            if isinstance(norm, nn.BatchNorm2d):
                what += " (a norm subclass that may act beyond BatchNorm2d, e.g. an activation)"
            site.norm_reason = site.consumer_reason = f"followed by {what}, not by a BatchNorm2d"
            continue
        if calls[user.target] > 1 or not norm.track_running_stats or norm.running_mean is None:
            site.norm_reason = site.consumer_reason = f"its norm {user.target} is shared or keeps no statistics"
            continue
        site.norm = user.target
        site.consumer, site.consumer_reason, site.between = _find_consumer(user, modules, calls)
    return sites


def _find_consumer(norm_node: fx.Node, modules: dict[str, nn.Module],
                   calls: Counter) -> tuple[Optional[str], Optional[str], tuple[str, ...]]:
    """(consumer, None, modules between) or (None, reason, ())."""
    node, between = norm_node, []
    while True:
        user, reason = _only_user(node)
        if user is None:
            return None, f"{_describe(node, modules)}: {reason}", ()
        if user.op == "call_module" and isinstance(modules[user.target], _CONSUMERS):
            module = modules[user.target]
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                return None, f"the next conv {user.target} is grouped", ()
            if len(user.args) != 1 or user.args[0] is not node or user.kwargs:
                return None, f"the next conv {user.target} reads more than this output", ()
            if calls[user.target] > 1:
                return None, f"the next conv {user.target} is called {calls[user.target]} times", ()
            return user.target, None, tuple(between)
        if not _is_per_channel(user, node, modules):
            return (None, f"its output goes to {_describe(user, modules)}, which mixes channels or reads other "
                    "tensors", ())
        if user.op == "call_module":
            between.append(user.target)
        node = user

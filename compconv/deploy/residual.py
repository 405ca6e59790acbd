"""Residual sums written by the convolution into the shortcut's memory (eager PyTorch on the CPU).

After deploy's folds, a residual block ends ``relu(conv(x) + shortcut)`` with a plain conv (the dense or
low-rank form of a CompConv with its BatchNorm absorbed). Eager PyTorch runs that as a convolution into a
freshly allocated output, an in-place sum and an in-place ReLU. At batch 32 and 56x56 that output is
103 MB: the allocator maps it afresh on every call, and faulting it in costs more than the convolution's
arithmetic. oneDNN can instead accumulate the convolution into the shortcut's memory with the ReLU as a
post-op (``mkldnn::_convolution_pointwise_.binary``): no allocation, no extra pass, the same sums.

Writing into the shortcut is only correct when nothing reads it afterwards, and that is proven on the
block's own traced forward (``torch.fx``), so it holds however the block is reached (the model's
``forward``, ``forward_features``, ``forward_intermediates``, a stage called alone):

- the shortcut is made inside the block (a downsample branch): every op that reads it or may alias it
  runs before the sum and the block does not return it; or
- the shortcut is the block's input, the block is element k >= 1 of an ``nn.Sequential`` stage, block
  k - 1 returns a tensor it made (or, recursively, its own input), and block k reads its input only before
  the sum: the stage hands block k the output of block k - 1, which nothing else holds.

Either way the block must be an element of an ``nn.Sequential`` stage, which decides at each call.

The block is replaced by its traced graph (a ``torch.fx.GraphModule`` with the same submodules and state
dict) whose forward takes ``(x, owned=False)`` and calls the conv as ``conv(x, shortcut, owned)``; its stage
becomes a :class:`DonatingSequential`, which passes ``owned=True`` when no forward hook (global, or on a
module of the block or of the block before it) could have kept a reference to the shortcut. A block called
alone therefore sums out of place. At run time a :class:`ResidualConv2d` writes in place only in eager
mode, on float32 CPU tensors, without autograd; otherwise, and under graph capture (``torch.export``,
``torch.onnx.export``, FX, ``jit.trace``, TorchScript), it computes ``relu(conv(x) + shortcut)``.

Under ``torch.compile`` (inference on channels_last float32 CPU tensors) it computes the same with oneDNN's
functional ``mkldnn._convolution_pointwise``: inductor's oneDNN passes match that op (not
``aten.convolution``) followed by the sum and ReLU, fuse the three, and write in place where inductor's own
graph proves the shortcut dead (never into a graph input). The in-place op itself has no fake kernel, so
calling it would break dynamo's graph at every sum (measured 0.996x).
"""


import operator
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules import module as module_hooks

from ..layers import CompConv2d, in_graph_capture
from .forms import DeployedCompConv2d, LowRankConv2d

__all__ = ["DonatingSequential", "ResidualConv2d", "ResidualLowRankConv2d", "ResidualSite", "find_sites",
           "fuse_residual_sums"]


def _hooked(module: nn.Module) -> bool:
    """True when a forward hook (global, or on ``module`` or a module in it) could keep a reference to a tensor."""
    if (module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
            or module_hooks._global_forward_hooks_always_called):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


class ResidualConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that, called as ``conv(x, shortcut, owned)``, returns ``conv(x) + shortcut`` (then ReLU if
    ``relu``), written into ``shortcut``'s memory when ``owned`` (the caller proved nothing reads it later).

    Called as ``conv(x)`` it is the plain conv. Same parameters and state dict keys as the conv it replaces.
    """

    relu: bool

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, relu: bool) -> "ResidualConv2d":
        """``conv`` (sharing its parameters) as a residual conv."""
        fused = cls.__new__(cls)
        fused.__dict__.update(conv.__dict__)
        fused.relu = relu
        return fused

    def extra_repr(self) -> str:
        return super().extra_repr() + f", residual sum{' + relu' if self.relu else ''}"

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None, owned: bool = False) -> torch.Tensor:
        if shortcut is None:
            return self._conv_forward(x, self.weight, self.bias)
        if not torch.jit.is_scripting():
            if owned and not in_graph_capture() and self._in_place_ok(x, shortcut):
                return torch.ops.mkldnn._convolution_pointwise_.binary(
                    shortcut, x, self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation),
                    self.groups, "add", 1.0, "relu" if self.relu else None, [], "")
            if self._inductor_fuses(x, shortcut):
                # inductor's oneDNN passes fuse this conv with the sum and ReLU, in place where its own
                # graph proves the shortcut dead (they match the oneDNN conv op, not aten.convolution)
                y = torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, list(self.padding),
                                                            list(self.stride), list(self.dilation), self.groups,
                                                            "none", [], "")
                y = y + shortcut
                return torch.relu(y) if self.relu else y
        y = self._conv_forward(x, self.weight, self.bias) + shortcut
        return torch.relu(y) if self.relu else y

    def _onednn_fp32(self, x: torch.Tensor, shortcut: torch.Tensor) -> bool:
        """Float32 CPU tensors without autograd or autocast, that oneDNN's fused conv ops take."""
        if (x.device.type != "cpu" or x.dtype != torch.float32 or shortcut.dtype != torch.float32
                or shortcut.device.type != "cpu" or x.dim() != 4 or not torch._C._has_mkldnn
                or not isinstance(self.padding, tuple) or self.padding_mode != "zeros"):
            return False
        if not torch.backends.mkldnn.enabled or torch.is_autocast_enabled("cpu"):
            return False
        return not (torch.is_grad_enabled()
                    and (x.requires_grad or shortcut.requires_grad or self.weight.requires_grad))

    def _inductor_fuses(self, x: torch.Tensor, shortcut: torch.Tensor) -> bool:
        """``torch.compile`` (not export) records a channels_last fp32 CPU inference graph."""
        return (torch.compiler.is_compiling() and not torch.compiler.is_exporting()
                and self._onednn_fp32(x, shortcut) and x.is_contiguous(memory_format=torch.channels_last)
                and shortcut.is_contiguous(memory_format=torch.channels_last))

    def _in_place_ok(self, x: torch.Tensor, shortcut: torch.Tensor) -> bool:
        if not self._onednn_fp32(x, shortcut):
            return False
        n, _, h, w = x.shape
        out_hw = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
                  zip((h, w), self.padding, self.dilation, self.kernel_size, self.stride)]
        return (tuple(shortcut.shape) == (n, self.out_channels, *out_hw)
                and (shortcut.is_contiguous() or shortcut.is_contiguous(memory_format=torch.channels_last)))


class ResidualLowRankConv2d(LowRankConv2d):
    """A :class:`LowRankConv2d` whose second conv is a :class:`ResidualConv2d` (same state dict)."""

    @classmethod
    def from_lowrank(cls, module: LowRankConv2d, second: ResidualConv2d) -> "ResidualLowRankConv2d":
        fused = cls.__new__(cls)
        fused.__dict__.update(module.__dict__)
        fused._modules = dict(module._modules, second=second)
        return fused

    def forward(self, x: torch.Tensor, shortcut: Optional[torch.Tensor] = None, owned: bool = False) -> torch.Tensor:
        if shortcut is None:
            return self.second(self.mix(x))
        return self.second(self.mix(x), shortcut, owned)


class DonatingSequential(nn.Sequential):
    """``nn.Sequential`` whose blocks listed in ``owners`` take ``(x, owned)``: ``owned`` says they may write a
    residual sum into its shortcut (a tensor the block made, or for the blocks in ``donated`` their input, the
    previous block's output, which nothing else holds). True unless a forward hook could keep a reference.
    TorchScript compiles the plain ``nn.Sequential`` loop."""

    owners: List[int]
    donated: List[int]

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.owners, self.donated = [], []

    @classmethod
    def from_sequential(cls, stage: nn.Sequential) -> "DonatingSequential":
        """``stage`` (sharing its blocks) as a donating stage."""
        donating = cls.__new__(cls)
        donating.__dict__.update(stage.__dict__)
        donating.owners, donating.donated = [], []
        return donating

    def _may_write(self, i: int) -> bool:
        return not _hooked(self[i]) and (i not in self.donated or not _hooked(self[i - 1]))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            owners = self.__dict__.get("owners", ())  # a stage pickled before it could donate has none
            for i, module in enumerate(self):
                input = module(input, self._may_write(i)) if i in owners else module(input)
            return input
        for module in self:
            input = module(input)
        return input


@dataclass
class ResidualSite:
    """A residual sum that a block's own dataflow proves may be written into its shortcut."""

    conv: str  # the conv module, relative to the block (for a low-rank form its second conv is fused)
    donated: bool  # the shortcut is the block's input (handed over by a DonatingSequential)


_ADDS = (operator.add, torch.add)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
# ops whose output is a new tensor (never a view or the input itself)
_FRESH_MODULES = (nn.Conv2d, CompConv2d, DeployedCompConv2d, LowRankConv2d, nn.BatchNorm2d, nn.MaxPool2d,
                  nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Linear)
_FRESH_FUNCTIONS = (operator.add, operator.mul, operator.sub, torch.add, torch.mul, torch.cat, F.conv2d,
                    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d)
_ACTIVATIONS = (F.relu, F.relu6, F.silu, F.gelu, F.leaky_relu, F.hardswish, torch.relu, torch.sigmoid)
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)  # may return their input itself


def _fresh(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, (ResidualConv2d, ResidualLowRankConv2d)):
            return False  # returns its shortcut
        if isinstance(module, _FRESH_MODULES):
            return True
        return getattr(module, "inplace", None) is False  # activations constructed out of place
    if node.op == "call_function":
        if node.target in _ACTIVATIONS:
            return node.kwargs.get("inplace", len(node.args) > 1 and node.args[1]) is False
        return node.target in _FRESH_FUNCTIONS and "out" not in node.kwargs
    return False


def _passes_input(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True when ``node``'s output may be its first argument itself (identity or in-place op)."""
    if node.op == "call_module":
        module = modules[node.target]
        return isinstance(module, _PASS_MODULES) or getattr(module, "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_") or node.target in ("contiguous", "to", "type_as", "float")
    if node.op == "call_function":
        return getattr(node.target, "__name__", "").endswith("_") or node.kwargs.get("inplace", False) is True
    return False


def _conv_feeding(node: fx.Node, modules: dict[str, nn.Module]) -> Optional[fx.Node]:
    """The conv call whose output reaches ``node`` through single-user identities only, or None."""
    while len(node.users) == 1 and node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.Identity) and len(node.args) == 1 and isinstance(node.args[0], fx.Node):
            node = node.args[0]
            continue
        conv = module.second if isinstance(module, LowRankConv2d) else module
        if (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
                and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node)):
            return node
        return None
    return None


def _relu_after(add: fx.Node, modules: dict[str, nn.Module]) -> Optional[fx.Node]:
    if len(add.users) != 1:
        return None
    user = next(iter(add.users))
    if len(user.args) != 1 or user.args[0] is not add or user.kwargs:
        return None
    if user.op == "call_module" and type(modules[user.target]) is nn.ReLU:
        return user
    if user.op == "call_function" and user.target in _RELU_FUNCTIONS:
        return user
    if user.op == "call_method" and user.target in ("relu", "relu_"):
        return user
    return None


def _shortcut_private(shortcut: fx.Node, add: fx.Node, conv: fx.Node, modules: dict[str, nn.Module],
                      order: dict[fx.Node, int]) -> tuple[Optional[str], bool]:
    """(why not, donated): whether writing into ``shortcut`` at ``add`` is invisible to the rest
    of the block; ``donated`` when the shortcut is the block's first input (safe only if the caller donates it)."""
    root = shortcut
    while _passes_input(root, modules) and root.args and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    first_input = next((n for n in order if n.op == "placeholder"), None)
    donated = root is first_input
    if not donated and not _fresh(root, modules):
        return f"the shortcut comes from {root.op} {root.target}, not from an op that makes a new tensor", False
    group, frontier = {root}, [root]
    while frontier:  # everything that may alias the shortcut's memory
        node = frontier.pop()
        for user in node.users:
            if user is add:
                continue
            if user.op == "output":
                return "the block returns the shortcut", donated
            if order[user] > order[add]:
                return f"{user.op} {user.target} reads the shortcut after the sum", donated
            if user not in group and not _fresh(user, modules):
                group.add(user)
                frontier.append(user)
    if conv.args[0] in group:
        return "the conv reads the shortcut's memory", donated
    return None, donated


def find_sites(block: nn.Module, graph: fx.Graph) -> tuple[list[tuple[fx.Node, fx.Node, Optional[fx.Node],
                                                                         fx.Node, ResidualSite]], dict[str, str]]:
    """The residual sums in ``block``'s own traced ``graph`` that may be written into their shortcut, as
    (conv node, sum node, ReLU node or None, shortcut node, site), and each conv left with the reason."""
    modules = dict(block.named_modules())
    order = {node: i for i, node in enumerate(graph.nodes)}
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    found, left = [], {}
    for add in graph.nodes:
        if (add.op != "call_function" or add.target not in _ADDS or add.kwargs or len(add.args) != 2
                or not all(isinstance(a, fx.Node) for a in add.args) or add.meta.get("nn_module_stack")):
            continue  # only sums in the block's own forward: a submodule's sums are its own block's
        for conv_arg, shortcut in sorted([add.args, add.args[::-1]], key=lambda pair: -order[pair[0]]):
            conv = _conv_feeding(conv_arg, modules)
            if conv is None:
                continue
            if calls[conv.target] > 1:
                left[conv.target] = f"the conv is called {calls[conv.target]} times"
                break
            reason, donated = _shortcut_private(shortcut, add, conv, modules, order)
            if reason:
                left[conv.target] = reason
                break
            relu = _relu_after(add, modules)
            found.append((conv, add, relu, shortcut, ResidualSite(conv.target, donated)))
            break
    return found, left


def _is_stage(module: nn.Module) -> bool:
    """True for a container that runs its children in order and hands each the previous one's output."""
    return isinstance(module, DonatingSequential) or (isinstance(module, nn.Sequential)
                                                      and type(module).forward is nn.Sequential.forward)


def _output_kind(block: nn.Module, graph: fx.Graph) -> str:
    """``"fresh"`` when ``block`` returns a tensor it made, ``"input"`` when its own input, else ``"other"``."""
    modules = dict(block.named_modules())
    (output,) = [n for n in graph.nodes if n.op == "output"]
    node = output.args[0]
    while isinstance(node, fx.Node):
        if node.op == "placeholder":
            return "input" if node is next(n for n in graph.nodes if n.op == "placeholder") else "other"
        if _fresh(node, modules):
            return "fresh"
        if not (_passes_input(node, modules) and node.args):
            return "other"
        node = node.args[0]
    return "other"


def _rewrite(block: nn.Module, graph: fx.Graph, found: list) -> fx.GraphModule:
    """``block`` as a GraphModule taking ``(x, owned=False)`` whose sums ``found`` are done by their conv."""
    modules = dict(block.named_modules())
    (only_input,) = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(only_input):
        owned = graph.placeholder("owned", type_expr=bool, default_value=False)
    for conv, add, relu, shortcut, site in found:
        module = modules[conv.target]
        fused = ResidualConv2d.from_conv(module.second if isinstance(module, LowRankConv2d) else module,
                                         relu is not None)
        block.set_submodule(conv.target, ResidualLowRankConv2d.from_lowrank(module, fused)
                            if isinstance(module, LowRankConv2d) else fused)
        # the fused call happens where the sum was: the identities between conv and sum go, the conv moves there
        chain = [a for a in add.args if a is not shortcut][0]
        add.args = (shortcut, shortcut)
        while chain is not conv:
            previous_node = chain.args[0]
            graph.erase_node(chain)
            chain = previous_node
        add.prepend(conv)
        conv.args = (conv.args[0], shortcut, owned)
        last = relu if relu is not None else add
        last.replace_all_uses_with(conv)
        graph.erase_node(last)
        if relu is not None:
            graph.erase_node(add)
    graph.lint()
    rewritten = fx.GraphModule(block, graph, class_name=f"{type(block).__name__}Fused")
    for name, child in block.named_children():  # the block's own submodules (FX keeps only those called, under
        rewritten.add_module(name, child)        # bare parents), so every module keeps its name and class
    for name, tensor in list(block._parameters.items()) + list(block._buffers.items()):
        if not hasattr(rewritten, name):
            setattr(rewritten, name, tensor)
    rewritten.train(block.training)
    return rewritten


def fuse_residual_sums(model: nn.Module, tracer: Callable[[nn.Module], fx.Graph]) -> tuple[list[str], dict[str, str]]:
    """Writes every residual sum whose block's dataflow proves it safe into its shortcut (module docstring).

    Args:
        model: The deployed copy; its blocks, and the ``nn.Sequential`` stages that call them, are replaced.
        tracer: Traces a module with deploy's leaves (CompConv layers, norms).

    Returns:
        The fused convs' names, and the convs feeding a residual sum that were left, with the reason.
    """
    fused, left = [], {}
    stages = [(name, m) for name, m in model.named_modules()
              if _is_stage(m) and (name or isinstance(m, DonatingSequential))]  # the root only if it can donate
    for stage_name, stage in stages:
        prefix = f"{stage_name}." if stage_name else ""
        plans, kinds = {}, []
        for index, block in enumerate(stage):
            try:
                graph = tracer(block)
            except Exception:  # a block FX cannot trace alone keeps its sums
                kinds.append("other")
                continue
            kinds.append(_output_kind(block, graph))
            if not any(isinstance(c, (nn.Conv2d, LowRankConv2d)) for c in block.modules()):
                continue
            found, why = find_sites(block, graph)
            left.update({f"{prefix}{index}.{conv}": reason for conv, reason in why.items()})
            one_input = sum(n.op == "placeholder" for n in graph.nodes) == 1
            if any(site.donated for *_, site in found) and not (
                    index >= 1 and one_input and _hands_fresh(kinds, index - 1)):
                for *_, site in found:
                    if site.donated:
                        left[f"{prefix}{index}.{site.conv}"] = (
                            "the shortcut is the block's input, and the stage hands it a tensor others may hold (the "
                            "stage's input, or what the previous block did not make)")
                found = [f for f in found if not f[-1].donated]
            if found and one_input:
                plans[index] = (graph, found)
        if not plans:
            continue
        donating = stage if isinstance(stage, DonatingSequential) else DonatingSequential.from_sequential(stage)
        for index, (graph, found) in plans.items():
            block = stage[index]
            rewritten = _rewrite(block, graph, found)
            names = [f"{prefix}{index}.{site.conv}" for *_, site in found]
            if set(rewritten.state_dict()) != set(block.state_dict()):
                left.update({name: "the block's traced form would change its state dict keys" for name in names})
                continue
            donating[index] = rewritten
            donating.owners.append(index)
            if any(site.donated for *_, site in found):
                donating.donated.append(index)
            fused += names
        if donating is not stage and donating.owners:
            model.set_submodule(stage_name, donating)
    return fused, left


def _hands_fresh(kinds: list[str], index: int) -> bool:
    """True when block ``index`` of a stage returns a tensor made inside the stage (see :func:`_output_kind`)."""
    while index >= 0 and kinds[index] == "input":
        index -= 1
    return index >= 0 and kinds[index] == "fresh"

"""The training fast path: :class:`EfficientCompConv2d`, Figure 2's function and gradients with fewer passes
over memory and :class:`compconv.CompConv2d`'s parameters and state-dict keys. :func:`compconv.create_conv2d`
builds it unless the plain module is asked for (``efficient=False``, or a timm model created scriptable or
exportable), as timm's ``create_act`` picks memory-efficient activations. Graph capture (``torch.jit``,
``torch.export``, ONNX, ``torch.fx``) records the plain forward. docs/performance.md says what each part saves.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .capture import compiling_training_graph, memory_format_of, recording_graph
from .checks import relative_error
from .layers import CompConv2d
from .nested import tensors
from .pointwise import LOWRANK_MAX_SHARE, composed_weight, factorised_weights, is_pointwise, lowrank_macs, part_map, \
    scaled_tail
from .shuffle import group_runs, shuffle_keeping_format, shuffled_rows

__all__ = ["FORM_RULES", "ConcatShuffle", "EfficientCompConv2d", "FormRule", "IdentitySlices", "TrainingFormError",
           "assemble", "check_training_forms", "compiled_concat_shuffle", "concat_shuffle", "figure2_forms",
           "training_form"]


@dataclass(frozen=True)
class FormRule:
    """When a pointwise layer trains in its dense or low-rank form rather than the chain, on one kind of device.

    Attributes:
        dense_min_positions: Dense from this many output positions per image ...
        dense_min_positions_heavy: ... or from this many where the chain keeps ``dense_min_chain_share`` or more
            of the plain conv's MACs.
        dense_min_chain_share: See above.
        scaled_dense_min_positions: A depth-1 layer with a depthwise tail trains dense from this many positions.
        affine_in_copy_min_elements: :func:`assemble` writes a norm's affine in the copy of each piece from this
            many elements per piece (per-call costs dominate below).
    """

    dense_min_positions: int
    dense_min_positions_heavy: int
    dense_min_chain_share: float
    scaled_dense_min_positions: int
    affine_in_copy_min_elements: int


# Measured on the 2-core AVX-512 CPU (the per-layer table of results/benchmark_cpu_train.md; assemble's affine
# 1.24-1.35x at 1.6-3.2 M elements, 0.6-0.8x below 0.4 M). A device without a rule trains every layer in the chain
# form, the simplest exact one, until it is measured there.
FORM_RULES: Dict[str, FormRule] = {
    "cpu": FormRule(dense_min_positions=28 * 28, dense_min_positions_heavy=14 * 14, dense_min_chain_share=0.5,
                    scaled_dense_min_positions=56 * 56, affine_in_copy_min_elements=1 << 20),
}


def _cat_dtype(parts: List[torch.Tensor]) -> torch.dtype:
    """The dtype ``torch.cat(parts)`` returns (promoted across parts)."""
    return functools.reduce(torch.promote_types, [part.dtype for part in parts])


def assemble(parts: List[torch.Tensor], groups: int, scale: Optional[torch.Tensor] = None,
             shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``channel_shuffle(torch.cat(parts, 1), groups)`` with one copy of each part, in ``parts[0]``'s memory format.

    With ``scale`` and ``shift`` (per output channel) it returns ``scale * y + shift``, an eval BatchNorm without an
    output of its own: written in the copy for large pieces, in place afterwards for small ones (fewer calls).
    """
    first = parts[0]
    n, _, h, w = first.shape
    widths = [part.shape[1] for part in parts]
    channels = sum(widths)
    if scale is not None and shift is not None:
        pieces = len(parts) if groups == 1 else len(list(group_runs(widths, groups)))
        rule = FORM_RULES.get(first.device.type)
        if rule is None or n * channels * h * w < pieces * rule.affine_in_copy_min_elements:
            if groups == 1:  # out= keeps parts[0]'s memory format (cat alone returns NCHW for mixed inputs)
                out = torch.empty((n, channels, h, w), dtype=_cat_dtype(parts), device=first.device,
                                  memory_format=memory_format_of(first))
                torch.cat(parts, dim=1, out=out)
            else:
                out = assemble(parts, groups)
            if scale.dtype != out.dtype:
                scale, shift = scale.to(out.dtype), shift.to(out.dtype)
            return torch.addcmul(shift.view(1, -1, 1, 1), out, scale.view(1, -1, 1, 1), out=out)
    dtype = _cat_dtype(parts)
    out = torch.empty((n, channels, h, w), dtype=dtype, device=first.device, memory_format=memory_format_of(first))
    view = out.view(n, channels // groups, groups, h, w)
    if scale is not None and shift is not None:
        scale = scale.to(dtype).view(1, channels // groups, groups, 1, 1)
        shift = shift.to(dtype).view(1, channels // groups, groups, 1, 1)
    for index, start, stop, group, at in group_runs(widths, groups):
        target = view[:, at:at + stop - start, group]
        if scale is None or shift is None:
            target.copy_(parts[index][:, start:stop])
        else:
            where = (slice(None), slice(at, at + stop - start), group)
            torch.addcmul(shift[where], parts[index][:, start:stop], scale[where], out=target)
    return out


def unshuffle_views(grad: torch.Tensor, widths: List[int], groups: int) -> List[torch.Tensor]:
    """The gradient of each part of :func:`assemble` from the output gradient: views where a part lies in one
    shuffle group (every part of a CompConv does), a concatenation of views otherwise."""
    n, channels, h, w = grad.shape
    view = grad.view(n, channels // groups, groups, h, w)
    pieces: list[list[torch.Tensor]] = [[] for _ in widths]
    for index, start, stop, group, at in group_runs(widths, groups):
        pieces[index].append(view[:, at:at + stop - start, group])
    return [p[0] if len(p) == 1 else torch.cat(p, dim=1) for p in pieces]


class ConcatShuffle(torch.autograd.Function):
    """``channel_shuffle(torch.cat(parts, 1), groups)`` as one autograd node (eager only; see the module doc)."""

    @staticmethod
    def forward(ctx, groups: int, *parts: torch.Tensor) -> torch.Tensor:
        ctx.groups, ctx.widths = groups, [part.shape[1] for part in parts]
        return assemble(list(parts), groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, *unshuffle_views(grad, ctx.widths, ctx.groups))


@torch.library.custom_op("compconv::concat_shuffle", mutates_args=())
def compiled_concat_shuffle(parts: List[torch.Tensor], groups: int) -> torch.Tensor:
    """:func:`assemble` as an operator that ``torch.compile`` calls rather than traces into: fused, the shuffle
    turns a BatchNorm's per-channel statistics into scalar strided gathers. Its backward hands each part a compact
    gradient (:func:`compiled_unshuffle`).
    """
    return assemble(parts, groups)


@compiled_concat_shuffle.register_fake
def _(parts: List[torch.Tensor], groups: int) -> torch.Tensor:
    first = parts[0]
    n, _, h, w = first.shape
    return first.new_empty((n, sum(part.shape[1] for part in parts), h, w), dtype=_cat_dtype(parts)).contiguous(
        memory_format=memory_format_of(first))


@torch.library.custom_op("compconv::unshuffle", mutates_args=())
def compiled_unshuffle(grad: torch.Tensor, widths: List[int], groups: int) -> List[torch.Tensor]:
    """The gradients of :func:`compiled_concat_shuffle`'s parts, each compact in ``grad``'s memory format."""
    memory_format = memory_format_of(grad)
    return [view.contiguous(memory_format=memory_format) for view in unshuffle_views(grad, widths, groups)]


@compiled_unshuffle.register_fake
def _(grad: torch.Tensor, widths: List[int], groups: int) -> List[torch.Tensor]:
    n, _, h, w = grad.shape
    return [grad.new_empty((n, width, h, w)).contiguous(memory_format=memory_format_of(grad)) for width in widths]


def _setup_concat_shuffle(ctx, inputs, output) -> None:
    parts, ctx.groups = inputs
    ctx.widths = [part.shape[1] for part in parts]


def _backward_concat_shuffle(ctx, grad: torch.Tensor):
    return compiled_unshuffle(grad, ctx.widths, ctx.groups), None


compiled_concat_shuffle.register_autograd(_backward_concat_shuffle, setup_context=_setup_concat_shuffle)


class IdentitySlices(torch.autograd.Function):
    """The identity parts of a chain-form CompConv as one autograd node (eager, unpadded sampling) whose input
    gradient keeps ``x``'s memory format; autograd's slice backward is NCHW, which slows every layer upstream.
    """

    @staticmethod
    def forward(ctx, module, size, x: torch.Tensor):
        ctx.module, ctx.shape, ctx.format = module, x.shape, memory_format_of(x)
        like = x.new_empty((0, 0, *size))  # sample_identity reads only its grid
        return tuple(module.sample_identity(x[:, start:stop], like)
                     for start, stop in zip(module.identity_starts, module.identity_stops))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        module = ctx.module
        grad_x = None
        for start, stop, grad in zip(module.identity_starts, module.identity_stops, grads):
            if grad is None:
                continue
            if grad_x is None:
                grad_x = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.format).zero_()
            module.sample_identity(grad_x[:, start:stop], grad).add_(grad)
        return None, None, grad_x


def _scaled_forward(module, x: torch.Tensor) -> torch.Tensor:
    b = F.conv2d(x, module.convs[0].weight, None, module.stride)
    a = b[:, :module.tail_in] * module.tail.weight.view(1, -1, 1, 1)
    if module.shuffle_groups > 1 and compiling_training_graph():
        y = compiled_concat_shuffle([b, a], module.shuffle_groups)
    elif module.shuffle_groups == 2 and a.shape[1] == b.shape[1]:
        # interleaving b and a channel by channel is the g = 2 shuffle, written in one pass
        if memory_format_of(b) == torch.channels_last:
            y = torch.stack([b.permute(0, 2, 3, 1), a.permute(0, 2, 3, 1)], dim=-1).flatten(-2).permute(0, 3, 1, 2)
        else:
            y = torch.stack([b, a], dim=2).flatten(1, 2)
    elif module.shuffle_groups == 1:
        y = torch.cat([b, a], dim=1)
    else:
        y = ConcatShuffle.apply(module.shuffle_groups, b, a)
    return y if module.bias is None else y + module.bias.view(1, -1, 1, 1)


def pointwise_forward(module, x: torch.Tensor, form: str, rule: FormRule) -> torch.Tensor:
    """A pointwise CompConv in its ``dense`` or ``lowrank`` training form (same function and gradients)."""
    if form == "lowrank" and scaled_tail(module):
        return _scaled_forward(module, x)
    if form == "dense":
        return F.conv2d(x, composed_weight(module)[:, :, None, None], module.bias, module.stride)
    if _positions(module, x) >= rule.dense_min_positions or not module.identity_starts:
        w1, v = factorised_weights(module)
        z = F.conv2d(x, w1[:, :, None, None], None, module.stride)
    else:  # z = [U x; identity slices of x]: where the input is small, slices cost less than one-hot GEMM rows
        v = shuffled_rows(part_map(module)[0], module.shuffle_groups)
        b = F.conv2d(x, module.convs[0].weight, None, module.stride)
        z = torch.cat([b, *module.identities(x, b)], dim=1)
    return F.conv2d(z, v[:, :, None, None], module.bias)


def training_form(module, x: torch.Tensor, rule: FormRule) -> str:
    """The form of a pointwise layer for input ``x`` under ``pointwise_form="auto"`` and the device's ``rule``:
    ``lowrank`` where it costs at most :data:`compconv.pointwise.LOWRANK_MAX_SHARE` of the plain conv's MACs, else
    ``dense`` where :func:`dense_pays`, else ``chain``; a depth-1 layer with a depthwise tail trains dense at large
    outputs.
    """
    scaled = scaled_tail(module)
    if scaled and _positions(module, x) >= rule.scaled_dense_min_positions:
        return "dense"
    macs = lowrank_macs(module, identities_by_gemm=True, scale_v=scaled)
    if macs <= LOWRANK_MAX_SHARE * module.plan.plain_macs_per_position:
        return "lowrank"
    return "dense" if dense_pays(module, x, rule) else "chain"


def _positions(module, x: torch.Tensor) -> int:
    """Output positions per image of a pointwise layer."""
    return (x.shape[-2] // module.stride[0]) * (x.shape[-1] // module.stride[1])


def dense_pays(module, x: torch.Tensor, rule: FormRule) -> bool:
    """Whether the dense form beats the chain for this layer and input, by the device's ``rule``."""
    positions = _positions(module, x)
    if positions >= rule.dense_min_positions:
        return True
    return positions >= rule.dense_min_positions_heavy and module.plan.macs_ratio >= rule.dense_min_chain_share


def concat_shuffle(parts: List[torch.Tensor], groups: int) -> torch.Tensor:
    """``channel_shuffle(torch.cat(parts, 1), groups)`` with one copy: :class:`ConcatShuffle` in eager autograd,
    :func:`compiled_concat_shuffle` in a compiled training graph, the plain ops in any other graph.
    """
    if torch.compiler.is_compiling() or recording_graph(parts[0]):
        if groups > 1 and compiling_training_graph():
            return compiled_concat_shuffle(parts, groups)
        return shuffle_keeping_format(torch.cat(parts, dim=1), groups)
    if groups == 1:
        return torch.cat(parts, dim=1)
    if torch.is_grad_enabled() and any(part.requires_grad for part in parts):
        return ConcatShuffle.apply(groups, *parts)
    return assemble(parts, groups)


class EfficientCompConv2d(CompConv2d):
    """:class:`compconv.CompConv2d` with the training fast path; same arguments, parameters and function.

    Attributes:
        pointwise_form: ``auto``, ``lowrank``, ``dense`` or ``chain`` (the option) for a 1x1 layer without inner
            norms, ``chain`` for every other layer.
        figure2: Run Figure 2 as written (the plain module's forward) while true; see :func:`figure2_forms`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pointwise_form = self.plan.options.pointwise_form if is_pointwise(self) else "chain"
        self.figure2 = False
        self.forms: Dict[Tuple[str, int, int], str] = {}  # (device type, H, W) -> form, chosen once under "auto"

    def __setstate__(self, state: dict) -> None:  # a layer pickled before these attributes existed
        super().__setstate__(state)
        if not hasattr(self, "forms"):
            self.figure2, self.forms = False, {}

    def __prepare_scriptable__(self) -> CompConv2d:
        """``torch.jit.script`` compiles the plain module (same parameters, same function)."""
        return CompConv2d.from_layer(self)

    def form_for(self, x: torch.Tensor) -> str:
        """The form this layer computes in for input ``x``: ``chain``, ``lowrank`` or ``dense``. Under ``auto`` it is
        chosen by the device's :data:`FORM_RULES` entry the first time the layer sees that device and input size
        (``chain`` on a device without one)."""
        if self.pointwise_form != "auto":
            return self.pointwise_form
        key = (x.device.type, x.shape[-2], x.shape[-1])
        form = self.forms.get(key)
        if form is None:
            rule = FORM_RULES.get(x.device.type)
            form = training_form(self, x, rule) if rule is not None else "chain"
            if not torch.compiler.is_compiling():
                self.forms[key] = form
        return form

    def identities(self, x: torch.Tensor, like: torch.Tensor) -> List[torch.Tensor]:
        if (not self.figure2 and self.identity_starts and not self.identity_padded and not recording_graph(x)
                and not torch.compiler.is_compiling() and torch.is_grad_enabled() and x.requires_grad):
            return list(IdentitySlices.apply(self, like.shape[-2:], x))
        return super().identities(x, like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.figure2 or recording_graph(x):
            return super().forward(x)
        if self.pointwise_form != "chain":
            form = self.form_for(x)
            if form != "chain":  # the same function and gradients, fewer passes
                rule = FORM_RULES.get(x.device.type) or FORM_RULES["cpu"]  # explicit forms take the measured rule
                return pointwise_forward(self, x, form, rule)
        y = concat_shuffle(self.parts(x), self.shuffle_groups)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


@contextmanager
def figure2_forms(model: nn.Module) -> Iterator[None]:
    """Runs every :class:`EfficientCompConv2d` of ``model`` as Figure 2 is written inside the block (its
    ``figure2`` attribute): what MACs accounting counts and what :func:`check_training_forms` compares with.
    """
    layers = [m for m in model.modules() if isinstance(m, EfficientCompConv2d) and not m.figure2]
    try:
        for layer in layers:
            layer.figure2 = True
        yield
    finally:
        for layer in layers:
            layer.figure2 = False


class TrainingFormError(RuntimeError):
    """A layer's training form computes something other than Figure 2 (outputs or gradients differ)."""


def check_training_forms(model: torch.nn.Module, x: torch.Tensor, tolerance: float = 1e-2) -> float:
    """Checks that ``model``'s training forms compute Figure 2: the output and every gradient (parameters and
    ``x``) of one forward and backward equal those of the plain chain (:func:`figure2_forms`).

    Runs in eval mode outside autocast with a private generator, and leaves ``.grad`` and modes as they were.

    Args:
        model: Any model; without an :class:`EfficientCompConv2d` nothing runs.
        x: A batch as the model will see it (device, memory format); its values do not matter.
        tolerance: Largest accepted max |difference| / max |reference| of each tensor.

    Returns:
        The largest relative difference found (0.0 when no layer has the fast path).

    Raises:
        TrainingFormError: naming the output or the first parameter whose gradient differs.
    """
    if not any(type(m) is EfficientCompConv2d for m in model.modules()):
        return 0.0
    modes = {m: m.training for m in model.modules()}
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = (list(t) for t in zip(*trained)) if trained else ([], [])
    x = x.detach().clone().requires_grad_(True)
    generator = torch.Generator(device=x.device).manual_seed(0)

    def run() -> list[torch.Tensor]:
        out = model(x)
        outputs = [t for t in tensors(out) if t.is_floating_point()]
        generator.manual_seed(0)
        loss = sum((t.float() * torch.randn(t.shape, generator=generator, device=t.device)).sum() for t in outputs)
        grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
        return [t.detach().float() for t in outputs] + [g.float() if g is not None else None for g in grads]

    try:
        model.eval()
        with torch.autocast(x.device.type, enabled=False), torch.enable_grad():
            fast = run()
            with figure2_forms(model):
                reference = run()
    finally:
        for module, training in modes.items():
            module.train(training)
    labels = [f"output {i}" for i in range(len(fast) - len(params) - 1)] + ["the input's gradient"] + \
        [f"the gradient of {name}" for name in names]
    worst = 0.0
    for label, got, want in zip(labels, fast, reference):
        if got is None and want is None:
            continue
        got = torch.zeros_like(want) if got is None else got  # a gradient one form has and the other not
        want = torch.zeros_like(got) if want is None else want
        error = relative_error(got, want)
        if not error <= tolerance:  # NaN fails too
            raise TrainingFormError(
                f"CompConv's training forms differ from Figure 2 in {label} by {error:.3g} (relative; tolerance "
                f"{tolerance:g}): train the plain module (model.compconv.efficient=false) and please report this model")
        worst = max(worst, error)
    return worst

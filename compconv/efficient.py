"""The training fast path: :class:`EfficientCompConv2d`, Figure 2's function and gradients with fewer passes
over memory and :class:`compconv.CompConv2d`'s parameters and state-dict keys. :func:`compconv.create_conv2d`
builds it unless the plain module is asked for (``efficient=False``, or a timm model created scriptable or
exportable), as timm's ``create_act`` picks memory-efficient activations. Graph capture (``torch.jit``,
``torch.export``, ONNX, ``torch.fx``) records the plain forward. docs/performance.md says what each part saves.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CompConv2d, channel_shuffle
from .nested import tensors
from .pointwise import LOWRANK_MAX_SHARE, composed_weight, factorised_weights, is_pointwise, part_map, shuffled_rows

__all__ = ["ConcatShuffle", "EfficientCompConv2d", "IdentitySlices", "TrainingFormError", "assemble",
           "check_training_forms", "compiled_concat_shuffle", "concat_shuffle", "figure2_forms", "recording_graph",
           "shuffle_keeping_format", "training_form"]

# dense_pays: train a pointwise layer through its composed weight when its output has at least this many
# positions per image, or at least DENSE_MIN_POSITIONS_HEAVY where the chain keeps DENSE_MIN_CHAIN_SHARE or more
# of the plain conv's MACs (measured: the per-layer table of results/benchmark_cpu_train.md)
DENSE_MIN_POSITIONS = 28 * 28
DENSE_MIN_POSITIONS_HEAVY = 14 * 14
DENSE_MIN_CHAIN_SHARE = 0.5
SCALED_DENSE_MIN_POSITIONS = 56 * 56  # a depth-1 layer with a depthwise tail: one GEMM and a scale wins below
# assemble() with a norm's affine: written in the copy of each piece from this many elements per piece (measured
# on the 2-core AVX-512 CPU: 1.24-1.35x at 1.6-3.2 M, 0.6-0.8x below 0.4 M, where per-call costs dominate)
AFFINE_IN_COPY_MIN_ELEMENTS = 1 << 20


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _cat_dtype(parts: List[torch.Tensor]) -> torch.dtype:
    """The dtype ``torch.cat(parts)`` returns (promoted across parts)."""
    return functools.reduce(torch.promote_types, [part.dtype for part in parts])


def compiling_training_graph() -> bool:
    """True while ``torch.compile`` records a training graph (not ``torch.export``, whose graphs hold standard ops)."""
    return torch.is_grad_enabled() and torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def _group_slices(widths: List[int], groups: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(part, start, stop, group, offset)`` for every run of a part's channels ``[start, stop)`` that the shuffle
    puts in one ``group``, at channel ``offset`` of it (output ``i * groups + j`` is concatenated ``j * size + i``).
    """
    size = sum(widths) // groups
    offset = 0
    for index, width in enumerate(widths):
        start, stop = offset, offset + width
        while start < stop:
            group = start // size
            end = min(stop, (group + 1) * size)
            yield index, start - offset, end - offset, group, start - group * size
            start = end
        offset = stop


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
        pieces = len(parts) if groups == 1 else len(list(_group_slices(widths, groups)))
        if n * channels * h * w < pieces * AFFINE_IN_COPY_MIN_ELEMENTS:
            if groups == 1:  # out= keeps parts[0]'s memory format (cat alone returns NCHW for mixed inputs)
                out = torch.empty((n, channels, h, w), dtype=_cat_dtype(parts), device=first.device,
                                  memory_format=_memory_format(first))
                torch.cat(parts, dim=1, out=out)
            else:
                out = assemble(parts, groups)
            if scale.dtype != out.dtype:
                scale, shift = scale.to(out.dtype), shift.to(out.dtype)
            return torch.addcmul(shift.view(1, -1, 1, 1), out, scale.view(1, -1, 1, 1), out=out)
    dtype = _cat_dtype(parts)
    out = torch.empty((n, channels, h, w), dtype=dtype, device=first.device, memory_format=_memory_format(first))
    view = out.view(n, channels // groups, groups, h, w)
    if scale is not None and shift is not None:
        scale = scale.to(dtype).view(1, channels // groups, groups, 1, 1)
        shift = shift.to(dtype).view(1, channels // groups, groups, 1, 1)
    for index, start, stop, group, at in _group_slices(widths, groups):
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
    for index, start, stop, group, at in _group_slices(widths, groups):
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
        memory_format=_memory_format(first))


@torch.library.custom_op("compconv::unshuffle", mutates_args=())
def compiled_unshuffle(grad: torch.Tensor, widths: List[int], groups: int) -> List[torch.Tensor]:
    """The gradients of :func:`compiled_concat_shuffle`'s parts, each compact in ``grad``'s memory format."""
    memory_format = _memory_format(grad)
    return [view.contiguous(memory_format=memory_format) for view in unshuffle_views(grad, widths, groups)]


@compiled_unshuffle.register_fake
def _(grad: torch.Tensor, widths: List[int], groups: int) -> List[torch.Tensor]:
    n, _, h, w = grad.shape
    return [grad.new_empty((n, width, h, w)).contiguous(memory_format=_memory_format(grad)) for width in widths]


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
        ctx.module, ctx.shape, ctx.format = module, x.shape, _memory_format(x)
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


def _scaled_tail(module) -> bool:
    """Depth 1 with a depthwise 1x1 tail: ``y = shuffle([b; w * b])`` with ``b = U x`` (``V`` is a scale)."""
    tail = module.tail
    return len(module.convs) == 1 and tail is not None and tail.groups != 1 and tail.kernel_size == (1, 1)


def _scaled_forward(module, x: torch.Tensor) -> torch.Tensor:
    b = F.conv2d(x, module.convs[0].weight, None, module.stride)
    a = b[:, :module.tail_in] * module.tail.weight.view(1, -1, 1, 1)
    if module.shuffle_groups > 1 and compiling_training_graph():
        y = compiled_concat_shuffle([b, a], module.shuffle_groups)
    elif module.shuffle_groups == 2 and a.shape[1] == b.shape[1]:
        # interleaving b and a channel by channel is the g = 2 shuffle, written in one pass
        if _memory_format(b) == torch.channels_last:
            y = torch.stack([b.permute(0, 2, 3, 1), a.permute(0, 2, 3, 1)], dim=-1).flatten(-2).permute(0, 3, 1, 2)
        else:
            y = torch.stack([b, a], dim=2).flatten(1, 2)
    elif module.shuffle_groups == 1:
        y = torch.cat([b, a], dim=1)
    else:
        y = ConcatShuffle.apply(module.shuffle_groups, b, a)
    return y if module.bias is None else y + module.bias.view(1, -1, 1, 1)


def lowrank_macs(module) -> int:
    """MACs per output position of the low-rank training form (an upper bound: small inputs slice identities)."""
    plan = module.plan
    rank = plan.c_prim + plan.identity_channels
    if _scaled_tail(module):
        return plan.in_channels * rank + plan.out_channels
    return rank * (plan.in_channels + plan.out_channels)


def pointwise_forward(module, x: torch.Tensor, form: str) -> torch.Tensor:
    """A pointwise CompConv in its ``dense`` or ``lowrank`` training form (same function and gradients)."""
    if form == "lowrank" and _scaled_tail(module):
        return _scaled_forward(module, x)
    if form == "dense":
        return F.conv2d(x, composed_weight(module)[:, :, None, None], module.bias, module.stride)
    if _positions(module, x) >= DENSE_MIN_POSITIONS or not module.identity_starts:
        w1, v = factorised_weights(module)
        z = F.conv2d(x, w1[:, :, None, None], None, module.stride)
    else:  # z = [U x; identity slices of x]: where the input is small, slices cost less than one-hot GEMM rows
        v = shuffled_rows(part_map(module)[0], module.shuffle_groups)
        b = F.conv2d(x, module.convs[0].weight, None, module.stride)
        z = torch.cat([b, *module.identities(x, b)], dim=1)
    return F.conv2d(z, v[:, :, None, None], module.bias)


def training_form(module, x: torch.Tensor) -> str:
    """The form of a pointwise layer for input ``x`` under ``pointwise_form="auto"``: ``lowrank`` where it costs at
    most :data:`LOWRANK_MAX_SHARE` of the plain conv's MACs, else ``dense`` where :func:`dense_pays`, else
    ``chain``; a depth-1 layer with a depthwise tail trains dense at large outputs.
    """
    if _scaled_tail(module) and _positions(module, x) >= SCALED_DENSE_MIN_POSITIONS:
        return "dense"
    if lowrank_macs(module) <= LOWRANK_MAX_SHARE * module.plan.plain_macs_per_position:
        return "lowrank"
    return "dense" if dense_pays(module, x) else "chain"


def _positions(module, x: torch.Tensor) -> int:
    """Output positions per image of a pointwise layer."""
    return (x.shape[-2] // module.stride[0]) * (x.shape[-1] // module.stride[1])


def dense_pays(module, x: torch.Tensor) -> bool:
    """Whether the dense form beats the chain for this layer and input (a rule measured on a 2-core AVX-512 CPU)."""
    positions = _positions(module, x)
    if positions >= DENSE_MIN_POSITIONS:
        return True
    return positions >= DENSE_MIN_POSITIONS_HEAVY and module.plan.macs_ratio >= DENSE_MIN_CHAIN_SHARE


def recording_graph(x: torch.Tensor) -> bool:
    """True while ``x`` is being recorded into a graph rather than computed: ``torch.jit.trace``, ``torch.export``
    (and the ONNX exporters built on either), ``torch.fx`` symbolic tracing. Such graphs hold the plain ops."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or isinstance(x, torch.fx.Proxy)


def shuffle_keeping_format(x: torch.Tensor, groups: int) -> torch.Tensor:
    """:func:`compconv.layers.channel_shuffle` that keeps a channels_last input channels_last."""
    if groups == 1 or recording_graph(x) or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return channel_shuffle(x, groups)
    n, c, h, w = x.shape
    nhwc = x.permute(0, 2, 3, 1)
    return nhwc.view(n, h, w, groups, c // groups).transpose(3, 4).reshape(n, h, w, c).permute(0, 3, 1, 2)


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
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pointwise_form = self.plan.options.pointwise_form if is_pointwise(self) else "chain"

    def __prepare_scriptable__(self) -> CompConv2d:
        """``torch.jit.script`` compiles the plain module (same parameters, same function)."""
        return to_plain(self)

    def form_for(self, x: torch.Tensor) -> str:
        """The form this layer computes in for input ``x``: ``chain``, ``lowrank`` or ``dense``."""
        return training_form(self, x) if self.pointwise_form == "auto" else self.pointwise_form

    def identities(self, x: torch.Tensor, like: torch.Tensor) -> List[torch.Tensor]:
        if (self.identity_starts and not self.identity_padded and not recording_graph(x)
                and not torch.compiler.is_compiling() and torch.is_grad_enabled() and x.requires_grad):
            return list(IdentitySlices.apply(self, like.shape[-2:], x))
        return super().identities(x, like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if recording_graph(x):
            return super().forward(x)
        if self.pointwise_form != "chain":
            form = self.form_for(x)
            if form != "chain":  # the same function and gradients, fewer passes
                return pointwise_forward(self, x, form)
        y = concat_shuffle(self.parts(x), self.shuffle_groups)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def to_plain(module: CompConv2d) -> CompConv2d:
    """A plain :class:`compconv.CompConv2d` sharing ``module``'s parameters, buffers and hooks."""
    plain = CompConv2d.__new__(CompConv2d)
    plain.__dict__.update({k: v for k, v in module.__dict__.items() if k != "pointwise_form"})
    return plain


@contextmanager
def figure2_forms(model: nn.Module) -> Iterator[None]:
    """Runs every :class:`EfficientCompConv2d` of ``model`` as the plain :class:`compconv.CompConv2d` inside the
    block: what MACs accounting counts and what :func:`check_training_forms` compares with.
    """
    swapped = [m for m in model.modules() if type(m) is EfficientCompConv2d]
    try:
        for module in swapped:
            module.__class__ = CompConv2d
        yield
    finally:
        for module in swapped:
            module.__class__ = EfficientCompConv2d


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
        scale = float(want.abs().max()) if want.numel() else 0.0
        error = float((got - want).abs().max()) / scale if scale > 0 else float((got - want).abs().max())
        if not error <= tolerance:  # NaN fails too
            raise TrainingFormError(
                f"CompConv's training forms differ from Figure 2 in {label} by {error:.3g} (relative; tolerance "
                f"{tolerance:g}): train the plain module (model.compconv.efficient=false) and please report this model")
        worst = max(worst, error)
    return worst

"""Training forms of :class:`compconv.CompConv2d`: Figure 2's function and gradients, less memory traffic.

- :class:`ConcatShuffle`: ``channel_shuffle(torch.cat(parts))`` as one autograd node. Its forward
  writes each part once into an output of the first part's memory format; its backward hands each part
  a *view* of the output gradient through the inverse shuffle (a strided slice of channels), where
  autograd's in-place assembly would clone the whole output gradient once per part (``CopySlices``).
  ``torch.compile`` sees :func:`compiled_concat_shuffle` instead, an operator it calls rather than fuses
  (fused, the shuffle turns every per-channel reduction after it into a scalar strided gather); the other
  graph captures (FX, export, ONNX, TorchScript) record the plain ops.
- :class:`IdentitySlices`: the identity parts as one autograd node whose input gradient keeps the
  input's memory format (autograd's slice backward is NCHW, which slows every norm and activation
  backward upstream of a channels_last layer).
- :func:`factorised_weights`: a 1x1 CompConv (no inner norms) is the linear map ``x -> V [U; S] x`` with
  ``[U; S]`` its first conv and the identity selection and ``V`` a small product of its factors. Two
  1x1 convs (``lowrank``: ``[U; S] x``, or below 28x28 positions ``U x`` and the identity slices, then
  ``V``; for depth 1 with a depthwise tail, one conv and a per-channel scale written straight into the
  shuffled order) or one with ``V [U; S]`` (``dense``) compute the same output, and
  autograd through the products gives the same parameter gradients, in one or two GEMMs forward and
  backward instead of a chain of memory-bound passes. :func:`training_form` decides per layer and input.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch
import torch.nn.functional as F

__all__ = ["ConcatShuffle", "IdentitySlices", "compiled_concat_shuffle", "compiled_unshuffle", "compiling_training_graph", "composed_weight", "dense_pays", "factorised_weights", "TrainingFormError", "check_training_forms", "figure2_forms", "part_map", "pointwise_forward",
           "training_form", "unshuffle_views"]

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
LOWRANK_MAX_RATIO = 0.6  # training_form: the low-rank pair where it costs at most this share of the plain conv's MACs


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _cat_dtype(parts: List[torch.Tensor]) -> torch.dtype:
    """The dtype ``torch.cat(parts)`` returns (promoted across parts)."""
    return functools.reduce(torch.promote_types, [part.dtype for part in parts])


def compiling_training_graph() -> bool:
    """True while ``torch.compile`` records a graph with grad enabled (not ``torch.export``, whose graphs must
    hold standard ops only): where :func:`compiled_concat_shuffle` replaces the plain concat + shuffle."""
    return torch.is_grad_enabled() and torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def _group_slices(widths: List[int], groups: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Where each part of a concatenation lands after the shuffle: ``(part, start, stop, group, offset)`` for
    every run of the part's channels ``[start, stop)`` that falls in one shuffle ``group``, at channel ``offset``
    of that group (output channel ``i * groups + j`` is concatenated channel ``j * size + i``)."""
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

    With ``scale`` and ``shift`` (one value per output channel) it returns ``scale * y + shift``: an eval
    BatchNorm with no output tensor of its own (deploy's ``DeployedCompConv2d``). Where each copied piece
    holds at least ``AFFINE_IN_COPY_MIN_ELEMENTS`` the affine is written in the copy itself (one pass);
    smaller outputs are assembled, then the affine runs in place (fewer calls, which dominate there).
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
    """:func:`assemble` as an operator that ``torch.compile`` calls rather than traces into.

    Inductor would otherwise fold the shuffle into every consumer's indexing: a BatchNorm's per-channel
    statistics (or a depthwise tail's weight gradient) then gather across interleaved channels in scalar
    loops, several times slower than the whole concatenation (results/benchmark_cpu_train_compiled.md).
    As an operator its output is a real buffer in ``parts[0]``'s memory format, and its backward
    (:func:`compiled_unshuffle`) hands each part a compact gradient.
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
    """The identity parts of a chain-form CompConv (``module.identity`` of each slice at a ``size`` grid) as one
    autograd node (eager only; unpadded sampling). Autograd's own slice backward zero-fills an NCHW gradient
    per slice, and its sum with the first conv's channels_last input gradient is NCHW, so every norm and
    activation backward upstream runs on mixed layouts (2-3x slower, results/benchmark_cpu_train.md). Here the
    input gradient is one zero tensor in x's memory format, each slice's gradient added into its view."""

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


def _times(weight: torch.Tensor, rows, columns: int) -> torch.Tensor:
    """``weight @ rows`` where ``rows`` is a dense map (a matrix) or a selection of basis columns (a slice):
    a selection costs a zero pad, not a product with one-hot rows."""
    if isinstance(rows, slice):
        return F.pad(weight, (rows.start, columns - rows.stop))
    return weight @ rows


def _parts_in_basis(module, first, identities: List[slice], columns: int, dtype: Optional[torch.dtype],
                    with_bias: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The concatenated parts of a pointwise CompConv as ``M b + f`` for a basis ``b`` of ``columns`` entries in
    which ``B(d-1)`` is ``first`` and each identity part ``A(i)`` a selection ``identities[i]``; every product
    with a selection is a pad (see :func:`part_map` for the two bases used)."""
    def matrix(conv: torch.nn.Conv2d) -> torch.Tensor:
        weight = conv.weight if dtype is None else conv.weight.to(dtype)
        return weight[:, :, 0, 0]

    def bias(conv: torch.nn.Conv2d) -> torch.Tensor:
        if conv.bias is None:
            return torch.zeros(conv.out_channels, dtype=dtype or conv.weight.dtype, device=conv.weight.device)
        return conv.bias if dtype is None else conv.bias.to(dtype)

    like = module.convs[0].weight.to(dtype) if dtype is not None else module.convs[0].weight

    def dense(rows) -> torch.Tensor:
        if not isinstance(rows, slice):
            return rows
        eye = torch.eye(rows.stop - rows.start, dtype=like.dtype, device=like.device)
        return F.pad(eye, (rows.start, columns - rows.stop))

    def height(rows) -> int:
        return rows.stop - rows.start if isinstance(rows, slice) else rows.shape[0]

    b = first
    b_bias = bias(module.convs[0]) if with_bias else None
    rows, biases = [b], [b_bias]
    for conv, a in zip(list(module.convs)[1:], identities):
        weight = matrix(conv)
        split = height(b)  # W(i) [B(i+1); A(i+1)] = W[:, :split] B(i+1) + W[:, split:] A(i+1)
        if isinstance(b, slice) and b.stop == a.start:  # adjacent selections: W selects one run of columns
            b_next = _times(weight, slice(b.start, a.stop), columns)
        elif isinstance(b, slice):
            b_next = _times(weight[:, :split], b, columns) + _times(weight[:, split:], a, columns)
        else:
            b_next = torch.addmm(_times(weight[:, split:], a, columns), weight[:, :split], b)
        rows += [a, b_next]
        if b_bias is not None:
            b_bias = weight[:, :split] @ b_bias + bias(conv)
            biases += [b_bias.new_zeros(height(a)), b_bias]
        b = b_next
    if module.tail is not None:
        tail = module.tail
        weight = (tail.weight if dtype is None else tail.weight.to(dtype))[:, :, 0, 0]
        source = slice(b.start, b.start + module.tail_in) if isinstance(b, slice) else b[:module.tail_in]
        if tail.groups != 1:  # a depthwise 1x1 tail is a per-channel scale
            rows.append(weight[:, :1] * dense(source))
        else:
            rows.append(_times(weight, source, columns))
        if b_bias is not None:
            source_bias = b_bias[:module.tail_in]
            biases.append((weight[:, 0] * source_bias if tail.groups != 1 else weight @ source_bias) + bias(tail))
    return torch.cat([dense(r) for r in rows]), (torch.cat(biases) if with_bias else None)


def part_map(module, dtype: Optional[torch.dtype] = None,
             with_bias: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(M, f)``: the concatenated parts of a pointwise CompConv (before the shuffle) as ``M z + f``.

    ``z = [U x; A(d-1); ...; A1]`` (rank = C_prim + identity channels) stacks the first conv's output without
    its bias and the identity slices; each ``B(i) = W(i) [B(i+1); A(i+1)] + bias(i)`` and the tail are written
    in terms of ``z``. The one copy of this algebra (:func:`_parts_in_basis`, which :func:`composed_weight`
    runs in the basis ``x`` instead): the training forms (:func:`factorised_weights`) and deploy's exact forms
    (``compconv.deploy.forms``) both read it.

    Args:
        module: A pointwise :class:`compconv.CompConv2d` (1x1 kernels, no norms left inside).
        dtype: Compute in this dtype (deploy: float64, under ``no_grad``); default the weights' own,
            differentiable in the module's parameters.
        with_bias: Also return ``f`` from the internal convs' biases (which ``reparameterize()`` gives them);
            otherwise ``f`` is None (as trained, internal convs have none).
    """
    c = module.plan.c_prim
    identities, offset = [], c
    for start, stop in zip(module.identity_starts, module.identity_stops):
        identities.append(slice(offset, offset + stop - start))
        offset += stop - start
    return _parts_in_basis(module, slice(0, c), identities, offset, dtype, with_bias)


def _shuffled_rows(matrix: torch.Tensor, groups: int) -> torch.Tensor:
    """The rows of a concatenation's map in the shuffled order (output channel ``i * groups + j`` is
    concatenated channel ``j * size + i``)."""
    if groups == 1:
        return matrix
    return matrix.view(groups, -1, matrix.shape[1]).transpose(0, 1).reshape(-1, matrix.shape[1])


def factorised_weights(module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W1, V)`` with ``module(x) == conv1x1(conv1x1(x, W1), V) + bias`` for a pointwise CompConv.

    ``W1 = [U; S]`` (rank x C_in) stacks the first conv's weight and one-hot rows selecting the identity
    channels, so ``z = W1 x = [B(d-1); A(d-1); ...; A1]``; ``V`` (C_out x rank) is :func:`part_map`'s ``M``
    in the shuffled order. Both are differentiable in the module's parameters (the low-rank training form);
    ``V @ W1`` is the dense weight (:func:`composed_weight` computes it without the one-hot rows).
    """
    first = module.convs[0].weight[:, :, 0, 0]
    in_channels = first.shape[1]
    selections = [F.pad(torch.eye(stop - start, dtype=first.dtype, device=first.device), (start, in_channels - stop))
                  for start, stop in zip(module.identity_starts, module.identity_stops)]
    w1 = torch.cat([first, *selections]) if selections else first
    return w1, _shuffled_rows(part_map(module)[0], module.shuffle_groups)


def composed_weight(module) -> torch.Tensor:
    """``M`` (C_out x C_in) with ``module(x) == conv1x1(x, M) + bias`` for a pointwise CompConv, differentiable
    in the module's parameters (the dense training form): the parts algebra run on ``x`` itself, where
    ``B(d-1) = U`` and each identity part selects input channels."""
    first = module.convs[0].weight[:, :, 0, 0]
    identities = [slice(start, stop) for start, stop in zip(module.identity_starts, module.identity_stops)]
    matrix, _ = _parts_in_basis(module, first, identities, first.shape[1], None, False)
    return _shuffled_rows(matrix, module.shuffle_groups)


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
    """MACs per output position of the low-rank training form with ``W1`` as one GEMM (an upper bound: below
    28x28 positions its identity rows are slices) and ``V`` (or a GEMM and a scale)."""
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
        v = _shuffled_rows(part_map(module)[0], module.shuffle_groups)
        b = F.conv2d(x, module.convs[0].weight, None, module.stride)
        z = torch.cat([b, *module.identities(x, b)], dim=1)
    return F.conv2d(z, v[:, :, None, None], module.bias)


def training_form(module, x: torch.Tensor) -> str:
    """The form a pointwise layer computes in for input ``x`` under ``pointwise_form="auto"``: ``lowrank``
    where it costs at most :data:`LOWRANK_MAX_RATIO` of the plain conv's MACs (:func:`lowrank_macs`; measured
    faster than the chain and than dense, results/benchmark_cpu_train.md), else ``dense`` where
    :func:`dense_pays`, else ``chain``. A depth-1 layer with a depthwise tail (one GEMM and a scale) is
    memory-bound where its output is large (:data:`SCALED_DENSE_MIN_POSITIONS`): there it trains dense too."""
    if _scaled_tail(module) and _positions(module, x) >= SCALED_DENSE_MIN_POSITIONS:
        return "dense"
    if lowrank_macs(module) <= LOWRANK_MAX_RATIO * module.plan.plain_macs_per_position:
        return "lowrank"
    return "dense" if dense_pays(module, x) else "chain"


def _positions(module, x: torch.Tensor) -> int:
    """Output positions per image of a pointwise layer."""
    return (x.shape[-2] // module.stride[0]) * (x.shape[-1] // module.stride[1])


def dense_pays(module, x: torch.Tensor) -> bool:
    """Whether the dense training form is faster than the chain for this layer and input (a rule measured on
    a 2-core AVX-512 CPU, batch 16 at 224: see :data:`DENSE_MIN_POSITIONS`). The dense form costs the plain
    conv plus composing its weight (once per step); the chain's extra passes grow with the positions."""
    positions = _positions(module, x)
    if positions >= DENSE_MIN_POSITIONS:
        return True
    return positions >= DENSE_MIN_POSITIONS_HEAVY and module.plan.macs_ratio >= DENSE_MIN_CHAIN_SHARE


@contextmanager
def figure2_forms(model: torch.nn.Module) -> Iterator[None]:
    """Runs every CompConv of ``model`` as Figure 2 is written (``pointwise_form="chain"``) inside the block:
    what MACs accounting counts, since a dense training form computes the plain conv's MACs."""
    saved = {m: m.pointwise_form for m in model.modules() if hasattr(m, "pointwise_form")}
    try:
        for module in saved:
            module.pointwise_form = "chain"
        yield
    finally:
        for module, form in saved.items():
            module.pointwise_form = form


class TrainingFormError(RuntimeError):
    """A layer's training form computes something other than Figure 2 (outputs or gradients differ)."""


def check_training_forms(model: torch.nn.Module, x: torch.Tensor, tolerance: float = 1e-2) -> float:
    """Checks that ``model`` trains as Figure 2 computes: one forward and backward on ``x`` with its training
    forms, and one with every CompConv as the chain (:func:`figure2_forms`), give the same output and the
    same gradient of every parameter and of ``x``.

    Runs in eval mode (BatchNorm statistics are not updated), outside autocast, with a random output
    cotangent from a private generator (the global RNG is not touched); leaves ``.grad`` and the modules'
    modes as they were. A wrong form differs by O(1); fp32 rounding (TF32 on GPUs) stays far below
    ``tolerance``.

    Args:
        model: Any model; without a CompConv in a factorised training form nothing runs.
        x: A batch as the model will see it (device, memory format); its values do not matter.
        tolerance: Largest accepted max |difference| / max |reference| of each tensor.

    Returns:
        The largest relative difference found (0.0 when no layer trains in a factorised form).

    Raises:
        TrainingFormError: naming the output or the first parameter whose gradient differs.
    """
    if not any(getattr(m, "pointwise_form", "chain") != "chain" for m in model.modules()):
        return 0.0
    modes = {m: m.training for m in model.modules()}
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = (list(t) for t in zip(*trained)) if trained else ([], [])
    x = x.detach().clone().requires_grad_(True)
    generator = torch.Generator(device=x.device).manual_seed(0)

    def run() -> list[torch.Tensor]:
        out = model(x)
        outputs = [t for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)
                   and t.is_floating_point()]
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
                f"{tolerance:g}): train with model.compconv.pointwise_form=chain and please report this model")
        worst = max(worst, error)
    return worst

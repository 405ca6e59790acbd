"""The rule that sizes a CompConv module: depth, C_prim, its parts and closed-form complexity, in plain integer
arithmetic, so tables and modules are built from the same numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .options import MAX_DEPTH, CompConvOptions

_logger = logging.getLogger(__name__)
_announced: set[tuple[int, int, int, int, str]] = set()


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def adaptive_depth(in_channels: int, c0: int) -> int:
    """Depth d of the adaptive rule, clamp(floor(log2(max(1, C_in / C_0))) + 1, 1, 3), in integers."""
    depth = 1
    while depth < MAX_DEPTH and in_channels >= c0 * (1 << depth):
        depth += 1
    return depth


def c_prim_for(out_channels: int, depth: int, divisor: int = 1) -> int:
    """C_prim = ceil(C_out / (2^(d+1) - 2)) (paper, Eq. 4-5), rounded up to a multiple of ``divisor``."""
    units = (1 << (depth + 1)) - 2
    c = -(-out_channels // units)
    return -(-c // divisor) * divisor


@dataclass(frozen=True)
class Part:
    """One part of the concatenated output, in output order (before the shuffle).

    Attributes:
        name: ``B2``, ``A2``, ... ``A0`` as in the paper's Figure 2 (``conv`` for depth 0).
        kind: ``"conv"`` (a convolution), ``"identity"`` (a slice of the input) or ``"tail"``
            (A0 derived from B0).
        channels: Channels this part contributes to the output, after truncation.
        in_channels: Channels the op reads (0 for identity parts).
        groups: Groups of the op (``channels`` for a depthwise tail, else 1).
        kernel_size: Kernel of the op; (1, 1) for identity parts.
        identity_slice: ``(start, stop)`` input channels copied by an identity part.
    """

    name: str
    kind: str
    channels: int
    in_channels: int = 0
    groups: int = 1
    kernel_size: tuple[int, int] = (1, 1)
    identity_slice: tuple[int, int] | None = None

    @property
    def weight_count(self) -> int:
        if self.kind == "identity":
            return 0
        return self.channels * (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]


class ReplacedConvCost:
    """Cost of the plain convolution a plan replaces, and the ratio to it (for any replacement plan)."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    bias: bool
    macs_per_position: int

    @property
    def plain_macs_per_position(self) -> int:
        """MACs per output position of the plain convolution being replaced (Eq. 7 times k^2)."""
        return self.in_channels * self.out_channels * self.kernel_size[0] * self.kernel_size[1]

    @property
    def plain_params(self) -> int:
        return self.plain_macs_per_position + (self.out_channels if self.bias else 0)

    @property
    def macs_ratio(self) -> float:
        return self.macs_per_position / self.plain_macs_per_position


@dataclass(frozen=True)
class CompConvPlan(ReplacedConvCost):
    """Complete sizing of one CompConv module. MACs are per output position: every internal op runs at the output
    resolution, so the module's MACs are ``macs_per_position * H_out * W_out``.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    depth: int
    requested_depth: int
    c_prim: int
    parts: tuple[Part, ...]
    dropped: int
    options: CompConvOptions
    bias: bool
    shuffle_groups: int
    depth_note: str = ""

    @property
    def convs(self) -> tuple[Part, ...]:
        """The dense convolutions B(d-1) ... B0, in execution order."""
        return tuple(p for p in self.parts if p.kind == "conv")

    @property
    def identities(self) -> tuple[Part, ...]:
        return tuple(p for p in self.parts if p.kind == "identity")

    @property
    def tail(self) -> Part | None:
        return next((p for p in self.parts if p.kind == "tail"), None)

    @property
    def identity_channels(self) -> int:
        return sum(p.channels for p in self.identities)

    @property
    def macs_per_position(self) -> int:
        """Closed-form MACs per output position (paper, Eq. 8 times k^2, with truncation)."""
        return sum(p.weight_count for p in self.parts)

    @property
    def params(self) -> int:
        """Closed-form parameter count: conv weights, inner BatchNorm affine terms, output bias."""
        count = sum(p.weight_count for p in self.parts)
        if self.options.inner_norm:
            count += sum(2 * p.channels for p in self.parts if p.kind in ("conv", "tail"))
        return count + (self.out_channels if self.bias else 0)

    def describe(self) -> str:
        """Short text such as ``d=3, C_prim=10, parts=B2:10 A2:10 B1:20 A1:20 B0:40 A0:28``."""
        parts = " ".join(f"{p.name}:{p.channels}" for p in self.parts)
        text = f"d={self.depth}, C_prim={self.c_prim}, parts={parts}"
        if self.dropped:
            text += f", dropped={self.dropped}"
        return text


def _fits(in_channels: int, out_channels: int, depth: int, divisor: int = 1) -> str:
    """Returns why ``depth`` does not fit these channels, or an empty string if it does."""
    c = c_prim_for(out_channels, depth, divisor)
    identity_needed = ((1 << (depth - 1)) - 1) * c
    if identity_needed > in_channels:
        return f"identity slices need {identity_needed} input channels, the layer has {in_channels}"
    dropped = ((1 << (depth + 1)) - 2) * c - out_channels
    a0 = (1 << (depth - 1)) * c
    if dropped > a0:
        return f"truncating {dropped} channels would cut past the tailing part A0 ({a0} channels)"
    return ""


def plan(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int] = 3,
    *,
    bias: bool = False,
    options: CompConvOptions | None = None,
    **option_overrides: Any,
) -> CompConvPlan:
    """Sizes a CompConv module replacing a ``in_channels -> out_channels`` convolution.

    Args:
        in_channels: C_in of the replaced convolution.
        out_channels: C_out of the replaced convolution.
        kernel_size: Kernel of the replaced convolution.
        bias: Whether the replaced convolution has a bias (kept on the output).
        options: CompConv options; ``option_overrides`` (e.g. ``c0=64``) are applied on top.

    Returns:
        A frozen :class:`CompConvPlan`. If the channels are too few for the requested depth, the
        depth is lowered until it fits; ``depth_note`` says why (and it is logged once).

    Example:
        >>> p = plan(128, 128, 3, depth=3)
        >>> (p.c_prim, p.dropped, round(p.macs_ratio, 3))
        (10, 12, 0.202)
    """
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"channels must be positive, got in_channels={in_channels}, out_channels={out_channels}")
    options = CompConvOptions.from_mapping(options.as_dict() if options else None, **option_overrides)
    kernel = _pair(kernel_size)
    requested = options.depth if options.depth is not None else adaptive_depth(in_channels, options.c0)

    depth, note = _fitting_depth(in_channels, out_channels, requested, options.c_prim_divisor)
    if depth == 0:
        conv = Part("conv", "conv", out_channels, in_channels, 1, kernel)
        return CompConvPlan(in_channels, out_channels, kernel, 0, requested, 0, (conv,), 0, options, bias, 1, note)

    c = c_prim_for(out_channels, depth, options.c_prim_divisor)
    dropped = ((1 << (depth + 1)) - 2) * c - out_channels
    parts = _parts(in_channels, kernel, depth, c, dropped, options)
    groups = 1
    if options.shuffle:
        groups = 1 << depth
        while out_channels % groups:
            groups //= 2
    return CompConvPlan(in_channels, out_channels, kernel, depth, requested, c, tuple(parts), dropped, options, bias, groups, note)


def _fitting_depth(in_channels: int, out_channels: int, requested: int, divisor: int) -> tuple[int, str]:
    """The largest depth up to ``requested`` that the channels fit, and why it was lowered (logged once)."""
    depth, note = requested, ""
    while depth > 1:
        why = _fits(in_channels, out_channels, depth, divisor)
        if not why:
            break
        note = note or f"depth lowered from {requested}: {why}"
        depth -= 1
    if depth != requested:
        note = f"{note}; using d={depth}"
        key = (in_channels, out_channels, requested, depth, note)
        if key not in _announced:
            _announced.add(key)
            _logger.info("CompConv %d->%d: %s", in_channels, out_channels, note)
    return depth, note


def _parts(in_channels: int, kernel: tuple[int, int], depth: int, c: int, dropped: int,
           options: CompConvOptions) -> list[Part]:
    """Figure 2's parts in concatenation order: B(d-1), then A(i+1) and B(i) down to B0, then the tail A0 (the
    part of B0's width that the dropped channels leave)."""
    parts: list[Part] = [Part(f"B{depth - 1}", "conv", c, in_channels, 1, kernel)]
    offset = 0
    for i in range(depth - 2, -1, -1):
        width = (1 << (depth - 2 - i)) * c
        parts.append(Part(f"A{i + 1}", "identity", width, identity_slice=(offset, offset + width)))
        offset += width
        parts.append(Part(f"B{i}", "conv", 2 * width, 2 * width, 1, kernel))
    b0 = parts[-1].channels
    kept = b0 - dropped
    if kept > 0:
        tail_kernel = _pair(options.tail_kernel) if options.tail_kernel is not None else kernel
        groups = kept if options.tail == "depthwise" else 1
        tail_in = kept if options.tail == "depthwise" else b0
        parts.append(Part("A0", "tail", kept, tail_in, groups, tail_kernel))
    return parts

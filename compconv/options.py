"""Validated options of CompConv: the project's choices, each with the spec's default."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

TAILS = ("depthwise", "dense")
POINTWISE_FORMS = ("auto", "chain", "lowrank", "dense")
MAX_DEPTH = 3


@dataclass(frozen=True)
class CompConvOptions:
    """Options that decide how a convolution is replaced by a CompConv module.

    Every field is one of the choices described in ``docs/method.md``; the defaults are the project's.

    Args:
        c0: Model-level constant C_0 of the adaptive depth rule (paper, Eq. 6). CompConv128 uses 128.
        depth: Explicit depth 0..3 for every replaced layer; ``None`` applies the adaptive rule.
            0 keeps a plain convolution.
        tail: How the tailing channels A0 are derived from B0: ``"depthwise"`` (default, the
            reading under which the paper's Eq. 8 holds) or ``"dense"``.
        tail_kernel: Kernel size of the tail op; ``None`` uses the replaced layer's kernel.
        shuffle: Apply the channel shuffle block to the concatenated output.
        inner_norm: Insert BatchNorm after every internal convolution (off in the paper's figure).
        pointwise_form: How a 1x1 layer of the fast path computes (the function and the gradients are Figure
            2's either way): ``"chain"`` runs Figure 2 as written; ``"lowrank"`` runs two 1x1 convs, ``[U; S]``
            then the composed ``V`` (:func:`compconv.pointwise.factorised_weights`); ``"dense"`` one 1x1 conv
            with ``V [U; S]``; ``"auto"`` (default) picks per layer and input as
            :func:`compconv.efficient.training_form` measured fastest.
        efficient: Build the training fast path :class:`compconv.efficient.EfficientCompConv2d` (default);
            False builds the plain :class:`compconv.CompConv2d`. Same parameters, same function.
        c_prim_divisor: Round C_prim up to a multiple of this (as timm/MobileNet/GhostNet round widths with
            ``make_divisible``); the parts beyond C_out are dropped from A0 as Eq. 5's truncation does. 1
            (default) keeps the paper's widths.
    """

    c0: int = 128
    depth: int | None = None
    tail: str = "depthwise"
    tail_kernel: int | None = None
    shuffle: bool = True
    inner_norm: bool = False
    pointwise_form: str = "auto"
    c_prim_divisor: int = 1
    efficient: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.c0, bool) or not isinstance(self.c0, int) or self.c0 < 1:
            raise ValueError(f"c0 must be a positive integer (e.g. 128 for CompConv128), got {self.c0!r}")
        if self.depth is not None and (
            isinstance(self.depth, bool) or not isinstance(self.depth, int) or not 0 <= self.depth <= MAX_DEPTH
        ):
            raise ValueError(f"depth must be null (adaptive rule) or an integer in 0..{MAX_DEPTH}, got {self.depth!r}")
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {self.tail!r}")
        if self.tail_kernel is not None and (
            isinstance(self.tail_kernel, bool) or not isinstance(self.tail_kernel, int) or self.tail_kernel < 1
        ):
            raise ValueError(f"tail_kernel must be null (use the layer's kernel) or a positive integer, got {self.tail_kernel!r}")
        for flag in ("shuffle", "inner_norm", "efficient"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if isinstance(self.c_prim_divisor, bool) or not isinstance(self.c_prim_divisor, int) or self.c_prim_divisor < 1:
            raise ValueError(f"c_prim_divisor must be a positive integer (1 keeps the paper's widths), got "
                             f"{self.c_prim_divisor!r}")
        if self.pointwise_form not in POINTWISE_FORMS:
            raise ValueError(f"pointwise_form must be one of {POINTWISE_FORMS}, got {self.pointwise_form!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None = None, **overrides: Any) -> "CompConvOptions":
        """Builds options from a mapping (e.g. a config node), rejecting unknown keys by name."""
        merged = {**dict(values or {}), **overrides}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown CompConv option(s) {unknown}; valid options are {sorted(known)}")
        return cls(**merged)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

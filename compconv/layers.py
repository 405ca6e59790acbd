"""CompConv2d, a drop-in replacement for ``nn.Conv2d`` (Zhang et al., CVPR-W 2021, Figure 2).

The forward is Figure 2 as written, with no runtime check, so every runtime and graph capture takes it as
written. The training fast path with the same parameters is :class:`compconv.efficient.EfficientCompConv2d`, and
:func:`compconv.create_conv2d` (:mod:`compconv.factory`) picks between the two; this module knows neither.
"""


import copy
import math
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .checks import DeployError, relative_error, tolerance_for
from .lowrank import build_form, rule_choice
from .options import CompConvOptions
from .pointwise import is_pointwise
from .shuffle import channel_shuffle
from .sizing import CompConvPlan
from .sizing import plan as plan_layer

__all__ = ["CompConv2d", "identity_sampling"]


def identity_sampling(kernel: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]):
    """Where a centre-tap kernel of this geometry reads the input, from the geometry alone: ``(pad, start, trim)``,
    the ``F.pad`` argument where the tap reaches into the zero padding, the first row/column read, and whether
    the strided slice can run past the output size (then it is cut to it).
    """
    pads, starts, trim = [], [], False
    for k, p, d in zip(kernel, padding, dilation):
        before, after = d * ((k - 1) // 2), d * (k // 2)  # reach of the centre tap to each side
        origin = before - p
        low, high = max(0, -origin), max(0, p - after)
        pads.append((low, high))
        starts.append(origin + low)
        trim = trim or after > p
    pad = [pads[1][0], pads[1][1], pads[0][0], pads[0][1]]
    return pad, (starts[0], starts[1]), trim


def _fold_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
                                        norm.weight, norm.bias)
    conv.weight, conv.bias = weight, bias


def _resolve_padding(padding: Any, kernel: tuple[int, int], stride: tuple[int, int],
                     dilation: tuple[int, int]) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError("padding='same' is only defined for stride 1 (as in nn.Conv2d)")
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(t % 2 for t in total):
            raise ValueError(f"padding='same' with kernel {kernel} and dilation {dilation} is asymmetric; "
                             "CompConv2d needs symmetric integer padding")
        return (total[0] // 2, total[1] // 2)
    return to_2tuple(padding)


def _same_padding(kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int] | str:
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if any(t % 2 for t in total):
        return "same"  # even kernels: let PyTorch pad asymmetrically
    return (total[0] // 2, total[1] // 2)


class CompConv2d(nn.Module):
    """Compact convolution module with the constructor of ``nn.Conv2d`` and the same output shape.

    Figure 2 for depth 1..3: ``B(d-1) = Conv(x)``; for ``i = d-2 .. 0``, ``A(i+1)`` is an identity slice of ``x``
    and ``B(i) = Conv(B(i+1) ⊕ A(i+1))``; ``A0 = tail(B0)``; the output is ``shuffle(B(d-1) ⊕ A(d-1) ⊕ ... ⊕ B0
    ⊕ A0)`` truncated to ``out_channels``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, device, dtype:
            As for ``nn.Conv2d``. ``groups`` must be 1 and ``padding_mode`` ``"zeros"``.
        plan: A :class:`compconv.CompConvPlan` for these channels and kernel; without it the layer is planned
            from ``options``.
        options: A :class:`compconv.CompConvOptions`; keyword options (``c0``, ``depth``, ...) override its
            fields. ``depth=0`` is rejected (:func:`create_conv2d` returns an ``nn.Conv2d`` for it).

    Attributes:
        plan: The :class:`compconv.CompConvPlan` the module was built from.
    """

    identity_starts: List[int]
    identity_stops: List[int]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        plan: CompConvPlan | None = None,
        options: CompConvOptions | None = None,
        **option_overrides: Any,
    ) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError(f"CompConv2d replaces dense convolutions only (groups=1), got groups={groups}")
        if padding_mode != "zeros":
            raise ValueError(f"CompConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = to_2tuple(kernel_size)
        self.stride = to_2tuple(stride)
        self.dilation = to_2tuple(dilation)
        self.padding = _resolve_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.plan: CompConvPlan = self._checked_plan(plan, bias, options, option_overrides)
        self._build_parts(self.plan, {"device": device, "dtype": dtype})
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        # Identity slices: input channels [start, stop) of each A part, sampled where a centre tap reads.
        self.identity_starts = [p.identity_slice[0] for p in self.plan.identities]
        self.identity_stops = [p.identity_slice[1] for p in self.plan.identities]
        self.identity_pad, self.identity_origin, self.identity_trim = identity_sampling(
            self.kernel_size, self.padding, self.dilation)
        self.identity_padded = any(self.identity_pad)
        self.shuffle_groups = self.plan.shuffle_groups
        self.reset_parameters()

    def _checked_plan(self, plan: CompConvPlan | None, bias: bool, options: CompConvOptions | None,
                      option_overrides: dict) -> CompConvPlan:
        """``plan`` checked against this layer's geometry, or the layer planned from ``options``."""
        if plan is None:
            plan = plan_layer(self.in_channels, self.out_channels, self.kernel_size, bias=bias, options=options,
                              **option_overrides)
        elif options is not None or option_overrides:
            raise ValueError("pass either a plan or options, not both")
        elif (plan.in_channels, plan.out_channels, plan.kernel_size, plan.bias) != (
                self.in_channels, self.out_channels, self.kernel_size, bias):
            raise ValueError(f"plan for {plan.in_channels}->{plan.out_channels} {plan.kernel_size} bias={plan.bias} "
                             f"does not fit this layer ({self.in_channels}->{self.out_channels} {self.kernel_size} "
                             f"bias={bias})")
        if plan.depth == 0:
            raise ValueError("depth=0 means a plain convolution; build it with compconv.create_conv2d(...)")
        return plan

    def _build_parts(self, plan: CompConvPlan, factory: dict) -> None:
        """The B convs (the first carries stride and padding), their norms, and the tail that makes A0."""
        same = _same_padding(self.kernel_size, self.dilation)
        self.convs = nn.ModuleList(
            nn.Conv2d(part.in_channels, part.channels, self.kernel_size,
                      stride=self.stride if index == 0 else 1, padding=self.padding if index == 0 else same,
                      dilation=self.dilation, bias=False, **factory)
            for index, part in enumerate(plan.convs)
        )
        inner_norm = plan.options.inner_norm
        self.norms = nn.ModuleList(
            nn.BatchNorm2d(p.channels, **factory) if inner_norm else nn.Identity() for p in plan.convs)
        tail = plan.tail
        self.tail: Optional[nn.Conv2d] = None
        self.tail_norm: Optional[nn.Module] = None
        self.tail_in = 0
        if tail is not None:
            self.tail = nn.Conv2d(tail.in_channels, tail.channels, tail.kernel_size,
                                  padding=_same_padding(tail.kernel_size, (1, 1)), groups=tail.groups, bias=False,
                                  **factory)
            self.tail_norm = nn.BatchNorm2d(tail.channels, **factory) if inner_norm else nn.Identity()
            self.tail_in = tail.in_channels

    @classmethod
    def from_layer(cls, layer: "CompConv2d") -> "CompConv2d":
        """A ``cls`` (this class or a subclass) sharing ``layer``'s submodules, parameters and shuffle: the same layer
        seen as another class, built through the constructor (on the meta device, so nothing is allocated or drawn
        from the random generator) and given ``layer``'s parts."""
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, bias=layer.plan.bias, device="meta", plan=layer.plan)
        new.convs, new.norms, new.tail, new.tail_norm = layer.convs, layer.norms, layer.tail, layer.tail_norm
        new.bias = layer.bias
        new.shuffle_groups = layer.shuffle_groups
        return new.train(layer.training)

    def reset_parameters(self) -> None:
        # As timm and torchvision initialise the convs of ResNet/VGG, so patched models train like baselines.
        for conv in [*self.convs, *([self.tail] if self.tail is not None else [])]:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
            nn.init.uniform_(self.bias, -bound, bound)

    def identity(self, x: torch.Tensor, start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
        """Input channels ``[start, stop)`` sampled at the output grid of ``like`` (a view when no padding is needed)."""
        return self.sample_identity(x[:, start:stop], like)

    def sample_identity(self, a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``a`` (some input channels) sampled where a centre tap of this layer's geometry reads, at ``like``'s grid."""
        if self.identity_padded:
            a = F.pad(a, self.identity_pad)
        a = a[:, :, self.identity_origin[0]::self.stride[0], self.identity_origin[1]::self.stride[1]]
        if self.identity_trim:
            a = a[:, :, :like.shape[-2], :like.shape[-1]]
        return a

    def identities(self, x: torch.Tensor, like: torch.Tensor) -> List[torch.Tensor]:
        """The identity parts ``[A(d-1), ..., A1]``: slices of ``x`` sampled at ``like``'s grid."""
        return [self.identity(x, start, stop, like) for start, stop in zip(self.identity_starts, self.identity_stops)]

    def parts(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``[B(d-1), A(d-1), ..., B0, A0]`` in concatenation order (before truncation and shuffle)."""
        out: List[torch.Tensor] = []
        b = self.norms[0](self.convs[0](x))
        out.append(b)
        identities = self.identities(x, b)
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            if index > 0:
                a = identities[index - 1]
                out.append(a)
                b = norm(conv(torch.cat([b, a], dim=1)))
                out.append(b)
        if self.tail is not None and self.tail_norm is not None:
            out.append(self.tail_norm(self.tail(b[:, :self.tail_in])))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = channel_shuffle(torch.cat(self.parts(x), dim=1), self.shuffle_groups)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    @torch.no_grad()
    def reparameterize(self) -> int:
        """Folds each inner BatchNorm into the conv before it, in place (timm's convention, which
        ``timm.utils.reparameterize_model`` calls); returns the number folded. Eval outputs are unchanged.
        """
        folded = 0
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            if isinstance(norm, nn.BatchNorm2d):
                _fold_norm(conv, norm)
                self.norms[index] = nn.Identity()
                folded += 1
        if isinstance(self.tail_norm, nn.BatchNorm2d):
            _fold_norm(self.tail, self.tail_norm)
            self.tail_norm = nn.Identity()
            folded += 1
        return folded

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """The layer's exact inference form (timm's ``fuse()`` convention, which ``timm.utils.reparameterize_model``
        calls): a plain :class:`CompConv2d` with its inner norms folded or, for a pointwise layer,
        :func:`compconv.lowrank.rule_choice`'s ``dense`` or ``lowrank`` form. ``self`` is not changed. The result is
        checked against the layer in eval mode on a random input (:class:`compconv.DeployError` if it differs).
        Folds that need the layer's neighbours (its BatchNorm, the shuffle) are :func:`compconv.deploy`'s.
        """
        fused = CompConv2d.from_layer(copy.deepcopy(self))
        fused.reparameterize()
        if is_pointwise(fused):
            form = rule_choice(fused)
            if form != "chain":
                fused = build_form(fused, None, form)
        self._check_fused(fused.eval())
        return fused.train(self.training)

    def _check_fused(self, fused: nn.Module) -> None:
        weight = self.convs[0].weight
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, self.in_channels, 16, 16, generator=generator).to(weight.device, weight.dtype)
        training = self.training
        try:
            want = self.eval()(x)
        finally:
            self.train(training)
        error, tolerance = relative_error(fused(x), want), tolerance_for(weight.dtype)
        if not error <= tolerance:
            raise DeployError(f"the fused form of {self.extra_repr()} differs from the layer by {error:.3g} "
                              f"(relative; tolerance {tolerance:.2g}); the layer was not changed: please report it")

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        opts = self.plan.options
        text += f", {self.plan.describe()}, tail={opts.tail}, shuffle_groups={self.shuffle_groups}"
        if opts.inner_norm:
            text += ", inner_norm=True"
        if self.bias is None:
            text += ", bias=False"
        return text


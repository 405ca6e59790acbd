"""CompConv2d: a drop-in replacement for ``nn.Conv2d`` (Zhang et al., CVPR-W 2021, Figure 2)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .options import CompConvOptions
from .sizing import CompConvPlan, _pair, plan

__all__ = ["CompConv2d", "channel_shuffle", "create_conv2d"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle: reshape channels to (groups, C/groups), transpose, flatten."""
    if groups == 1:
        return x
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _resolve_padding(padding: Any, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
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
    return _pair(padding)


def _same_padding(kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int] | str:
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if any(t % 2 for t in total):
        return "same"  # even kernels: let PyTorch pad asymmetrically
    return (total[0] // 2, total[1] // 2)


def _init_conv(conv: nn.Conv2d) -> None:
    # As timm and torchvision initialise the convs of ResNet/VGG, so patched models train like baselines.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


class CompConv2d(nn.Module):
    """Compact convolution module with the constructor of ``nn.Conv2d``.

    Implements the divide-and-conquer structure of the paper's Figure 2 for depth 1..3:
    ``B(d-1) = Conv(x)``; for ``i = d-2 .. 0``: ``A(i+1)`` is an identity slice of ``x`` and
    ``B(i) = Conv(B(i+1) ⊕ A(i+1))``; the tailing part ``A0 = tail(B0)``; the output is
    ``shuffle(B(d-1) ⊕ A(d-1) ⊕ ... ⊕ B0 ⊕ A0)`` truncated to ``out_channels``. The output shape
    equals that of ``nn.Conv2d`` with the same arguments for every geometry.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, device, dtype:
            As for ``nn.Conv2d``. ``groups`` must be 1 and ``padding_mode`` ``"zeros"``.
        c0, depth, tail, tail_kernel, shuffle, inner_norm: CompConv options, see
            :class:`compconv.CompConvOptions`. ``depth=0`` is rejected here; use
            :func:`create_conv2d`, which returns a plain ``nn.Conv2d`` for it.
        options: An options object; explicit keyword options override its fields.

    Attributes:
        plan: The :class:`compconv.CompConvPlan` the module was built from.
    """

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
        options: CompConvOptions | None = None,
        **option_overrides: Any,
    ) -> None:
        super().__init__()
        if groups != 1:
            raise ValueError(f"CompConv2d replaces dense convolutions only (groups=1), got groups={groups}")
        if padding_mode != "zeros":
            raise ValueError(f"CompConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = _resolve_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.plan: CompConvPlan = plan(in_channels, out_channels, self.kernel_size, bias=bias, options=options, **option_overrides)
        if self.plan.depth == 0:
            raise ValueError("depth=0 means a plain convolution; build it with compconv.create_conv2d(...)")

        same = _same_padding(self.kernel_size, self.dilation)
        convs = []
        for index, part in enumerate(self.plan.convs):
            first = index == 0
            convs.append(nn.Conv2d(
                part.in_channels, part.channels, self.kernel_size,
                stride=self.stride if first else 1,
                padding=self.padding if first else same,
                dilation=self.dilation, bias=False, **factory,
            ))
        self.convs = nn.ModuleList(convs)
        norm = self.plan.options.inner_norm
        self.norms = nn.ModuleList(
            [nn.BatchNorm2d(p.channels, **factory) if norm else nn.Identity() for p in self.plan.convs]
        )
        tail = self.plan.tail
        if tail is not None:
            self.tail = nn.Conv2d(
                tail.in_channels, tail.channels, tail.kernel_size, padding=_same_padding(tail.kernel_size, (1, 1)),
                groups=tail.groups, bias=False, **factory,
            )
            self.tail_norm = nn.BatchNorm2d(tail.channels, **factory) if norm else nn.Identity()
        else:
            self.tail, self.tail_norm = None, None
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        # Where a centre-tap kernel of the original geometry samples the input, per spatial dim.
        self._identity_origin = tuple(
            d * ((k - 1) // 2) - p for k, d, p in zip(self.kernel_size, self.dilation, self.padding)
        )
        self._identity_slices = tuple(p.identity_slice for p in self.plan.identities)
        self._gather = False
        self.set_output_groups(self.plan.shuffle_groups)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in self.convs:
            _init_conv(conv)
        if self.tail is not None:
            _init_conv(self.tail)
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _identity(self, x: torch.Tensor, index: int, size: tuple[int, int]) -> torch.Tensor:
        """Identity slice ``index`` of the input, sampled where the replaced conv's centre tap would read."""
        if self._gather:
            x = x.index_select(1, getattr(self, f"identity_index_{index}"))
        else:
            start, stop = self._identity_slices[index]
            x = x[:, start:stop]
        pads = []
        for dim, (origin, step, out) in enumerate(zip(self._identity_origin, self.stride, size)):
            extent = x.shape[2 + dim]
            last = origin + step * (out - 1)
            pads.append((max(0, -origin), max(0, last - (extent - 1))))
        if any(a or b for a, b in pads):
            x = F.pad(x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
        top = self._identity_origin[0] + pads[0][0]
        left = self._identity_origin[1] + pads[1][0]
        return x[:, :, top:top + self.stride[0] * (size[0] - 1) + 1:self.stride[0],
                 left:left + self.stride[1] * (size[1] - 1) + 1:self.stride[1]]

    def _compute_parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The parts B(d-1), A(d-1), ..., B0, A0 in concatenation order (identity parts are views)."""
        b = self.norms[0](self.convs[0](x))
        size = (b.shape[-2], b.shape[-1])
        parts = [b]
        for index, (conv, norm) in enumerate(zip(self.convs[1:], self.norms[1:])):
            a = self._identity(x, index, size)
            b = norm(conv(torch.cat([b, a], dim=1)))
            parts += [a, b]
        if self.tail is not None:
            parts.append(self.tail_norm(self.tail(b[:, :self.tail.in_channels])))
        return parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._compute_parts(x)
        first = parts[0]
        n, _, h, w = first.shape
        memory_format = torch.channels_last if first.is_contiguous(memory_format=torch.channels_last) and \
            not first.is_contiguous() else torch.contiguous_format
        y = torch.empty(n, self.out_channels, h, w, dtype=first.dtype, device=first.device, memory_format=memory_format)
        # Each part is copied once, straight to its shuffled position: no concatenation followed by a
        # second, shuffling copy. View (N, C/g, g, H, W): output channel i*g + j <- concat channel j*C/g + i.
        groups = self.output_groups
        view = y.view(n, self.out_channels // groups, groups, h, w)
        for part, start, stop, group, dst_start, dst_stop in self._pieces:
            view[:, dst_start:dst_stop, group].copy_(parts[part][:, start:stop])
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The literal reading of Figure 2: concatenate, then shuffle (tests check forward against it)."""
        y = channel_shuffle(torch.cat(self._compute_parts(x), dim=1), self.output_groups)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def set_output_groups(self, groups: int) -> None:
        """Sets the shuffle groups applied to the output (``deploy`` sets 1 after folding the shuffle away)."""
        if self.out_channels % groups:
            raise ValueError(f"{groups} shuffle groups do not divide {self.out_channels} channels")
        self.output_groups = groups
        size = self.out_channels // groups
        pieces, offset = [], 0
        for index, part in enumerate(self.plan.parts):
            start = offset
            while start < offset + part.channels:
                group = start // size
                stop = min(offset + part.channels, (group + 1) * size)
                pieces.append((index, start - offset, stop - offset, group, start - group * size, stop - group * size))
                start = stop
            offset += part.channels
        self._pieces = tuple(pieces)

    def set_input_permutation(self, source: torch.Tensor) -> None:
        """Declares that the input arrives permuted: channel ``o`` of the original input is now ``source[o]``.

        Used by ``deploy`` when the previous layer's shuffle is folded into this one: the first conv's
        input channels are reordered and the identity slices become gathers of the right channels.
        """
        position = torch.argsort(source)
        first = self.convs[0]
        first.weight.data = first.weight.data[:, position].contiguous()
        for index, (start, stop) in enumerate(self._identity_slices):
            self.register_buffer(f"identity_index_{index}", source[start:stop].clone().to(first.weight.device))
        self._gather = True

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        opts = self.plan.options
        text += f", {self.plan.describe()}, tail={opts.tail}, shuffle_groups={self.output_groups}"
        if opts.inner_norm:
            text += ", inner_norm=True"
        if self.bias is None:
            text += ", bias=False"
        return text


def create_conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    bias: bool = True,
    *,
    options: CompConvOptions | None = None,
    **option_overrides: Any,
) -> nn.Module:
    """Factory that returns a :class:`CompConv2d`, or a plain ``nn.Conv2d`` when the depth is 0."""
    opts = CompConvOptions.from_mapping(options.as_dict() if options else None, **option_overrides)
    if opts.depth == 0:
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias)
    return CompConv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias, options=opts)

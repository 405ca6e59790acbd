"""Ghost module (Han et al., GhostNet, CVPR 2020) as a conv drop-in, the peer CompConv is compared with: a
primary conv makes ``ceil(C_out / ratio)`` channels, a depthwise "cheap operation" the rest, truncated to
``C_out``. Like :class:`compconv.CompConv2d` it is linear, so it replaces any conv a BatchNorm follows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from timm.layers import to_2tuple
from torch import nn

from .sizing import ReplacedConvCost

__all__ = ["GhostConv2d", "GhostOptions", "GhostPlan", "ghost_plan"]


@dataclass(frozen=True)
class GhostOptions:
    """Args: ratio: s of the paper (output channels per primary channel). dw_size: cheap-op kernel."""

    ratio: int = 2
    dw_size: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int) or self.ratio < 2:
            raise ValueError(f"ratio must be an integer >= 2, got {self.ratio!r}")
        if isinstance(self.dw_size, bool) or not isinstance(self.dw_size, int) or self.dw_size < 1 or self.dw_size % 2 == 0:
            raise ValueError(f"dw_size must be a positive odd integer, got {self.dw_size!r}")

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None = None, **overrides: Any) -> "GhostOptions":
        merged = {**(values or {}), **overrides}
        unknown = sorted(set(merged) - {"ratio", "dw_size"})
        if unknown:
            raise ValueError(f"unknown Ghost option(s) {unknown}; valid options are ['dw_size', 'ratio']")
        return cls(**merged)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GhostPlan(ReplacedConvCost):
    """Sizing of one Ghost module, with the same accounting interface as :class:`compconv.CompConvPlan`."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    primary: int
    cheap: int
    options: GhostOptions
    bias: bool
    depth: int = 1
    depth_note: str = ""

    @property
    def c_prim(self) -> int:
        return self.primary

    @property
    def macs_per_position(self) -> int:
        kh, kw = self.kernel_size
        return self.in_channels * self.primary * kh * kw + self.cheap * self.options.dw_size ** 2

    @property
    def params(self) -> int:
        return self.macs_per_position + (self.out_channels if self.bias else 0)


def ghost_plan(in_channels: int, out_channels: int, kernel_size=1, *, bias: bool = False,
               options: GhostOptions | None = None, **overrides: Any) -> GhostPlan:
    opts = GhostOptions.from_mapping(options.as_dict() if options else None, **overrides)
    primary = math.ceil(out_channels / opts.ratio)
    # The cheap op maps each of its input channels to (ratio - 1) channels. Rather than computing
    # channels that truncation would drop (GhostNet's habit), grow the primary part until the cheap
    # part is a whole number of groups.
    while (out_channels - primary) % (opts.ratio - 1):
        primary += 1
    cheap = out_channels - primary
    return GhostPlan(in_channels, out_channels, to_2tuple(kernel_size), primary, cheap, opts, bias)


class GhostConv2d(nn.Module):
    """Ghost module with the constructor of ``nn.Conv2d`` (``groups`` must be 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 options: GhostOptions | None = None, **overrides: Any) -> None:
        super().__init__()
        if groups != 1 or padding_mode != "zeros":
            raise ValueError("GhostConv2d replaces dense zero-padded convolutions only (groups=1, padding_mode='zeros')")
        factory = {"device": device, "dtype": dtype}
        self.plan = ghost_plan(in_channels, out_channels, kernel_size, bias=bias, options=options, **overrides)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.primary = nn.Conv2d(in_channels, self.plan.primary, kernel_size, stride, padding, dilation,
                                 bias=False, **factory)
        ratio, k = self.plan.options.ratio, self.plan.options.dw_size
        # Depthwise with channel multiplier (ratio - 1) over the first cheap / (ratio - 1) primary channels.
        self.cheap = None
        if self.plan.cheap:
            groups = self.plan.cheap // (ratio - 1)
            self.cheap = nn.Conv2d(groups, self.plan.cheap, k, padding=k // 2, groups=groups, bias=False, **factory)
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None
        for conv in (self.primary, self.cheap):
            if conv is not None:
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.primary(x)
        if self.cheap is not None:
            y = torch.cat([y, self.cheap(y[:, :self.cheap.in_channels])], dim=1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, primary={self.plan.primary}, cheap={self.plan.cheap}, "
                f"ratio={self.plan.options.ratio}, dw_size={self.plan.options.dw_size}")

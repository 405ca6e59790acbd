"""Exact 1x1 forms of a pointwise CompConv (and the BatchNorm after it): ``dense``, one conv, and ``lowrank``,
:class:`LowRankConv2d`. Built from :mod:`compconv.pointwise`'s algebra in float64; shared by
:meth:`compconv.CompConv2d.fuse` and :func:`compconv.deploy`. Nothing here imports the layer classes.
"""

# (no `from __future__ import annotations` here: TorchScript reads these annotations as types)
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .capture import memory_format_of, recording_graph
from .pointwise import LOWRANK_MAX_SHARE, lowrank_macs, part_map
from .shuffle import shuffle_source

__all__ = ["FORMS", "LowRankConv2d", "build_form", "channel_slice", "form_macs", "gather_channels", "norm_affine",
           "rule_choice"]

FORMS = ("chain", "lowrank", "dense")


def gather_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(1, index)`` in ``x``'s memory format (``index_select`` returns NCHW, which would turn every
    conv downstream NCHW). Graph captures record the plain op.
    """
    if not torch.jit.is_scripting():  # TorchScript compiles the plain op only
        if (not recording_graph(x) and not torch.compiler.is_compiling()
                and memory_format_of(x) == torch.channels_last):
            return x.permute(0, 2, 3, 1).index_select(3, index).permute(0, 3, 1, 2)
    return x.index_select(1, index)


def channel_slice(index: torch.Tensor) -> Optional[Tuple[int, int, int]]:
    """``index`` as one slice ``(start, stop, step)`` of channels (step >= 1), or None: such channels are read as a
    view, so the concatenation after them is their only copy.
    """
    values = index.tolist()
    if not values:
        return None
    step = values[1] - values[0] if len(values) > 1 else 1
    if step < 1 or any(b - a != step for a, b in zip(values, values[1:])):
        return None
    return values[0], values[-1] + 1, step


class SlicesOfIndex:
    """Keeps a layer's slices (``slices_attribute``, set by its ``index_changed()``) in step with its index buffer
    when a state dict is loaded or an older pickle is unpickled."""

    slices_attribute = ""  # each subclass names it and defines index_changed(), which sets it

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # nn.Module's documented override point
        super()._load_from_state_dict(*args, **kwargs)
        self.index_changed()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if not hasattr(self, self.slices_attribute):
            self.index_changed()


class LowRankConv2d(SlicesOfIndex, nn.Module):
    """``y = V · [U x ; x[identity channels]] + bias``: a 1x1 CompConv (+ BatchNorm) in two convs.

    Args:
        first: The CompConv's first conv ``U`` (C_in -> C_prim, carrying the stride).
        identity_index: Input channels copied beside ``U x`` (the identity slices), or None.
        second: ``V`` (C_prim + identity channels -> C_out) with the bias.
    """

    identity_index: Optional[torch.Tensor]
    identity_slice: Optional[Tuple[int, int, int]]  # identity_index as one slice (channel_slice), if it is one
    slices_attribute = "identity_slice"

    def __init__(self, first: nn.Conv2d, identity_index: Optional[torch.Tensor], second: nn.Conv2d) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.stride = first.stride
        self.register_buffer("identity_index", identity_index)
        self.in_channels, self.out_channels = first.in_channels, second.out_channels
        self.index_changed()

    def index_changed(self) -> None:
        """Re-reads ``identity_index`` (call after setting it)."""
        index = self.identity_index
        self.identity_slice = channel_slice(index) if index is not None else None

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """``[U x ; x[identity channels]]``, the second conv's input."""
        b = self.first(x)
        index = self.identity_index
        if index is not None:
            cut = self.identity_slice
            a = x[:, cut[0]:cut[1]:cut[2]] if cut is not None else gather_channels(x, index)
            b = torch.cat([b, a[:, :, ::self.stride[0], ::self.stride[1]]], dim=1)
        return b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.mix(x))


def norm_affine(norm: Optional[nn.BatchNorm2d], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval BatchNorm as float64 ``scale * y + shift`` (the identity without one), through torch's
    ``fuse_conv_bn_weights`` (the fold of a unit conv), as every BatchNorm fold here is."""
    ones, zeros = torch.ones(channels, 1, 1, 1, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    if norm is None:
        return ones.view(-1), zeros
    mean, var = (t.detach().cpu().double() for t in (norm.running_mean, norm.running_var))
    weight = norm.weight.detach().cpu().double() if norm.weight is not None else None
    bias = norm.bias.detach().cpu().double() if norm.bias is not None else None
    scale, shift = fuse_conv_bn_weights(ones, zeros, mean, var, norm.eps, weight, bias)
    return scale.detach().view(-1), shift.detach()


def identity_index(module) -> Optional[torch.Tensor]:
    """The input channels the identity slices of a CompConv copy, in concatenation order (permuted input included)."""
    if not module.identity_starts:
        return None
    index = torch.cat([torch.arange(a, b) for a, b in zip(module.identity_starts, module.identity_stops)])
    permuted = getattr(module, "input_index", None)
    return permuted.cpu()[index] if permuted is not None else index


def _conv(weight: torch.Tensor, bias: torch.Tensor, stride, like: nn.Conv2d) -> nn.Conv2d:
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1, stride=stride, bias=True,
                     device=like.weight.device, dtype=like.weight.dtype)
    conv.weight.data.copy_(weight[:, :, None, None])
    conv.bias.data.copy_(bias)
    return conv


@torch.no_grad()
def build_form(module, norm: Optional[nn.BatchNorm2d], form: str) -> nn.Module:
    """The ``lowrank`` or ``dense`` equivalent of a pointwise CompConv followed by ``norm`` (None: no norm)."""
    matrix, offset = (t.cpu() for t in part_map(module, torch.float64, with_bias=True))  # the algebra runs on the CPU
    source = shuffle_source(module.out_channels, module.shuffle_groups)
    scale, shift = norm_affine(norm, module.out_channels)
    bias = module.bias.detach().cpu().double() if module.bias is not None else 0.0
    matrix = scale[:, None] * matrix[source]
    offset = scale * (offset[source] + bias) + shift
    first = module.convs[0]
    index = identity_index(module)
    if form == "lowrank":
        u = nn.Conv2d(first.in_channels, first.out_channels, 1, stride=first.stride, bias=False,
                      device=first.weight.device, dtype=first.weight.dtype)
        u.weight.data.copy_(first.weight.data)
        return LowRankConv2d(u, index.to(first.weight.device) if index is not None else None,
                             _conv(matrix, offset, 1, first))
    if form != "dense":
        raise ValueError(f"form must be 'lowrank' or 'dense', got {form!r}")
    # dense: z = [U x ; S x] is itself a linear map of x
    u_mat = first.weight.detach().cpu().double()[:, :, 0, 0]
    selection = torch.zeros(matrix.shape[1] - u_mat.shape[0], module.in_channels, dtype=torch.float64)
    if index is not None:
        selection[torch.arange(len(index)), index] = 1.0
    return _conv(matrix @ torch.cat([u_mat, selection]), offset, first.stride, first)


def form_macs(module, form: str) -> int:
    """MACs per output position of a CompConv in ``form`` (a dense form costs the plain conv's)."""
    plan = module.plan
    if form == "dense":
        return plan.plain_macs_per_position
    if form == "lowrank":
        return lowrank_macs(module, identities_by_gemm=False, scale_v=False)
    return plan.macs_per_position


def rule_choice(module, runtime: str = "torch") -> str:
    """The form of a pointwise layer without a timing: ``lowrank`` where it costs at most 0.6x the plain conv's MACs
    (in PyTorch for depth >= 2 only); else ``dense``, or in PyTorch ``chain`` for the deeper layers. Measured on a
    2-core AVX-512 CPU (docs/deploy.md). ONNX Runtime pays layout reorders around every concatenation and slice,
    which per-layer timing cannot see, so dense wins wherever low-rank does not pay.
    """
    lowrank_pays = form_macs(module, "lowrank") <= LOWRANK_MAX_SHARE * module.plan.plain_macs_per_position
    if runtime == "ort":
        return "lowrank" if lowrank_pays else "dense"
    if module.plan.depth == 1 or module.plan.macs_ratio > 0.5:
        return "dense"
    return "lowrank" if lowrank_pays else "chain"

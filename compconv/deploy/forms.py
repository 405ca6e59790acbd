"""Exact inference forms of CompConv layers: ``dense`` (one conv) and ``lowrank`` (:class:`LowRankConv2d`)
for 1x1 layers with their BatchNorm and shuffle absorbed (the algebra is :mod:`compconv.pointwise`), and
:class:`DeployedCompConv2d`, a CompConv whose input channels arrive permuted.
"""


from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..efficient import assemble, concat_shuffle, recording_graph, shuffle_keeping_format
from ..layers import CompConv2d, channel_shuffle, shuffle_source
from ..pointwise import part_map

__all__ = ["DeployedCompConv2d", "LowRankConv2d", "absorb_norm", "build_form", "form_macs", "fold_shuffle",
           "permute_input"]

FORMS = ("chain", "lowrank", "dense")


def gather_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(1, index)`` in ``x``'s memory format (``index_select`` returns NCHW, which would turn every
    conv downstream NCHW). Graph captures record the plain op.
    """
    if not torch.jit.is_scripting():  # TorchScript compiles the plain op only
        if (x.dim() == 4 and not recording_graph(x) and not torch.compiler.is_compiling() and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
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


class _SlicesOfIndex:
    """Keeps a deployed layer's slices (``_slices_attribute``, set by its ``index_changed()``) in step with its index
    buffer when a state dict is loaded or an older pickle is unpickled.
    """

    _slices_attribute = ""

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.index_changed()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self._slices_attribute not in self.__dict__:
            self.index_changed()


class LowRankConv2d(_SlicesOfIndex, nn.Module):
    """``y = V · [U x ; x[identity channels]] + bias``: a 1x1 CompConv (+ BatchNorm) in two convs.

    Args:
        first: The CompConv's first conv ``U`` (C_in -> C_prim, carrying the stride).
        identity_index: Input channels copied beside ``U x`` (the identity slices), or None.
        second: ``V`` (C_prim + identity channels -> C_out) with the bias.
    """

    identity_index: Optional[torch.Tensor]
    identity_slice: Optional[Tuple[int, int, int]]  # identity_index as one slice (channel_slice), if it is one
    _slices_attribute = "identity_slice"

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


class DeployedCompConv2d(_SlicesOfIndex, CompConv2d):
    """A :class:`CompConv2d` as deploy leaves it (:func:`permute_input`, :func:`absorb_norm`): its input channels may
    arrive permuted (an upstream shuffle folded in), and it may apply the eval BatchNorm after it as
    ``out_scale * y + out_shift`` inside the copy that concatenates its parts (in eager PyTorch).
    """

    identity_starts: List[int]  # TorchScript reads a class's own annotations only
    identity_stops: List[int]
    input_index: Optional[torch.Tensor]
    out_scale: Optional[torch.Tensor]
    out_shift: Optional[torch.Tensor]
    input_slices: Dict[int, Tuple[int, int, int]]  # identity part's start -> its permuted channels as one slice
    _slices_attribute = "input_slices"

    @classmethod
    def from_compconv(cls, conv: CompConv2d) -> "DeployedCompConv2d":
        """The same layer (sharing its submodules and parameters) as a deployed module."""
        deployed = cls.__new__(cls)
        nn.Module.__init__(deployed)
        for key, value in vars(conv).items():
            if key in ("_parameters", "_buffers", "_modules"):
                getattr(deployed, key).update(value)
            elif not key.startswith("_") or key == "_non_persistent_buffers_set":
                deployed.__dict__[key] = value
        deployed.training = conv.training
        deployed.register_buffer("input_index", None)
        deployed.register_buffer("out_scale", None)
        deployed.register_buffer("out_shift", None)
        deployed.input_slices = {}
        return deployed

    def index_changed(self) -> None:
        """Re-reads ``input_index`` (call after setting it)."""
        index = self.input_index
        self.input_slices = {}
        if index is not None:
            for start, stop in zip(self.identity_starts, self.identity_stops):
                cut = channel_slice(index[start:stop])
                if cut is not None:
                    self.input_slices[start] = cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # deploy leaves these layers in the chain form
        parts = self.parts(x)
        scale, shift = self.out_scale, self.out_shift
        if scale is None or shift is None:
            y = channel_shuffle(torch.cat(parts, dim=1), self.shuffle_groups) if torch.jit.is_scripting() else \
                concat_shuffle(parts, self.shuffle_groups)
            return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
        if torch.jit.is_scripting():  # TorchScript compiles the plain ops only
            y = channel_shuffle(torch.cat(parts, dim=1), self.shuffle_groups)
        elif recording_graph(x) or torch.compiler.is_compiling():
            y = shuffle_keeping_format(torch.cat(parts, dim=1), self.shuffle_groups)
        else:
            return assemble(parts, self.shuffle_groups, scale, shift)
        return y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    def identity(self, x: torch.Tensor, start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
        index = self.input_index
        if index is None:
            return self.sample_identity(x[:, start:stop], like)
        if start in self.input_slices:
            cut = self.input_slices[start]
            return self.sample_identity(x[:, cut[0]:cut[1]:cut[2]], like)
        return self.sample_identity(gather_channels(x, index[start:stop]), like)


# ---------------------------------------------------------------------------------------------- 1x1 algebra
def norm_affine(norm: Optional[nn.BatchNorm2d], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval BatchNorm as ``scale * y + shift`` (the identity without one)."""
    if norm is None:
        return torch.ones(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    mean, var = (t.detach().cpu().double() for t in (norm.running_mean, norm.running_var))
    weight = norm.weight.detach().cpu().double() if norm.weight is not None else torch.ones_like(mean)
    bias = norm.bias.detach().cpu().double() if norm.bias is not None else torch.zeros_like(mean)
    scale = weight / torch.sqrt(var + norm.eps)
    return scale, bias - mean * scale


def identity_index(module: CompConv2d) -> Optional[torch.Tensor]:
    """The input channels the identity slices copy, in concatenation order (permuted input included)."""
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
def build_form(module: CompConv2d, norm: Optional[nn.BatchNorm2d], form: str) -> nn.Module:
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


def form_macs(module: CompConv2d, form: str) -> int:
    """MACs per output position of ``module`` in ``form`` (a dense form costs the plain conv's)."""
    plan = module.plan
    if form == "dense":
        return plan.plain_macs_per_position
    if form == "lowrank":
        rank = plan.c_prim + plan.identity_channels
        return plan.in_channels * plan.c_prim + rank * plan.out_channels
    return plan.macs_per_position


# ---------------------------------------------------------------------------------------------- permutations
@torch.no_grad()
def permute_input(consumer: nn.Module, source: torch.Tensor) -> nn.Module:
    """``consumer`` rewritten for an input whose original channel ``o`` arrives as channel ``source[o]``: a plain
    conv or :class:`LowRankConv2d` is changed in place, a :class:`CompConv2d` becomes a :class:`DeployedCompConv2d`.
    """
    if isinstance(consumer, LowRankConv2d):
        weight_holder = consumer.first
    elif isinstance(consumer, CompConv2d):
        if not isinstance(consumer, DeployedCompConv2d):
            consumer = DeployedCompConv2d.from_compconv(consumer)
        weight_holder = consumer.convs[0]
    elif isinstance(consumer, nn.Conv2d) and consumer.groups == 1:
        weight_holder = consumer
    else:
        raise TypeError(f"cannot permute the input channels of {type(consumer).__name__}")
    device = weight_holder.weight.device
    position = torch.argsort(source).to(device)
    weight_holder.weight.data = weight_holder.weight.data[:, position].contiguous()
    if isinstance(consumer, LowRankConv2d) and consumer.identity_index is not None:
        consumer.identity_index = source.to(device)[consumer.identity_index]
        consumer.index_changed()
    elif isinstance(consumer, DeployedCompConv2d) and consumer.identity_stops:
        previous = consumer.input_index
        consumer.input_index = source.to(device)[:max(consumer.identity_stops)] if previous is None \
            else source.to(device)[previous]
        consumer.index_changed()
    return consumer


@torch.no_grad()
def fold_shuffle(conv: CompConv2d, norm: nn.BatchNorm2d) -> torch.Tensor:
    """Drops ``conv``'s output shuffle and reorders ``norm`` to match; returns ``source`` for the consumer
    (:func:`permute_input`): the norm's output channel ``o`` is now at ``source[o]``."""
    source = shuffle_source(conv.out_channels, conv.shuffle_groups)
    position = torch.argsort(source)
    conv.shuffle_groups = 1
    for name in ("weight", "bias", "running_mean", "running_var"):
        tensor = getattr(norm, name)
        if tensor is not None:
            tensor.data = tensor.data[position.to(tensor.device)]
    return source


@torch.no_grad()
def absorb_norm(conv: CompConv2d, norm: nn.BatchNorm2d) -> "DeployedCompConv2d":
    """``conv`` (chain form, no output bias) as a :class:`DeployedCompConv2d` that applies the eval ``norm`` itself;
    the caller replaces ``norm`` by ``nn.Identity``.
    """
    if conv.bias is not None:
        raise ValueError("absorb_norm needs the layer's bias moved into the norm first")
    deployed = conv if isinstance(conv, DeployedCompConv2d) else DeployedCompConv2d.from_compconv(conv)
    scale, shift = norm_affine(norm, conv.out_channels)
    like = conv.convs[0].weight
    deployed.out_scale = scale.to(like.device, like.dtype)
    deployed.out_shift = shift.to(like.device, like.dtype)
    return deployed

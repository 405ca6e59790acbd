"""What deploy leaves of a CompConv layer that stays a chain: :class:`DeployedCompConv2d` (its input channels may
arrive permuted, and it may apply the BatchNorm after it in its assembly), and the folds that make it
(:func:`permute_input`, :func:`fold_shuffle`, :func:`absorb_norm`). The 1x1 forms are :mod:`compconv.lowrank`'s.
"""


from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..efficient import assemble, concat_shuffle
from ..capture import recording_graph
from ..layers import CompConv2d
from ..lowrank import LowRankConv2d, SlicesOfIndex, channel_slice, gather_channels, norm_affine
from ..shuffle import channel_shuffle, shuffle_keeping_format, shuffle_source

__all__ = ["DeployedCompConv2d", "absorb_norm", "fold_shuffle", "permute_input"]


class DeployedCompConv2d(SlicesOfIndex, CompConv2d):
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
    slices_attribute = "input_slices"

    @classmethod
    def from_layer(cls, layer: CompConv2d) -> "DeployedCompConv2d":
        """The same layer (sharing its submodules and parameters) as a deployed module, input in order."""
        deployed = super().from_layer(layer)
        deployed.register_buffer("input_index", None)
        deployed.register_buffer("out_scale", None)
        deployed.register_buffer("out_shift", None)
        deployed.input_slices = {}
        return deployed

    def fuse(self) -> nn.Module:
        """Already an inference form (``timm.utils.reparameterize_model`` after :func:`compconv.deploy`)."""
        return self

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
            consumer = DeployedCompConv2d.from_layer(consumer)
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
    deployed = conv if isinstance(conv, DeployedCompConv2d) else DeployedCompConv2d.from_layer(conv)
    scale, shift = norm_affine(norm, conv.out_channels)
    like = conv.convs[0].weight
    deployed.out_scale = scale.to(like.device, like.dtype)
    deployed.out_shift = shift.to(like.device, like.dtype)
    return deployed

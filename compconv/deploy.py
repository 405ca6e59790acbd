"""Inference-time transform of a CompConv model: fold what is foldable, keep outputs equal.

``deploy(model)`` (model in eval mode afterwards):

1. folds each internal BatchNorm (``inner_norm``) into the convolution before it;
2. folds a CompConv's output bias into the BatchNorm that follows it;
3. removes the channel shuffle of a CompConv whose output goes through a BatchNorm and an
   elementwise activation into another conv of the same residual block (``conv1 -> bn1 -> conv2``
   and ``conv2 -> bn2 -> conv3`` in timm/torchvision Bottleneck and BasicBlock): the permutation
   moves into the BatchNorm's parameters and the next layer's input channels (its identity slices
   become gathers). The last conv of a block feeds the residual sum, so its shuffle stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import CompConv2d, channel_shuffle

__all__ = ["DeployReport", "deploy"]

_CHAINS = (("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3"))
# Modules that may sit between a block's bn and next conv without breaking the fold (elementwise, or off in eval).
_TRANSPARENT = (nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Dropout)


@dataclass
class DeployReport:
    norms_folded: int = 0
    biases_folded: int = 0
    shuffles_folded: int = 0

    def __str__(self) -> str:
        return (f"DeployReport({self.norms_folded} inner norms folded, {self.biases_folded} biases folded, "
                f"{self.shuffles_folded} shuffles folded)")


@torch.no_grad()
def _fold_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    bias = norm.bias - norm.running_mean * scale
    conv.bias = nn.Parameter(bias if conv.bias is None else conv.bias * scale + bias)


def _fold_inner_norms(module: CompConv2d, report: DeployReport) -> None:
    for index, (conv, norm) in enumerate(zip(module.convs, module.norms)):
        if isinstance(norm, nn.BatchNorm2d):
            _fold_norm(conv, norm)
            module.norms[index] = nn.Identity()
            report.norms_folded += 1
    if isinstance(module.tail_norm, nn.BatchNorm2d):
        _fold_norm(module.tail, module.tail_norm)
        module.tail_norm = nn.Identity()
        report.norms_folded += 1


def _transparent_between(block: nn.Module, first: str, second: str) -> bool:
    """True when everything the block runs between ``first`` (a bn) and ``second`` (a conv) is elementwise."""
    names = [name for name, _ in block.named_children()]
    if first not in names or second not in names:
        return False
    between = names[names.index(first) + 1:names.index(second)]
    return all(isinstance(getattr(block, n), _TRANSPARENT) or getattr(block, n) is None for n in between)


@torch.no_grad()
def _fold_shuffle(conv: CompConv2d, norm: nn.BatchNorm2d, consumer: nn.Module) -> None:
    groups = conv.output_groups
    channels = conv.out_channels
    # source[o]: the concatenation channel that the shuffle puts at output channel o.
    source = channel_shuffle(torch.arange(channels, dtype=torch.float32).view(1, -1, 1, 1), groups).flatten().long()
    position = torch.argsort(source)
    conv.set_output_groups(1)
    if conv.bias is not None:
        conv.bias.data = conv.bias.data[position]
    for name in ("weight", "bias", "running_mean", "running_var"):
        tensor = getattr(norm, name)
        if tensor is not None:
            tensor.data = tensor.data[position.to(tensor.device)]
    if isinstance(consumer, CompConv2d):
        consumer.set_input_permutation(source)
    else:
        consumer.weight.data = consumer.weight.data[:, position.to(consumer.weight.device)].contiguous()


@torch.no_grad()
def deploy(model: nn.Module) -> DeployReport:
    """Folds inner norms, output biases and in-block shuffles of every CompConv in ``model`` (in place).

    The model is put in eval mode; its eval-mode outputs are unchanged up to float rounding.
    """
    model.eval()
    report = DeployReport()
    for module in model.modules():
        if isinstance(module, CompConv2d):
            _fold_inner_norms(module, report)
    for block in model.modules():
        for conv_name in ("conv1", "conv2", "conv3"):
            conv, norm = getattr(block, conv_name, None), getattr(block, conv_name.replace("conv", "bn"), None)
            if isinstance(conv, CompConv2d) and conv.bias is not None and isinstance(norm, nn.BatchNorm2d):
                norm.running_mean.sub_(conv.bias)
                conv.bias = None
                report.biases_folded += 1
        for conv_name, norm_name, next_name in _CHAINS:
            conv, norm, consumer = (getattr(block, n, None) for n in (conv_name, norm_name, next_name))
            if (isinstance(conv, CompConv2d) and conv.output_groups > 1 and isinstance(norm, nn.BatchNorm2d)
                    and isinstance(consumer, (CompConv2d, nn.Conv2d)) and getattr(consumer, "groups", 1) == 1
                    and not getattr(consumer, "_gather", False)
                    and _transparent_between(block, norm_name, next_name)):
                _fold_shuffle(conv, norm, consumer)
                report.shuffles_folded += 1
    return report

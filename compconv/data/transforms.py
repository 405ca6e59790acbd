"""Train/eval transforms: a small-image recipe for Fashion-MNIST, the standard ImageNet recipe otherwise."""

from __future__ import annotations

import torch
from timm.data import create_transform
from torchvision.transforms import v2


def small_image_transform(img_size: int, in_chans: int, mean, std, train: bool, crop_padding: int, hflip: float):
    """uint8 (1, 28, 28) tensor -> normalised float (in_chans, img_size, img_size)."""
    steps = [v2.ToDtype(torch.float32, scale=True), v2.Resize(img_size, antialias=True)]
    if train:
        if crop_padding:
            steps.append(v2.RandomCrop(img_size, padding=crop_padding))
        if hflip:
            steps.append(v2.RandomHorizontalFlip(hflip))
    steps.append(v2.Normalize(list(mean), list(std)))
    if in_chans != 1:
        steps.append(ExpandChannels(in_chans))
    return v2.Compose(steps)


class ExpandChannels(torch.nn.Module):
    """Repeats a grey image to ``channels`` channels (a module, so loader workers can pickle it)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(self.channels, -1, -1)


def imagenet_transform(img_size: int, mean, std, train: bool, crop_pct: float, interpolation: str,
                       color_jitter: float | None, hflip: float):
    """Standard recipe: RandomResizedCrop + flip for training; resize to img_size/crop_pct + centre crop
    for evaluation (256 -> 224 at the default crop_pct 0.875)."""
    return create_transform(
        img_size, is_training=train, mean=tuple(mean), std=tuple(std), crop_pct=crop_pct,
        interpolation=interpolation, color_jitter=color_jitter, hflip=hflip,
    )

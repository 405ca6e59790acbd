"""Datasets for classification: Fashion-MNIST (embedded default), ImageNet and any ImageFolder tree."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset, Subset

from .fashion_mnist import FashionMNIST
from .imagefolder import CheckedImageFolder, DataError, UnreadableImageError
from .sampling import EpochSeededDataset, ResumableSampler, collate_skipping_bad, loader_options, rank_loaders
from .transforms import imagenet_transform, small_image_transform

__all__ = [
    "CheckedImageFolder", "DataError", "EpochSeededDataset", "FashionMNIST", "ResumableSampler", "UnreadableImageError",
    "build_datasets", "collate_skipping_bad", "loader_options", "rank_loaders",
]


def build_datasets(cfg, seed: int = 0) -> tuple[Dataset, Dataset, int]:
    """``(train, val, num_classes)`` for a :class:`compconv.train.config.DataConfig`; train seeded per item."""
    if cfg.name == "fashion_mnist":
        def tf(train):
            return small_image_transform(cfg.img_size, cfg.in_chans, cfg.mean, cfg.std, train,
                                         cfg.crop_padding, cfg.hflip)
        train = FashionMNIST(cfg.root, "train", tf(True), cfg.train_subset)
        val = FashionMNIST(cfg.root, "val", tf(False), cfg.val_subset)
        num_classes = len(FashionMNIST.classes)
    else:
        root = Path(cfg.root)
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise FileNotFoundError(
                    f"{root / split} does not exist: data.root must hold train/ and val/ folders with one "
                    "sub-folder per class (the ImageNet ImageFolder layout)")

        def tf(train):
            return imagenet_transform(cfg.img_size, cfg.mean, cfg.std, train, cfg.crop_pct, cfg.interpolation,
                                      cfg.color_jitter, cfg.hflip)
        train = CheckedImageFolder(root / "train", tf(True), cfg.skip_bad)
        val = CheckedImageFolder(root / "val", tf(False), cfg.skip_bad)
        if train.classes != val.classes:
            raise DataError(f"class folders of {root}/train and {root}/val differ")
        num_classes = len(train.classes)
        if cfg.train_subset:
            train = Subset(train, range(min(cfg.train_subset, len(train))))
        if cfg.val_subset:
            val = Subset(val, range(min(cfg.val_subset, len(val))))
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise DataError(f"data.num_classes={cfg.num_classes} but {cfg.root} has {num_classes} classes; "
                         "set data.num_classes=null to infer it")
    return EpochSeededDataset(train, seed), val, num_classes

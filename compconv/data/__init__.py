"""Datasets for classification: Fashion-MNIST (embedded default), ImageNet and any ImageFolder tree."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torch.utils.data import Dataset, Subset

from .fashion_mnist import FashionMNIST
from .imagefolder import CheckedImageFolder, DataError, UnreadableImageError
from .sampling import EpochSeededDataset, ResumableSampler, collate_skipping_bad, loader_options, rank_loaders
from .split import stratified_holdout
from .transforms import imagenet_transform, small_image_transform

__all__ = [
    "CheckedImageFolder", "DataError", "EpochSeededDataset", "FashionMNIST", "ResumableSampler", "UnreadableImageError",
    "Splits", "build_datasets", "collate_skipping_bad", "loader_options", "rank_loaders", "stratified_holdout",
]


@dataclass
class Splits:
    """The datasets of a classification run.

    Attributes:
        train: Training items, seeded per item (:class:`EpochSeededDataset`).
        val: What every epoch evaluates: the held-out part of the training set (``data.val_split``), else the
            dataset's evaluation split.
        test: The evaluation split when ``val`` is held out (read once, after the last epoch), else None.
        num_classes: Classes of the dataset.
        description: Which images each split holds, for the summary.
    """

    train: Dataset
    val: Dataset
    test: Optional[Dataset]
    num_classes: int
    description: dict = field(default_factory=dict)


def _first(dataset: Dataset, count: Optional[int]) -> Dataset:
    return Subset(dataset, range(min(count, len(dataset)))) if count else dataset


def _targets(dataset: Dataset) -> list[int]:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise DataError(f"{type(dataset).__name__} has no targets to stratify a validation split by")
    return [int(t) for t in targets]


def _fashion_mnist(cfg) -> tuple[Dataset, Dataset, Dataset, int, str]:
    def tf(train):
        return small_image_transform(cfg.img_size, cfg.in_chans, cfg.mean, cfg.std, train, cfg.crop_padding, cfg.hflip)
    train = FashionMNIST(cfg.root, "train", tf(True))
    held_out = FashionMNIST(cfg.root, "train", tf(False)) if cfg.val_split else None
    return train, held_out, FashionMNIST(cfg.root, "val", tf(False)), len(FashionMNIST.classes), "Fashion-MNIST"


def _image_folder(cfg) -> tuple[Dataset, Dataset, Dataset, int, str]:
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
    evaluation = CheckedImageFolder(root / "val", tf(False), cfg.skip_bad)
    if train.classes != evaluation.classes:
        raise DataError(f"class folders of {root}/train and {root}/val differ")
    held_out = CheckedImageFolder(root / "train", tf(False), cfg.skip_bad) if cfg.val_split else None
    return train, held_out, evaluation, len(train.classes), str(root)


def build_datasets(cfg, seed: int = 0) -> Splits:
    """The :class:`Splits` of a :class:`compconv.train.config.DataConfig`; the training set is seeded per item."""
    train, held_out, evaluation, num_classes, name = (_fashion_mnist if cfg.name == "fashion_mnist" else
                                                      _image_folder)(cfg)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise DataError(f"data.num_classes={cfg.num_classes} but {cfg.root} has {num_classes} classes; "
                        "set data.num_classes=null to infer it")
    if not cfg.val_split:
        train, val = _first(train, cfg.train_subset), _first(evaluation, cfg.val_subset)
        return Splits(EpochSeededDataset(train, seed), val, None, num_classes,
                      {"train": f"{name} training split", "val": f"{name} evaluation split"})
    try:
        kept, held = stratified_holdout(_targets(train), cfg.val_split, cfg.split_seed)
    except ValueError as error:
        raise DataError(f"data.val_split={cfg.val_split}: {error}; the training set has {len(train)} images") from error
    train, val = _first(Subset(train, kept), cfg.train_subset), _first(Subset(held_out, held), cfg.val_subset)
    test = _first(evaluation, cfg.test_subset)
    description = {"train": f"{name} training split less the held-out images",
                   "val": f"{cfg.val_split} images held out of the training split (class-stratified, "
                          f"data.split_seed={cfg.split_seed})",
                   "test": f"{name} evaluation split, read once after the last epoch"}
    return Splits(EpochSeededDataset(train, seed), val, test, num_classes, description)

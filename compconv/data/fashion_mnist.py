"""Fashion-MNIST from the original idx files (as shipped by Debian's ``dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .imagefolder import DataError

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = (0.2860,), (0.3530,)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET = (
    "install Debian's package (apt-get install dataset-fashion-mnist, files under "
    "/usr/share/datasets/fashion-mnist) or copy the four idx files of "
    "https://github.com/zalandoresearch/fashion-mnist into a folder and set data.root to it"
)


REINSTALL = ("replace it with a good copy (apt-get install --reinstall dataset-fashion-mnist, or the file of "
             "https://github.com/zalandoresearch/fashion-mnist)")


def _open(root: Path, stem: str) -> bytes:
    for path, opener in ((root / f"{stem}.gz", gzip.open), (root / stem, open)):
        if path.is_file():
            try:
                with opener(path, "rb") as handle:
                    return handle.read()
            except (EOFError, gzip.BadGzipFile, zlib.error) as error:  # truncated or corrupt archive
                raise DataError(f"Fashion-MNIST file {path} is damaged ({error}): {REINSTALL}") from error
            except OSError as error:
                raise DataError(f"cannot read Fashion-MNIST file {path} ({error.strerror or error}): "
                                f"{REINSTALL}, or fix its permissions") from error
    raise FileNotFoundError(f"Fashion-MNIST file {stem}(.gz) not found in {root}: {HOW_TO_GET}")


def read_idx(data: bytes, name: str = "idx") -> np.ndarray:
    """Parses an idx file (big-endian header: magic, dims) into a uint8 array."""
    if len(data) < 4:
        raise DataError(f"{name} is not an idx file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{name} is not an idx file of uint8 (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{name} is truncated: header says {shape}, found {body.size} values; {REINSTALL}")
    return body.reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST held in memory as uint8; items are ``(1x28x28 uint8 tensor, label)`` before ``transform``.

    Args:
        root: Folder with the idx files (gzipped or not).
        split: ``"train"`` (60k) or ``"val"`` (the 10k test set).
        transform: Applied to the uint8 image tensor.
        subset: Keep only the first ``subset`` items (for quick runs and tests).
    """

    classes = CLASSES

    def __init__(self, root: str | Path, split: str = "train", transform=None, subset: int | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST root {root} does not exist: {HOW_TO_GET}")
        if split not in _FILES:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        images_stem, labels_stem = _FILES[split]
        images = read_idx(_open(root, images_stem), str(root / images_stem))
        labels = read_idx(_open(root, labels_stem), str(root / labels_stem))
        if len(images) != len(labels):
            raise DataError(f"{root}: {len(images)} images but {len(labels)} labels")
        if subset is not None:
            images, labels = images[:subset], labels[:subset]
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

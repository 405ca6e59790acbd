"""ImageFolder datasets (ImageNet layout) with a clear error, or skip-and-count, for unreadable images."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torchvision.datasets import ImageFolder


class DataError(ValueError):
    """A dataset on disk is missing pieces or malformed; the message says what to fix."""


class UnreadableImageError(DataError):
    pass


class CheckedImageFolder(ImageFolder):
    """``ImageFolder`` whose unreadable files raise an error naming the file; with ``skip_bad=True`` they come back
    as ``None`` and :func:`collate_skipping_bad` drops and counts them.
    """

    def __init__(self, root: str | Path, transform=None, skip_bad: bool = False) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist (expected <root>/<class>/<image> files)")
        super().__init__(str(root), transform=transform)
        self.skip_bad = skip_bad

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            with open(path, "rb") as handle, Image.open(handle) as img:
                image = img.convert("RGB")
        except Exception as error:  # PIL raises many types for corrupt files
            if self.skip_bad:
                return None
            raise UnreadableImageError(
                f"cannot read image {path}: {error}. Remove or replace the file, or set data.skip_bad=true "
                "to skip and count unreadable images"
            ) from error
        if self.transform is not None:
            image = self.transform(image)
        return image, target

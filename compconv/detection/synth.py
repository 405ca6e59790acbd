"""A small real detection set: Fashion-MNIST items placed on larger canvases (fixed seed), written in COCO
format with the tight box of each item's visible pixels; a few images are left empty, as in COCO.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..data.fashion_mnist import CLASSES, FashionMNIST
from ..data.split import stratified_holdout
from ..io import atomic_write_text


def _place(rng: np.random.Generator, canvas: np.ndarray, item: np.ndarray, boxes: list) -> list[float] | None:
    size = int(rng.integers(28, 57))
    patch = np.asarray(Image.fromarray(item).resize((size, size), Image.BILINEAR))
    side = canvas.shape[0]
    for _ in range(20):  # a spot that overlaps earlier boxes little
        x, y = (int(v) for v in rng.integers(0, side - size + 1, size=2))
        if all(_iou((x, y, x + size, y + size), b) < 0.2 for b in boxes):
            break
    else:
        return None
    np.maximum(canvas[y:y + size, x:x + size], patch, out=canvas[y:y + size, x:x + size])
    ys, xs = np.nonzero(patch > 20)
    if len(xs) == 0:
        return None
    return [float(x + xs.min()), float(y + ys.min()), float(x + xs.max() + 1), float(y + ys.max() + 1)]


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def write_split(source: FashionMNIST, images_dir: Path, ann_file: Path, count: int, canvas: int, seed: int,
                max_items: int = 4, empty_fraction: float = 0.05, items: Sequence[int] | None = None) -> dict:
    """Writes ``count`` canvases of ``source``'s items (only those of ``items``, if given) and their COCO json."""
    rng = np.random.default_rng(seed)
    pool = np.arange(len(source)) if items is None else np.asarray(items)
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        pixels = np.zeros((canvas, canvas), dtype=np.uint8)
        boxes, labels = [], []
        placed = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_items + 1))
        for _ in range(placed):
            index = int(pool[int(rng.integers(len(pool)))])
            box = _place(rng, pixels, source.images[index, 0].numpy(), boxes)
            if box is not None:
                boxes.append(box)
                labels.append(int(source.targets[index]) + 1)
        name = f"{image_id:06d}.jpg"
        Image.fromarray(pixels).convert("RGB").save(images_dir / name, quality=95)
        images.append({"id": image_id, "file_name": name, "width": canvas, "height": canvas})
        for box, label in zip(boxes, labels):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)],
            "info": {"description": f"Fashion-MNIST items on {canvas}x{canvas} canvases, seed {seed}"}}
    atomic_write_text(ann_file, json.dumps(coco))
    return coco


def write_fmnist_detection(root: str | Path, fmnist_root: str | Path = "/usr/share/datasets/fashion-mnist",
                           train_images: int = 400, val_images: int = 100, test_images: int = 0, canvas: int = 128,
                           seed: int = 0, val_items: int = 10000) -> Path:
    """Writes ``root/{train2017,val2017}/*.jpg`` and ``root/annotations/instances_{train,val}2017.json``, and with
    ``test_images`` also ``root/test2017`` and ``instances_test2017.json``.

    With a test split, the validation canvases take ``val_items`` Fashion-MNIST training items held out of the
    training canvases (class-stratified, ``seed``) and the test canvases take the test items, so choices made on
    validation never see a test item; without one (the small default set), validation canvases take the test items.
    ``root/generate.json`` records the arguments, so a set written with others is rewritten, not reused.
    """
    root = Path(root)
    train_source = FashionMNIST(fmnist_root, "train")
    train_items, val_source, val_items_list = None, FashionMNIST(fmnist_root, "val"), None
    if test_images:
        train_items, val_items_list = stratified_holdout(train_source.targets.tolist(), val_items, seed)
        val_source = train_source
    write_split(train_source, root / "train2017", root / "annotations/instances_train2017.json", train_images, canvas,
                seed, items=train_items)
    write_split(val_source, root / "val2017", root / "annotations/instances_val2017.json", val_images, canvas,
                seed + 1, items=val_items_list)
    if test_images:
        write_split(FashionMNIST(fmnist_root, "val"), root / "test2017", root / "annotations/instances_test2017.json",
                    test_images, canvas, seed + 2)
    atomic_write_text(root / "generate.json", json.dumps(generation_record(train_images, val_images, test_images,
                                                                           canvas, seed, val_items)))
    return root


def generation_record(train_images: int = 400, val_images: int = 100, test_images: int = 0, canvas: int = 128,
                      seed: int = 0, val_items: int = 10000, **_) -> dict:
    """What :func:`write_fmnist_detection` was asked for (``fmnist_root`` aside): a set is reused only if it matches."""
    return {"train_images": train_images, "val_images": val_images, "test_images": test_images, "canvas": canvas,
            "seed": seed, "val_items": val_items if test_images else None}

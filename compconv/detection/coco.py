"""COCO-format detection data (pycocotools) and COCOeval bbox metrics."""

from __future__ import annotations

import contextlib
import io
import json
import random
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from ..data.imagefolder import DataError, UnreadableImageError

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
SIZE_METRICS = ("APs", "APm", "APl")


def load_coco(ann_file: str | Path):
    """pycocotools ``COCO`` for ``ann_file``, with clear errors for a missing or malformed file."""
    from pycocotools.coco import COCO

    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file {ann_file} does not exist (expected the COCO layout: "
                                "<root>/annotations/instances_<split>.json)")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"annotation file {ann_file} is not valid JSON ({error}): replace it with a complete copy "
                        "(a truncated download or copy reads like this)") from error
    except OSError as error:
        raise DataError(f"cannot read annotation file {ann_file} ({error.strerror or error}): fix its permissions "
                        "or the filesystem, or replace it") from error
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if not isinstance(data, dict) or missing:
        raise DataError(f"annotation file {ann_file} lacks {missing or 'a top-level object'}: not COCO instances json")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _valid_boxes(anns: list[dict], width: int, height: int) -> tuple[list[list[float]], list[int]]:
    """Non-crowd boxes as clipped xyxy, dropping degenerate ones (as torchvision's references do)."""
    boxes, categories = [], []
    for ann in anns:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        x1, y1 = max(0.0, x), max(0.0, y)
        x2, y2 = min(float(width), x + w), min(float(height), y + h)
        if x2 > x1 and y2 > y1:
            boxes.append([x1, y1, x2, y2])
            categories.append(ann["category_id"])
    return boxes, categories


class CocoDetection(Dataset):
    """Images and Faster R-CNN targets from a COCO instances json. Labels are contiguous 1..K in category-id order
    (``category_ids`` maps back); ``remove_empty=True`` drops images without a usable box, as torchvision does.
    """

    def __init__(self, image_dir: str | Path, ann_file: str | Path, train: bool, hflip: float = 0.5,
                 in_chans: int = 3, subset: int | None = None, skip_bad: bool = False) -> None:
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder {self.image_dir} does not exist (COCO layout: <root>/train2017/)")
        self.coco = load_coco(ann_file)
        self.category_ids = sorted(self.coco.getCatIds())
        self.label_of = {cat: i + 1 for i, cat in enumerate(self.category_ids)}
        ids = sorted(self.coco.imgs)
        if train:
            ids = [i for i in ids if _valid_boxes(self.coco.imgToAnns.get(i, []), self.coco.imgs[i]["width"],
                                                  self.coco.imgs[i]["height"])[0]]
        self.ids = ids[:subset] if subset else ids
        self.train, self.hflip, self.in_chans, self.skip_bad = train, hflip, in_chans, skip_bad

    @property
    def num_classes(self) -> int:
        """Foreground classes + 1 (background)."""
        return len(self.category_ids) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB" if self.in_chans == 3 else "L")
        except Exception as error:
            if self.skip_bad:
                return None
            raise UnreadableImageError(f"cannot read image {path}: {error}. Remove or replace it, or set "
                                       "data.skip_bad=true") from error
        boxes, categories = _valid_boxes(self.coco.imgToAnns.get(image_id, []), img.width, img.height)
        image = TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self.label_of[c] for c in categories], dtype=torch.int64),
            "image_id": image_id,
        }
        if self.train and self.hflip and random.random() < self.hflip:
            image = image.flip(-1)
            width = image.shape[-1]
            target["boxes"] = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + \
                torch.tensor([width, 0, width, 0])
        return image, target


def collate_detection(batch: list):
    """Lists of images and targets, dropping (and counting) unreadable items."""
    good = [item for item in batch if item is not None]
    images = [item[0] for item in good]
    targets = [item[1] for item in good]
    return images, targets, len(batch) - len(good)


def coco_results(outputs: list[dict], targets: list[dict], category_ids: list[int]) -> list[dict]:
    """Detections in the COCO results format (xywh boxes, original category ids)."""
    results = []
    for output, target in zip(outputs, targets):
        boxes = output["boxes"].float().cpu()
        boxes[:, 2:] -= boxes[:, :2]
        for box, score, label in zip(boxes.tolist(), output["scores"].tolist(), output["labels"].tolist()):
            results.append({"image_id": target["image_id"], "category_id": category_ids[label - 1],
                            "bbox": [round(v, 3) for v in box], "score": round(score, 5)})
    return results


def evaluate_bbox(coco, results: list[dict], image_ids: list[int], evaluator: str = "auto") -> dict[str, float]:
    """COCOeval bbox metrics (AP, AP50, AP75, APs, APm, APl, %) on ``image_ids``; ``evaluator``: ``pycocotools``,
    ``faster_coco_eval`` or ``auto`` (the latter when installed). A size range without ground truth has None.
    """
    if not results:
        return {name: 0.0 for name in METRIC_NAMES}
    cocoeval_cls = None
    if evaluator in ("auto", "faster_coco_eval"):
        try:
            from faster_coco_eval.core.cocoeval import COCOeval_faster as cocoeval_cls  # noqa: N813
        except ImportError:
            if evaluator == "faster_coco_eval":
                raise
    if cocoeval_cls is None:
        from pycocotools.cocoeval import COCOeval as cocoeval_cls  # noqa: N813
    with contextlib.redirect_stdout(io.StringIO()):
        detections = coco.loadRes(results)
        evaluation = cocoeval_cls(coco, detections, "bbox")
        evaluation.params.imgIds = list(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # COCOeval's -1: no ground truth in that size range (APl of small images), so no AP, not an AP of 0
    return {name: None if v < 0 and name in SIZE_METRICS else max(0.0, 100 * float(v))
            for name, v in zip(METRIC_NAMES, evaluation.stats[:6])}

"""Detection / instance-segmentation dataset over any ``DetectionSet`` (COCO, VIA, YOLO), with
box- and mask-aware augmentation (albumentations).

Crowd regions are left out of the training targets. Degenerate boxes (no area once clipped to the
image) are dropped, and images left without objects are kept as negatives: nothing here crashes on
them. Augmentation randomness comes from numpy's global generator (the trainer seeds it per item).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from detseg.data.coco import Annotation, DetectionSet, ImageRecord
from detseg.data.convert import read_dataset
from detseg.data.images import read_image
from detseg.data.preprocess import Preprocess
from detseg.errors import InputFileError
from detseg.ops.masks import segmentation_to_mask

Target = dict[str, Any]


def detection_transform(
    train: bool,
    max_size: int | None = 1024,
    scale_jitter: tuple[float, float] = (0.75, 1.0),
    hflip: bool = True,
    color: bool = True,
) -> A.Compose:
    """Resize so the longest side is ``max_size`` (eval), or a random size in
    ``max_size * scale_jitter`` on a 32-pixel grid (train), then horizontal flip and colour jitter
    (train). Boxes are ``pascal_voc`` (xyxy pixels) with ``labels`` and ``index`` fields; masks follow.
    """
    steps: list[Any] = []
    if max_size is not None:
        sizes: list[int] = [max_size]
        if train:
            lo, hi = (int(round(max_size * s / 32)) for s in scale_jitter)
            sizes = sorted({max(32, 32 * k) for k in range(lo, hi + 1)}) or [max_size]
        steps.append(A.LongestMaxSize(max_size=sizes if len(sizes) > 1 else sizes[0]))
    if train and hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if train and color:
        steps.append(A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5))
    bbox_params = A.BboxParams(
        format="pascal_voc",
        label_fields=["labels", "index"],
        clip=True,
        min_width=1.0,
        min_height=1.0,
        filter_invalid_bboxes=True,
    )
    return A.Compose(steps, bbox_params=bbox_params)


def _valid_objects(record: ImageRecord) -> list[Annotation]:
    """Non-crowd objects whose box keeps a positive area once clipped to the image."""
    w, h = record.width, record.height
    keep = []
    for a in record.annotations:
        x1, y1, x2, y2 = np.clip(a.box, 0, [w, h, w, h])
        if not a.iscrowd and x2 > x1 and y2 > y1:
            keep.append(a)
    return keep


def _object_mask(a: Annotation, h: int, w: int) -> np.ndarray:
    if a.segmentation is not None:
        return segmentation_to_mask(a.segmentation, h, w)
    mask = np.zeros((h, w), np.uint8)  # a box-only object in a mask dataset: its box as mask
    x1, y1, x2, y2 = np.round(np.clip(a.box, 0, [w, h, w, h])).astype(int)
    mask[y1:y2, x1:x2] = 1
    return mask


class DetectionDataset(Dataset):
    """Items ``(image, target)``.

    ``image``: (3, H, W) float32 network input (``preprocess`` of the augmented uint8 image).
    ``target``:
        ``boxes``: (N, 4) float32 xyxy pixels of the transformed image;
        ``labels``: (N,) int64 contiguous labels;
        ``image_id``: int (the dataset's image id, for COCO evaluation);
        ``orig_size``: (H0, W0) of the file; ``size``: (H, W) after the transform;
        ``masks``: (N, H, W) uint8, only with ``masks=True``.
    N may be 0 (a negative image).

    Args:
        source: a ``DetectionSet`` or anything ``read_dataset`` reads (COCO JSON, VIA, YOLO folder).
        train: augment (scale jitter, flip, colour) instead of a fixed resize.
        max_size: longest side after resizing (None: keep the file's size).
        masks: also return instance masks.
        preprocess: input normalisation.
        class_name: the class of VIA regions without a class attribute.
    """

    def __init__(
        self,
        source: DetectionSet | str | Path,
        train: bool = False,
        max_size: int | None = 1024,
        masks: bool = False,
        preprocess: Preprocess | None = None,
        class_name: str = "object",
    ) -> None:
        self.dataset = (
            source if isinstance(source, DetectionSet) else read_dataset(source, class_name)
        )
        self.masks = masks
        self.preprocess = preprocess or Preprocess()
        self.transform = detection_transform(train, max_size)
        for record in self.dataset.images:
            if not record.path.is_file():
                raise InputFileError(
                    f"{self.dataset.source}: image id {record.id} ({record.file_name}): "
                    f"{record.path} not found; check the image folder."
                )

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.dataset.class_names

    def __len__(self) -> int:
        return len(self.dataset.images)

    def _read(self, record: ImageRecord) -> np.ndarray:
        image = read_image(record.path)
        if image.shape[:2] != (record.height, record.width):
            raise InputFileError(
                f"{self.dataset.source}: image id {record.id} ({record.file_name}) is "
                f"{image.shape[1]}x{image.shape[0]} but the annotations say "
                f"{record.width}x{record.height}; fix the width/height entries."
            )
        return image

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        record = self.dataset.images[i]
        image = self._read(record)
        objects = _valid_objects(record)
        data: dict[str, Any] = {
            "image": image,
            "bboxes": np.array([a.box for a in objects], np.float32).reshape(-1, 4),
            "labels": np.array([a.label for a in objects], np.int64),
            "index": np.arange(len(objects)),
        }
        if self.masks:
            data["masks"] = [_object_mask(a, record.height, record.width) for a in objects]
        self.transform.set_random_seed(int(np.random.randint(0, 2**31 - 1)))
        out = self.transform(**data)
        h, w = out["image"].shape[:2]
        kept = np.asarray(out["index"], np.int64)
        target: Target = {
            "boxes": torch.as_tensor(np.asarray(out["bboxes"], np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor(np.asarray(out["labels"], np.int64).reshape(-1)),
            "image_id": record.id,
            "orig_size": (record.height, record.width),
            "size": (h, w),
        }
        if self.masks:
            stack = [out["masks"][k] for k in kept]
            masks = np.stack(stack) if stack else np.zeros((0, h, w), np.uint8)
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))
        return self.preprocess(out["image"]), target

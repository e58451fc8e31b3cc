"""COCO instances JSON, and the in-memory detection dataset every reader (COCO, VIA, YOLO) produces.

COCO category ids are arbitrary (1..90 with gaps in COCO itself); models use contiguous labels
``0..K-1`` in the order of ``categories`` sorted by id. ``DetectionSet`` keeps both and maps between
them. Boxes are xyxy pixels inside detseg; COCO's xywh exists only in the JSON read and written here.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detseg.errors import InputFileError
from detseg.fileio import write_text_atomic
from detseg.ops.masks import Segmentation, rle_area, rle_to_box, segmentation_to_rle


@dataclass(frozen=True)
class Category:
    """A dataset category: its id in the files (any int) and its name."""

    id: int
    name: str
    supercategory: str = ""


@dataclass
class Annotation:
    """One object.

    Attributes:
        box: (4,) float64 xyxy in image pixels (may be degenerate: width or height <= 0).
        label: contiguous class index ``0..K-1``.
        segmentation: COCO polygons or RLE, or None (boxes only).
        iscrowd: a COCO crowd region (ignored in training targets and matched as "ignore" by COCOeval).
        area: COCO ``area`` (mask area when there is a mask).
        id: annotation id, unique in the dataset.
    """

    box: np.ndarray
    label: int
    segmentation: Segmentation | None = None
    iscrowd: bool = False
    area: float = 0.0
    id: int = 0


@dataclass
class ImageRecord:
    """One image and its objects (``annotations`` may be empty: a negative image)."""

    id: int
    file_name: str
    path: Path
    width: int
    height: int
    annotations: list[Annotation] = field(default_factory=list)


@dataclass
class DetectionSet:
    """Images with boxes (and optionally masks) and their categories.

    Attributes:
        images: the images, in file order.
        categories: sorted by id; the position is the contiguous label.
        source: the file or folder it was read from (for error messages).
    """

    images: list[ImageRecord]
    categories: list[Category]
    source: Path

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.categories)

    @property
    def category_ids(self) -> list[int]:
        """Category id of each contiguous label."""
        return [c.id for c in self.categories]

    def label_of(self, category_id: int) -> int:
        """Contiguous label of a category id (``KeyError`` when absent)."""
        return {c.id: i for i, c in enumerate(self.categories)}[category_id]

    def has_masks(self) -> bool:
        return any(a.segmentation is not None for im in self.images for a in im.annotations)

    def to_coco(self, relative_to: Path | None = None) -> dict[str, Any]:
        """The COCO instances dict (also the ground truth the evaluator takes).

        ``file_name`` is made relative to ``relative_to`` when given (where the JSON will live).
        """
        images, annotations = [], []
        ids = _annotation_ids(self.images)
        for im in self.images:
            name = im.file_name
            if relative_to is not None:
                name = os.path.relpath(im.path.resolve(), relative_to)
            images.append({"id": im.id, "file_name": name, "width": im.width, "height": im.height})
            for a in im.annotations:
                cat = self.category_ids[a.label]
                annotations.append(_annotation_json(a, im, next(ids), cat))
        categories = [
            {"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in self.categories
        ]
        return {"images": images, "annotations": annotations, "categories": categories}


def _annotation_ids(images: list[ImageRecord]) -> Iterator[int]:
    """The annotations' own ids when they are positive and unique, else 1, 2, ... in order."""
    own = [a.id for im in images for a in im.annotations]
    if all(i > 0 for i in own) and len(set(own)) == len(own):
        return iter(own)
    return itertools.count(1)


def _annotation_json(a: Annotation, im: ImageRecord, ann_id: int, category_id: int) -> dict:
    x1, y1, x2, y2 = (float(v) for v in a.box)
    out: dict[str, Any] = {
        "id": ann_id,
        "image_id": im.id,
        "category_id": category_id,
        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
        "area": float(a.area if a.area > 0 else max(x2 - x1, 0.0) * max(y2 - y1, 0.0)),
        "iscrowd": int(a.iscrowd),
    }
    if a.segmentation is not None:
        out["segmentation"] = a.segmentation
    return out


def load_json(path: str | Path) -> Any:
    """Parse a JSON file; ``InputFileError`` naming the file and position when it is malformed."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise InputFileError(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); "
            "fix or re-export the file."
        ) from exc
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{path}: not a UTF-8 text file ({exc.reason}).") from exc


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise InputFileError(f"{path}: {what}")


def _find_image_root(path: Path, images: list[dict]) -> Path:
    """Where ``file_name`` is relative to: beside the JSON, or ``images/`` beside or above it."""
    candidates = [path.parent, path.parent / "images", path.parent.parent / "images"]
    if images:
        for root in candidates:
            if (root / images[0]["file_name"]).exists():
                return root
    return path.parent


def _parse_categories(raw: Any, path: Path) -> list[Category]:
    _require(isinstance(raw, list), path, '"categories" must be a list of {"id", "name"} objects.')
    cats = []
    for i, c in enumerate(raw):
        ok = isinstance(c, dict) and isinstance(c.get("id"), int) and "name" in c
        _require(ok, path, f'categories[{i}] must be an object with an integer "id" and a "name".')
        cats.append(Category(int(c["id"]), str(c["name"]), str(c.get("supercategory", ""))))
    ids = [c.id for c in cats]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    _require(not dup, path, f"category ids {dup} appear more than once in categories.")
    return sorted(cats, key=lambda c: c.id)


def _parse_image(raw: Any, index: int, path: Path, root: Path) -> ImageRecord:
    keys = ("id", "file_name", "width", "height")
    ok = isinstance(raw, dict) and all(k in raw for k in keys)
    _require(ok, path, f"images[{index}] must have {', '.join(keys)}.")
    w, h = raw["width"], raw["height"]
    _require(
        isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0,
        path,
        f"images[{index}] (id {raw['id']}) has size {w}x{h}; width and height must be positive integers.",
    )
    return ImageRecord(int(raw["id"]), str(raw["file_name"]), root / raw["file_name"], w, h)


def _parse_segmentation(seg: Any, where: str, path: Path) -> Segmentation | None:
    if seg is None or seg == []:
        return None
    if isinstance(seg, dict):
        ok = "counts" in seg and isinstance(seg.get("size"), list) and len(seg["size"]) == 2
        _require(ok, path, f'{where}: an RLE segmentation needs "counts" and "size": [h, w].')
        return seg
    ok = isinstance(seg, list) and all(isinstance(p, list) and len(p) % 2 == 0 for p in seg)
    _require(ok, path, f"{where}: segmentation must be polygons [[x1, y1, ...], ...] or an RLE.")
    return seg


def _parse_annotation(
    raw: Any, index: int, path: Path, images: dict[int, ImageRecord], labels: dict[int, int]
) -> tuple[int, Annotation]:
    _require(isinstance(raw, dict), path, f"annotations[{index}] is not an object.")
    where = f"annotations[{index}] (id {raw.get('id')}, image_id {raw.get('image_id')})"
    _require(raw.get("image_id") in images, path, f"{where}: image_id is not in images.")
    cat = raw.get("category_id")
    _require(
        cat in labels,
        path,
        f"{where}: category_id {cat} is not in categories (ids {sorted(labels)}); "
        "add the category or fix the annotation.",
    )
    im = images[raw["image_id"]]
    seg = _parse_segmentation(raw.get("segmentation"), where, path)
    bbox = raw.get("bbox")
    if bbox is None and seg is not None:
        box = rle_to_box(segmentation_to_rle(seg, im.height, im.width))
    else:
        ok = isinstance(bbox, list) and len(bbox) == 4
        ok = ok and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
        _require(ok, path, f"{where}: bbox must be [x, y, width, height] of finite numbers.")
        x, y, w, h = (float(v) for v in bbox)
        box = np.array([x, y, x + w, y + h], dtype=np.float64)
    area = raw.get("area")
    if area is None:
        area = rle_area(segmentation_to_rle(seg, im.height, im.width)) if seg else 0.0
    ann = Annotation(
        box=box,
        label=labels[cat],
        segmentation=seg,
        iscrowd=bool(raw.get("iscrowd", 0)),
        area=float(area),
        id=int(raw.get("id", 0)),
    )
    return im.id, ann


def parse_coco(data: Any, path: Path, image_root: Path | None = None) -> DetectionSet:
    """A parsed COCO instances dict -> ``DetectionSet`` (``path`` names the file in errors)."""
    _require(isinstance(data, dict), path, "a COCO instances file must hold a JSON object.")
    for key in ("images", "categories"):
        _require(key in data, path, f'the "{key}" list is missing; is this a COCO instances file?')
    raw_images = data["images"]
    _require(isinstance(raw_images, list), path, '"images" must be a list.')
    root = image_root if image_root is not None else _find_image_root(path, raw_images)
    categories = _parse_categories(data["categories"], path)
    labels = {c.id: i for i, c in enumerate(categories)}
    records = [_parse_image(r, i, path, root) for i, r in enumerate(raw_images)]
    by_id = {r.id: r for r in records}
    _require(len(by_id) == len(records), path, "image ids appear more than once in images.")
    raw_anns = data.get("annotations", [])
    _require(isinstance(raw_anns, list), path, '"annotations" must be a list.')
    for i, raw in enumerate(raw_anns):
        image_id, ann = _parse_annotation(raw, i, path, by_id, labels)
        by_id[image_id].annotations.append(ann)
    return DetectionSet(records, categories, path)


def read_coco(path: str | Path, image_root: str | Path | None = None) -> DetectionSet:
    """Read a COCO instances JSON (polygons or RLE, crowd flags, any category ids).

    Args:
        path: the JSON file.
        image_root: folder ``file_name`` is relative to; by default the first of the JSON's folder,
            ``images/`` beside it, or ``../images`` that holds the first image.

    Raises:
        InputFileError: malformed JSON, a missing key, an annotation whose ``category_id`` or
            ``image_id`` is unknown, a bad box or segmentation (naming the file and the entry).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else None
    return parse_coco(load_json(path), path, root)


def write_coco(dataset: DetectionSet, path: str | Path) -> None:
    """Write ``dataset`` as a COCO instances JSON (atomically), image paths relative to its folder."""
    path = Path(path)
    coco = dataset.to_coco(relative_to=path.parent.resolve())
    write_text_atomic(path, json.dumps(coco, separators=(",", ":")))

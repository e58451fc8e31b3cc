"""Tiny synthetic detection data: noisy dark images, each with one bright square (class "square")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from detseg.data.coco import Annotation, Category, DetectionSet, ImageRecord, write_coco
from detseg.data.images import write_image

SIZE = 96
# HOG settings for 96-px images: 24-px window (16-px object), 4-px cells, no resizing.
SMALL_HOG = {"window": (6, 6), "pixels_per_cell": 4, "max_size": None, "scale_step": 1.25}


def square_image(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A noisy dark (size, size, 3) uint8 image with one bright square; its (4,) xyxy box."""
    image = rng.normal(50, 12, (size, size, 3)).clip(0, 255)
    side = int(rng.integers(18, 34))
    x, y = (int(v) for v in rng.integers(2, size - side - 2, 2))
    image[y : y + side, x : x + side] = rng.normal(210, 12, (side, side, 3)).clip(0, 255)
    return image.astype(np.uint8), np.array([x, y, x + side, y + side], np.float64)


def square_dataset(folder: Path, n: int, seed: int) -> DetectionSet:
    """``n`` square images written as PNGs into ``folder``, as a one-class ``DetectionSet``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        image, box = square_image(rng)
        path = folder / f"{i}.png"
        write_image(path, image)
        records.append(ImageRecord(i + 1, path.name, path, SIZE, SIZE, [Annotation(box, 0)]))
    return DetectionSet(records, [Category(1, "square")], folder)


def write_via(dataset: DetectionSet) -> Path:
    """The dataset's boxes as rectangle polygons in ``via_region_data.json`` beside its images."""
    entries = {}
    for r in dataset.images:
        regions = {}
        for k, a in enumerate(r.annotations):
            x1, y1, x2, y2 = (int(v) for v in a.box)
            shape = {
                "name": "polygon",
                "all_points_x": [x1, x2, x2, x1],
                "all_points_y": [y1, y1, y2, y2],
            }
            regions[str(k)] = {"shape_attributes": shape, "region_attributes": {}}
        entries[r.file_name] = {"filename": r.file_name, "regions": regions, "file_attributes": {}}
    path = dataset.source / "via_region_data.json"
    path.write_text(json.dumps(entries))
    return path


def write_coco_file(dataset: DetectionSet, path: Path) -> Path:
    write_coco(dataset, path)
    return path

"""VGG Image Annotator (VIA) polygon JSON: the 1.x region export (``via_region_data.json``) and
2.x project files (``_via_img_metadata``), as used by the balloon dataset.

Images are found by the entry's ``filename`` (not by parsing its key, which also holds the byte
size and can be stale). VIA does not store image sizes, so each image header is read once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from detseg.data.coco import Annotation, Category, DetectionSet, ImageRecord, load_json
from detseg.data.images import image_size
from detseg.errors import InputFileError
from detseg.ops.masks import rle_area, segmentation_to_rle


def _regions(entry: dict, path: Path, key: str) -> list[dict]:
    regions = entry.get("regions", [])
    if isinstance(regions, dict):
        return list(regions.values())
    if isinstance(regions, list):
        return regions
    raise InputFileError(f'{path}: entry "{key}": "regions" must be a dict or a list.')


def _shape_polygon(shape: Any, path: Path, where: str) -> list[float]:
    """A VIA shape -> one COCO polygon ``[x1, y1, ...]`` (rectangles become 4 corners)."""
    name = shape.get("name") if isinstance(shape, dict) else None
    if name in ("polygon", "polyline"):
        xs, ys = shape.get("all_points_x"), shape.get("all_points_y")
        if not (isinstance(xs, list) and isinstance(ys, list) and len(xs) == len(ys) >= 3):
            raise InputFileError(
                f"{path}: {where}: a polygon needs all_points_x and all_points_y of equal length >= 3."
            )
        return [float(v) for xy in zip(xs, ys, strict=True) for v in xy]
    if name == "rect":
        x, y, w, h = (float(shape[k]) for k in ("x", "y", "width", "height"))
        return [x, y, x + w, y, x + w, y + h, x, y + h]
    raise InputFileError(
        f"{path}: {where}: shape {name!r} is not supported (polygon, polyline or rect); "
        "convert it in VIA or remove the region."
    )


def _class_of(region: dict, class_key: str | None, default: str) -> str:
    if class_key is None:
        return default
    value = region.get("region_attributes", {}).get(class_key, default)
    if isinstance(value, dict):  # VIA 2 checkbox attributes: {"balloon": true}
        value = next((k for k, v in value.items() if v), default)
    return str(value) or default


def read_via(
    path: str | Path, class_name: str = "object", class_key: str | None = None
) -> DetectionSet:
    """Read a VIA region JSON into a ``DetectionSet`` with polygon masks.

    Args:
        path: ``via_region_data.json`` (images beside it).
        class_name: the category of every region when ``class_key`` is None (or the attribute is
            missing).
        class_key: a ``region_attributes`` key holding each region's class name.

    Raises:
        InputFileError: malformed JSON, an image that is missing, an unsupported shape.
    """
    path = Path(path)
    data = load_json(path)
    if isinstance(data, dict) and "_via_img_metadata" in data:
        data = data["_via_img_metadata"]
    if not isinstance(data, dict):
        raise InputFileError(f"{path}: a VIA region file must hold a JSON object of entries.")
    names: dict[str, int] = {}
    records = []
    for image_id, (key, entry) in enumerate(data.items(), start=1):
        if not isinstance(entry, dict) or "filename" not in entry:
            raise InputFileError(f'{path}: entry "{key}" has no "filename".')
        image_path = path.parent / entry["filename"]
        if not image_path.is_file():
            raise InputFileError(
                f'{path}: entry "{key}": image {image_path} not found; put the images beside the JSON.'
            )
        w, h = image_size(image_path)
        record = ImageRecord(image_id, entry["filename"], image_path, w, h)
        for r, region in enumerate(_regions(entry, path, key)):
            where = f'entry "{key}" region {r}'
            poly = _shape_polygon(region.get("shape_attributes"), path, where)
            label = names.setdefault(_class_of(region, class_key, class_name), len(names))
            xs, ys = np.asarray(poly[0::2]), np.asarray(poly[1::2])
            record.annotations.append(
                Annotation(
                    box=np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64),
                    label=label,
                    segmentation=[poly],
                    area=float(rle_area(segmentation_to_rle([poly], h, w))),
                )
            )
        records.append(record)
    categories = [Category(i + 1, n) for n, i in names.items()] or [Category(1, class_name)]
    return DetectionSet(records, categories, path)

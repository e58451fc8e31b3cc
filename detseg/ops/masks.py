"""Instance masks in the three COCO forms: polygons, binary masks and run-length encodings (RLE).

All conversions go through ``pycocotools.mask``, the reference implementation the COCO evaluator uses,
so that a mask rasterised here has exactly the area and box COCOeval computes.

Conventions:
    polygons: ``list[list[float]]``, each ``[x1, y1, x2, y2, ...]`` in pixels (COCO ``segmentation``).
    mask: (H, W) uint8 or bool, 1 inside.
    RLE: ``{"size": [H, W], "counts": str}`` (compressed, as in result files) or
        ``{"size": [H, W], "counts": [int, ...]}`` (uncompressed, column-major runs starting with zeros,
        as COCO stores crowd regions).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

Polygons = list[list[float]]
RLE = dict[str, Any]
Segmentation = Polygons | RLE


def _compressed(rle: RLE) -> RLE:
    """The compressed form pycocotools' C functions accept (bytes counts)."""
    counts = rle["counts"]
    h, w = (int(v) for v in rle["size"])
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    if isinstance(counts, str):
        return {"size": [h, w], "counts": counts.encode("ascii")}
    return {"size": [h, w], "counts": counts}


def _jsonable(rle: RLE) -> RLE:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


def polygons_to_rle(polygons: Polygons, height: int, width: int) -> RLE:
    """Rasterise COCO polygons (merged into one region) -> compressed RLE with ``str`` counts."""
    valid = [list(map(float, p)) for p in polygons if len(p) >= 6]
    if not valid:
        return mask_to_rle(np.zeros((height, width), np.uint8))
    rles = mask_utils.frPyObjects(valid, height, width)
    return _jsonable(mask_utils.merge(rles))


def segmentation_to_rle(segmentation: Segmentation, height: int, width: int) -> RLE:
    """Polygons or an RLE (either form) -> compressed RLE with ``str`` counts."""
    if isinstance(segmentation, dict):
        return _jsonable(_compressed(segmentation))
    return polygons_to_rle(segmentation, height, width)


def rle_to_mask(rle: RLE) -> np.ndarray:
    """RLE (either form) -> (H, W) uint8 mask."""
    return np.ascontiguousarray(mask_utils.decode(_compressed(rle)), dtype=np.uint8)


def mask_to_rle(mask: np.ndarray) -> RLE:
    """(H, W) bool/uint8 mask -> compressed RLE with ``str`` counts."""
    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    return _jsonable(mask_utils.encode(m))


def rle_to_uncompressed(rle: RLE) -> RLE:
    """RLE (either form) -> ``{"size", "counts": [int, ...]}`` column-major runs starting with zeros."""
    flat = rle_to_mask(rle).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0, *runs]
    return {"size": [int(v) for v in rle["size"]], "counts": runs}


def rle_area(rle: RLE) -> int:
    """Number of foreground pixels."""
    return int(mask_utils.area(_compressed(rle)))


def rle_to_box(rle: RLE) -> np.ndarray:
    """(4,) float64 xyxy extent of the mask in pixels (zeros for an empty mask)."""
    x, y, w, h = mask_utils.toBbox(_compressed(rle)).tolist()
    return np.array([x, y, x + w, y + h], dtype=np.float64)


def mask_to_polygons(mask: np.ndarray, min_points: int = 3) -> Polygons:
    """(H, W) mask -> outer contour polygons in pixels (holes dropped).

    Contours are traced on the mask upsampled 2x, so that their points sit a quarter pixel inside
    the region's edge rather than on the boundary pixels' centres: rasterising the polygons again
    then gives back the boundary pixels. Lossy all the same (holes, one-pixel bridges): keep RLE
    where that matters. Contours with fewer than ``min_points`` points are dropped.
    """
    m = np.kron(np.asarray(mask, dtype=np.uint8), np.ones((2, 2), np.uint8))
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons: Polygons = []
    for contour in contours:
        pts = (contour.reshape(-1, 2).astype(np.float64) + 0.5) / 2.0
        if len(pts) >= min_points:
            polygons.append([float(v) for v in pts.ravel()])
    return polygons


def segmentation_to_mask(segmentation: Segmentation, height: int, width: int) -> np.ndarray:
    """Polygons or RLE -> (H, W) uint8 mask."""
    return rle_to_mask(segmentation_to_rle(segmentation, height, width))

"""Synthetic COCO ground truth and detections (boxes or box-shaped RLE masks) for evaluator tests
and ``bench/coco_eval.py``: gapped category ids, crowds, empty images, misses, duplicates, false
positives, tied scores, all three area ranges."""

from __future__ import annotations

from typing import Any

import numpy as np

from detseg.ops.masks import mask_to_rle, rle_area


def _box(rng: np.random.Generator, w: int, h: int) -> list[float]:
    side = float(np.exp(rng.uniform(np.log(6), np.log(min(w, h) * 0.8))))
    bw, bh = side * np.exp(rng.normal(0, 0.3, 2))
    bw, bh = min(bw, w - 1.0), min(bh, h - 1.0)
    x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    return [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)]


def _jitter(rng: np.random.Generator, b: list[float], s: float, w: int, h: int) -> list[float]:
    x, y, bw, bh = b
    bw2, bh2 = bw * np.exp(rng.normal(0, s)), bh * np.exp(rng.normal(0, s))
    x2 = min(max(x + rng.normal(0, s) * bw, 0.0), w - 1.0)
    y2 = min(max(y + rng.normal(0, s) * bh, 0.0), h - 1.0)
    return [round(x2, 2), round(y2, 2), round(min(bw2, w - x2), 2), round(min(bh2, h - y2), 2)]


def _rle(b: list[float], w: int, h: int) -> dict[str, Any]:
    m = np.zeros((h, w), np.uint8)
    x, y, bw, bh = (int(round(v)) for v in b)
    m[y : y + max(bh, 1), x : x + max(bw, 1)] = 1
    return mask_to_rle(m)


def synthetic_coco(
    num_images: int, seed: int, segm: bool = False, size: tuple[int, int] = (160, 120)
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(ground-truth dict, results list) for ``num_images`` images of at most ``size`` (w, h)."""
    rng = np.random.default_rng(seed)
    cat_ids = [1, 2, 5, 9, 17, 40, 90]
    images, anns, results = [], [], []
    for i in range(1, num_images + 1):
        w, h = (
            int(rng.integers(size[0] // 2, size[0] + 1)),
            int(rng.integers(size[1] // 2, size[1] + 1)),
        )
        images.append({"id": i, "file_name": f"{i}.jpg", "width": w, "height": h})
        for _ in range(int(rng.poisson(3.0)) if rng.random() > 0.1 else 0):
            b, c, crowd = _box(rng, w, h), int(rng.choice(cat_ids[:-1])), int(rng.random() < 0.05)
            ann = {
                "id": len(anns) + 1,
                "image_id": i,
                "category_id": c,
                "bbox": b,
                "area": round(b[2] * b[3], 2),
                "iscrowd": crowd,
            }
            if segm:
                ann["segmentation"] = _rle(b, w, h)
                ann["area"] = float(rle_area(ann["segmentation"]))
            anns.append(ann)
            if rng.random() < 0.8:
                copies = 1 + int(rng.random() < 0.15)
                for j in range(copies):
                    wrong = rng.random() < 0.05
                    results.append(
                        (
                            i,
                            int(rng.choice(cat_ids)) if wrong else c,
                            _jitter(rng, b, 0.08 * (1 + 2 * j), w, h),
                            rng.uniform(0.3, 1.0),
                        )
                    )
        for _ in range(int(rng.poisson(1.0))):
            results.append((i, int(rng.choice(cat_ids)), _box(rng, w, h), rng.uniform(0.05, 0.7)))
    categories = [{"id": c, "name": f"class{c}"} for c in cat_ids]
    gt = {"images": images, "annotations": anns, "categories": categories}
    sizes = {im["id"]: (im["width"], im["height"]) for im in images}
    out = []
    for image_id, c, b, s in results:
        r: dict[str, Any] = {"image_id": image_id, "category_id": c, "score": round(float(s), 2)}
        if segm:
            r["segmentation"] = _rle(b, *sizes[image_id])
        else:
            r["bbox"] = b
        out.append(r)
    return gt, out

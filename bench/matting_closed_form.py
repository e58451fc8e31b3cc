"""Closed-form matting (pymatting) on the alphamatting.com low-res training set, both trimaps.

    PYTHONPATH=. python bench/matting_closed_form.py [--method knn] [--max-side N] [--limit 20]

Prints per-trimap means under the DIM convention (unknown region; SAD/1000, MSE per unknown
pixel, Grad/1000, Conn/1000 on 8-bit-quantised alphas) and the GFM whole-image convention.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from detseg.data.images import read_image
from detseg.matting.classic import classic_matte
from detseg.matting.metrics import evaluate_matte, read_matte

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "alphamatting"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="closed-form")
    parser.add_argument("--max-side", type=int, default=None)
    parser.add_argument("--limit", type=int, default=27)
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args()
    names = sorted(p.stem for p in (args.root / "alpha").glob("GT*.png"))[: args.limit]
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    seconds = []
    for name in names:
        image = read_image(args.root / "input" / f"{name}.jpg")
        gt = read_matte(args.root / "alpha" / f"{name}.png")
        for trimap_set in ("trimap1", "trimap2"):
            trimap = read_matte(args.root / trimap_set / f"{name}.png")
            start = time.perf_counter()
            alpha = classic_matte(image, trimap, args.method, args.max_side)
            seconds.append(time.perf_counter() - start)
            quantised = np.round(alpha * 255).astype(np.uint8)
            for convention in ("dim", "gfm"):
                scores = evaluate_matte(quantised, gt, trimap, convention)
                rows.setdefault((trimap_set, convention), []).append(scores)
    print(
        f"{args.method}, {len(names)} images, max_side={args.max_side}, "
        f"solve {np.mean(seconds):.2f} s/image (mean)"
    )
    print("| trimap | convention | SAD | MSE | Grad | Conn |")
    print("|---|---|---:|---:|---:|---:|")
    for (trimap_set, convention), scores in rows.items():
        mean = {k: np.mean([s[k] for s in scores]) for k in ("SAD", "MSE", "Grad", "Conn")}
        print(
            f"| {trimap_set} | {convention} | {mean['SAD']:.3f} | {mean['MSE']:.5f} | "
            f"{mean['Grad']:.3f} | {mean['Conn']:.3f} |"
        )


if __name__ == "__main__":
    main()

"""Where bfloat16 sliced inference drifts: each tile's own detections, float32 vs bfloat16.

    PYTHONPATH=. python bench/sliced_bf16_probe.py --weights runs/det/fcos.safetensors \
        --mosaic runs/det/subset16.json [--every 8]

Builds the same mosaic as ``bench/sliced.py`` and runs every ``--every``-th 640-px tile through
``batched_detector`` in float32 and under bfloat16 autocast (before any merging). Prints the
share of float32 detections with a same-class bfloat16 box at IoU >= 0.9 (all, and those
scoring >= 0.3) and the score differences of the matched ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from bench.sliced import make_mosaic
from detseg.api import load_model
from detseg.detection.pipeline import _trained_max_size
from detseg.detection.sliced import batched_detector, slice_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--mosaic", type=Path, required=True)
    parser.add_argument("--every", type=int, default=8)
    parser.add_argument("--width", type=int, default=6000)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    image, _, _ = make_mosaic(args.width, args.height, args.mosaic)
    loaded = load_model(None, args.weights, "cpu", score_thresh=0.05)
    size = _trained_max_size(loaded)
    f32 = batched_detector(loaded.model, loaded.preprocess, max_size=size)
    bf16 = batched_detector(
        loaded.model, loaded.preprocess, max_size=size, autocast_dtype=torch.bfloat16
    )
    tiles = slice_grid(args.height, args.width, (640, 640), 0.2).tolist()[:: args.every]
    total = matched = confident = confident_matched = 0
    score_diffs: list[float] = []
    with torch.no_grad():
        for x0, y0, x1, y1 in tiles:
            tile = image[y0:y1, x0:x1]
            a, b = f32([tile])[0], bf16([tile])[0]
            if len(a) == 0:
                continue
            total, confident = total + len(a), confident + int((a.scores >= 0.3).sum())
            if len(b) == 0:
                continue
            same = a.labels[:, None] == b.labels[None, :]
            best, j = (box_iou(a.boxes, b.boxes) * same).max(1)
            ok = best >= 0.9
            matched += int(ok.sum())
            confident_matched += int((ok & (a.scores >= 0.3)).sum())
            score_diffs += (a.scores[ok] - b.scores[j[ok]]).abs().tolist()
    print(
        f"{len(tiles)} tiles: raw detections matched at IoU >= 0.9 (same class) "
        f"{matched}/{total} = {matched / max(total, 1):.4f}; scoring >= 0.3: "
        f"{confident_matched}/{confident} = {confident_matched / max(confident, 1):.4f}; "
        f"|score f32 - bf16| median {np.median(score_diffs):.4f}, "
        f"99th percentile {np.percentile(score_diffs, 99):.4f}"
    )


if __name__ == "__main__":
    main()

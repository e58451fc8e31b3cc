"""detseg's COCO evaluator (faster-coco-eval + pycocotools-exact precision) vs pycocotools.

Run from the repository root: ``PYTHONPATH=. python bench/coco_eval.py [--images 5000]``.
Each timing covers loading the results, evaluate, accumulate and summarize, from in-memory dicts;
both sides also check that their 12 stats are identical.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import time
from pathlib import Path

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detseg.detection.coco_eval import run_coco_eval
from tests.detection.coco_synthetic import synthetic_coco

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared/data/cocoeval_reference"


def _pycocotools(gt: dict, results: list[dict], iou_type: str) -> tuple[list[float], float]:
    gt, results = copy.deepcopy(gt), copy.deepcopy(results)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats], time.perf_counter() - t0


def _detseg(gt: dict, results: list[dict], iou_type: str) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    stats = run_coco_eval(gt, results, iou_type).stats
    return stats, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    args = parser.parse_args()
    cases = []
    if REFERENCE.is_dir():
        gt = json.loads((REFERENCE / "gt.json").read_text())
        for t in ("bbox", "segm"):
            cases.append(
                (f"reference {t}", gt, json.loads((REFERENCE / f"results_{t}.json").read_text()), t)
            )
    for t, size in (("bbox", (640, 480)), ("segm", (320, 240))):
        gt, res = synthetic_coco(args.images, seed=7, segm=t == "segm", size=size)
        cases.append((f"synthetic {args.images} img {t}", gt, res, t))
    _detseg(*cases[0][1:])  # warm-up (imports, C++ extension)
    print("| case | detections | pycocotools s | detseg s | speed-up | stats identical |")
    print("|---|---:|---:|---:|---:|---|")
    for name, gt, res, t in cases:
        ref_stats, ref_s = _pycocotools(gt, res, t)
        our_stats, our_s = _detseg(gt, res, t)
        same = "yes" if ref_stats == our_stats else "NO"
        print(
            f"| {name} | {len(res)} | {ref_s:.3f} | {our_s:.3f} | {ref_s / our_s:.1f}x | {same} |"
        )


if __name__ == "__main__":
    main()

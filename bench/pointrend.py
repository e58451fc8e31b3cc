"""PointRend subdivision vs dense point-head prediction per instance: time and logits memory.

    PYTHONPATH=. python bench/pointrend.py [--instances 1] [--steps 5 7]   # 224 and 896 px

Dense evaluates the point head at every cell of the S x S output; subdivision re-predicts
784 cells per x2 step from the 28 x 28 start (detectron2's schedule). Memory is the peak
torch CPU allocation reported by the profiler (random weights; the cost does not depend on them).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from detseg.instance.pointrend import PointRendMaskHead, sample_box_features
from detseg.ops.point_sample import point_sample, regular_grid


def dense(
    head: PointRendMaskHead, p2: torch.Tensor, boxes: torch.Tensor, side: int
) -> torch.Tensor:
    """Point head at all side^2 cell centres (chunked by rows of 28 cells' worth of points)."""
    coarse = head.coarse(p2, [boxes])
    coords = regular_grid(len(boxes), side)
    out = [
        head.point_head(sample_box_features(p2, 4, [boxes], c), point_sample(coarse, c))
        for c in coords.split(784 * 4, dim=1)
    ]
    return torch.cat(out, 2)


def measure(fn) -> tuple[float, float]:
    """(seconds, MiB allocated by the costliest operator type) of one call."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    peak = max((e.cpu_memory_usage for e in prof.key_averages()), default=0)
    return seconds, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 7], help="7 * 2^steps output")
    args = parser.parse_args()
    torch.manual_seed(0)
    p2 = torch.randn(1, 256, 64, 96)
    boxes = torch.tensor([[20.0, 30.0, 200.0, 220.0]]).repeat(args.instances, 1)
    classes = torch.zeros(args.instances, dtype=torch.long)
    print(
        "| output | method | ms / instance | MiB allocated by the costliest op |\n|---|---|---|---|"
    )
    for steps in args.steps:
        side = 7 * 2**steps
        head = PointRendMaskHead(subdivision_steps=steps).eval()
        with torch.no_grad():
            for name, fn in (
                ("subdivision", partial(head.predict, p2, [boxes], classes)),
                ("dense", partial(dense, head, p2, boxes, side)),
            ):
                sec, mib = measure(fn)
                print(f"| {side} | {name} | {1000 * sec / args.instances:.1f} | {mib:.1f} |")


if __name__ == "__main__":
    main()

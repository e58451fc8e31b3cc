"""PointRend subdivision vs dense point-head prediction per instance: time and logits memory.

    PYTHONPATH=. python bench/pointrend.py [--instances 1] [--sides 224 1024] [--no-dense 1024]

Dense evaluates the point head at every cell of the S x S output; subdivision re-predicts
784 cells per x2 step from a regular-grid start. S = 224 is detectron2's schedule (28 x 28 start,
3 steps); other sides start at the smallest S / 2^k with 4 (S / 2^k)^2 > 784 (detectron2's skip
rule), e.g. 1024 = 16 x 2^6. Memory is the peak torch CPU allocation reported by the profiler
for the costliest operator type (random weights; the cost does not depend on them).
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
    parser.add_argument("--sides", type=int, nargs="+", default=[224, 1024])
    parser.add_argument("--no-dense", type=int, nargs="*", default=[], help="sides: skip dense")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    p2 = torch.randn(1, 256, 64, 96)
    boxes = torch.tensor([[20.0, 30.0, 200.0, 220.0]]).repeat(args.instances, 1)
    classes = torch.zeros(args.instances, dtype=torch.long)
    print(
        "| output | method | ms / instance | MiB allocated by the costliest op |\n|---|---|---|---|"
    )
    head = PointRendMaskHead().eval()
    for side in args.sides:
        start, steps = side, 0
        while start % 2 == 0 and 4 * (start // 2) ** 2 > head.num_points:
            start, steps = start // 2, steps + 1
        head.init_resolution, head.steps = start, steps
        methods = [("subdivision", partial(head.predict, p2, [boxes], classes))]
        if side not in args.no_dense:
            methods.append(("dense", partial(dense, head, p2, boxes, side)))
        with torch.no_grad():
            for name, fn in methods:
                sec, mib = measure(fn)
                print(f"| {side} | {name} | {1000 * sec / args.instances:.1f} | {mib:.1f} |")


if __name__ == "__main__":
    main()

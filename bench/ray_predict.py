"""Batch prediction throughput: one process vs Ray Data with 1 and 2 actors, and Ray's per-row cost.

    PYTHONPATH=. python bench/ray_predict.py [--images 128] [--max-size 256] [--num-cpus 2]

Work per image is the same on every row: read the COCO128 JPEG, FCOS-MobileNetV2 (random
weights, 80 classes) at ``--max-size``, ``Prediction.to_json()``; one torch thread per process
(as each Ray actor runs). "1 process" is a plain loop over ``Predictor``; the Ray rows are whole
``predict_on_ray`` runs on a local cluster of ``--num-cpus`` CPUs (actor start, model shipping,
Parquet writing included). Ray's cost is fitted from two 1-actor runs of n/4 and n images,
``wall = fixed + per_row * n``: ``per_row`` minus the 1-process seconds per image is the
overhead Ray adds to each row; ``fixed`` is the cost of starting a run (actor pool, model copy).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from detseg.api import load_model
from detseg.data.images import read_image
from detseg.engine.batch import predict_on_ray
from detseg.predictor import Predictor

SHARED = Path(os.environ.get("DETSEG_SHARED", Path(__file__).resolve().parents[2] / "shared"))
COCO128 = SHARED / "data" / "coco128" / "images"


def local_seconds(loaded, paths: list[Path], options: dict) -> float:
    """Wall seconds of predicting ``paths`` in this process (after one warm-up image)."""
    predictor = Predictor(loaded, **options)
    predictor(read_image(paths[0]))
    start = time.perf_counter()
    for path in paths:
        json.dumps(predictor(read_image(path)).to_json())
    return time.perf_counter() - start


def ray_seconds(loaded, paths: list[Path], actors: int, options: dict) -> float:
    """Wall seconds of one ``predict_on_ray`` run over ``paths`` into a fresh folder."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "inputs.txt"
        manifest.write_text("\n".join(str(p) for p in paths))
        start = time.perf_counter()
        summary = predict_on_ray(
            loaded, manifest, Path(tmp) / "out", actors=actors, progress=False, **options
        )
        seconds = time.perf_counter() - start
    assert summary["predicted"] == len(paths), summary
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--max-size", type=int, default=256)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--rows-per-batch", type=int, default=8)
    args = parser.parse_args()
    import ray

    torch.set_num_threads(1)
    paths = sorted(COCO128.glob("*.jpg"))[: args.images]
    small = paths[: max(args.images // 4, 1)]
    loaded = load_model("fcos_mnv2_fpn", device="cpu", num_classes=80)
    options = {"max_size": args.max_size, "rows_per_batch": args.rows_per_batch}
    predictor_options = {"max_size": args.max_size}
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    local = local_seconds(loaded, paths, predictor_options)
    rows = [("1 process", len(paths), local)]
    one_small = ray_seconds(loaded, small, 1, options)
    one = ray_seconds(loaded, paths, 1, options)
    rows += [("Ray, 1 actor", len(small), one_small), ("Ray, 1 actor", len(paths), one)]
    rows.append(("Ray, 2 actors", len(paths), ray_seconds(loaded, paths, 2, options)))
    ray.shutdown()

    print(f"| run | images | seconds | images/s |   ({args.max_size} px, {args.num_cpus} CPUs)")
    print("|---|---:|---:|---:|")
    for name, n, seconds in rows:
        print(f"| {name} | {n} | {seconds:.2f} | {n / seconds:.2f} |")
    per_row = (one - one_small) / (len(paths) - len(small))
    fixed = one - per_row * len(paths)
    print(
        f"\nRay 1 actor: {fixed:.2f} s per run + {per_row * 1000:.0f} ms per image; 1 process "
        f"{local / len(paths) * 1000:.0f} ms per image -> Ray adds "
        f"{(per_row - local / len(paths)) * 1000:.0f} ms per row"
    )


if __name__ == "__main__":
    main()

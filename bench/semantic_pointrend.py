"""DeepLabV3+ with and without the PointRend point head on CamVid, same budget: mIoU and BF.

    PYTHONPATH=. python bench/semantic_pointrend.py [--steps 200] [--crop 256] [--out runs/sem_pr]

Both models use the MobileNetV2 trunk (random init: no weights offline), output stride 16, and are
trained by ``detseg.semantic.pipeline.train_semantic`` (the CLI's path: the point head's loss
comes through ``semantic_loss`` like any auxiliary head) with the same steps, crop, batch, lr and
seed, one thread. Both are then scored on CamVid val at full resolution: mIoU (standard
convention) and the class-agnostic boundary F-score (``detseg.semantic.boundary``, 2 px).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from detseg.api import load_model
from detseg.data.folders import SegmentationFolder
from detseg.semantic.boundary import BoundaryF
from detseg.semantic.metrics import ConfusionMatrix
from detseg.semantic.pipeline import segment, train_semantic

MODELS = ("deeplabv3plus_mobilenetv2", "deeplabv3plus_pointrend")


def score(weights: Path, data: Path, limit: int | None) -> dict[str, float]:
    """mIoU and boundary F of a checkpoint on ``data``'s val split."""
    loaded = load_model(weights=weights, device="cpu")
    val = SegmentationFolder(data, "val", preprocess=loaded.preprocess)
    cm, bf = ConfusionMatrix(val.num_classes, val.ignore_index), BoundaryF(2, val.ignore_index)
    for i in range(len(val) if limit is None else min(limit, len(val))):
        image, label = val.read_pair(i)
        pred = segment(loaded.model, image, loaded.preprocess)
        cm.update(pred, label)
        bf.update(pred, label)
    return {"mIoU": cm.compute("standard")["mIoU"] or 0.0, **bf.compute()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--limit", type=int, default=None, help="val images scored")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", type=Path, default=Path("runs/sem_pr"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = args.shared / "data/camvid"
    print("| model | steps | mIoU | BF (2 px) | boundary P | boundary R | train s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        start = time.perf_counter()
        summary = train_semantic(
            model=name,
            data=data,
            out_dir=args.out / name,
            val_split=None,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            crop=(args.crop, args.crop),
            device="cpu",
            model_kwargs={"backbone": "mobilenet_v2"},
            progress=False,
        )
        seconds = time.perf_counter() - start
        m = score(args.out / name / "last.safetensors", data, args.limit)
        print(json.dumps({"model": name, **m, "train_seconds": seconds}), flush=True)
        print(
            f"| {name} | {summary['steps']} | {m['mIoU']:.2f} | {m['BF']:.2f} |"
            f" {m['boundary_precision']:.2f} | {m['boundary_recall']:.2f} | {seconds:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

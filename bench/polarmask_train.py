"""A short from-scratch PolarMask run on balloon train (CPU), printing the mask AP50 curve.

    PYTHONPATH=. python bench/polarmask_train.py [--steps 400] [--size 256] [--out runs/pm_balloon]

A MobileNetV2 FPN PolarMask (64 channels, 2-conv towers, random init: no weights can be
downloaded here) trained with ``detseg.engine.trainer.Trainer`` on the 61 balloon training
images (scale jitter, flip), evaluated on the same images without augmentation (mask and box AP)
before training and every ``--eval-every`` steps. One thread: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from detseg.checkpoint import CheckpointMeta
from detseg.data.convert import read_dataset
from detseg.detection.fcos_training import collate_detection
from detseg.engine.trainer import TrainConfig, Trainer
from detseg.instance.polarmask import PolarMask
from detseg.instance.polarmask_training import (
    polarmask_dataset,
    polarmask_evaluate_fn,
    polarmask_loss,
)

KWARGS = {
    "num_classes": 1,
    "backbone": "mobilenet_v2",
    "out_channels": 64,
    "feat_channels": 64,
    "stacked_convs": 2,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared"
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--images", type=int, default=None, help="first N training images only")
    parser.add_argument("--out", default="runs/pm_balloon")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = read_dataset(args.shared / "data/balloon/train/via_region_data.json", "balloon")
    data = replace(data, images=data.images[: args.images])
    train_set = polarmask_dataset(data, train=True, max_size=args.size)
    eval_set = polarmask_dataset(data, train=False, max_size=args.size)
    torch.manual_seed(0)
    model = PolarMask(**KWARGS)
    evaluate = polarmask_evaluate_fn(eval_set, batch_size=4)
    start = time.perf_counter()
    model.eval()
    with torch.no_grad():
        before = evaluate(model)
    print(json.dumps({"step": 0, **before}))
    cfg = TrainConfig(
        out_dir=args.out,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adamw",
        schedule="cosine",
        warmup_steps=30,
        eval_every=args.eval_every,
        log_every=20,
        grad_clip=35.0,
        device="cpu",
    )
    trainer = Trainer(
        model,
        train_set,
        cfg,
        loss_fn=polarmask_loss,
        evaluate_fn=evaluate,
        collate_fn=collate_detection,
        primary_metric="AP50",
        higher_is_better=True,
        meta=CheckpointMeta(model="polarmask_r50", kwargs=KWARGS),
    )
    history = trainer.fit(progress=False)
    for record in history.evals:
        print(json.dumps(record))
    losses = [r for r in history.train]
    print(
        "train loss:",
        [round(r.get("loss", float("nan")), 3) for r in losses[:: max(1, len(losses) // 10)]],
    )
    print(f"wall: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

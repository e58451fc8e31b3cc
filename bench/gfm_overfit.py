"""Overfit GFM (from scratch) on RSSN composites of a few alphamatting foregrounds; prints SAD.

    PYTHONPATH=. python bench/gfm_overfit.py [--steps 300] [--images GT01 GT02 GT05]

Foregrounds come from pymatting's ``estimate_foreground_ml`` on the photos; backgrounds are other
alphamatting photos. Everything is downscaled to 128x192 so it runs on a CPU. The evaluation
composites use fixed backgrounds and no RSSN randomness; SAD is the GFM whole-image SAD / 1000.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import torch

from detseg.checkpoint import CheckpointMeta
from detseg.data.images import read_image
from detseg.engine.trainer import TrainConfig, Trainer
from detseg.matting.composite import RSSNConfig, alpha_composite, estimate_foreground
from detseg.matting.gfm import GFM, RAW_RGB
from detseg.matting.gfm_training import RSSNMattingDataset, make_evaluate_fn, make_loss_fn
from detseg.matting.metrics import read_matte

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "alphamatting"
SIZE = (192, 128)  # (width, height) for cv2


def _load(name: str) -> tuple[np.ndarray, np.ndarray]:
    image = cv2.resize(
        read_image(ROOT / "input" / f"{name}.jpg"), SIZE, interpolation=cv2.INTER_AREA
    )
    alpha = cv2.resize(
        read_matte(ROOT / "alpha" / f"{name}.png"), SIZE, interpolation=cv2.INTER_AREA
    )
    return image, alpha


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", nargs="+", default=["GT01", "GT02", "GT05"])
    parser.add_argument("--backgrounds", nargs="+", default=["GT10", "GT14", "GT19"])
    parser.add_argument("--out", default="runs/gfm_overfit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    photos = [_load(n) for n in args.images]
    fgs = [estimate_foreground(img, a) for img, a in photos]
    alphas = [a for _, a in photos]
    bgs = [_load(n)[0] for n in args.backgrounds]
    train = RSSNMattingDataset(
        fgs, alphas, bgs, size=96, crop_sizes=(112,), rssn=RSSNConfig(p_denoise=0), length=24
    )
    evals = [
        np.trunc(
            alpha_composite(fg.astype(float), bgs[i % len(bgs)].astype(float), a / 255.0)
        ).astype(np.uint8)
        for i, (fg, a) in enumerate(zip(fgs, alphas, strict=True))
    ]
    cfg = TrainConfig(
        out_dir=args.out,
        max_steps=args.steps,
        batch_size=4,
        lr=1e-3,
        optimizer="adamw",
        weight_decay=0.0,
        schedule="constant",
        eval_every=max(1, args.steps // 6),
        log_every=10,
        seed=0,
        device="cpu",
    )
    model = GFM("r34", "TT")
    trainer = Trainer(
        model,
        train,
        cfg,
        loss_fn=make_loss_fn("TT"),
        evaluate_fn=make_evaluate_fn(evals, alphas),
        primary_metric="SAD",
        higher_is_better=False,
        meta=CheckpointMeta(
            model="gfm_r34", kwargs={"backbone": "r34", "rosta": "TT"}, preprocess=dict(RAW_RGB)
        ),
    )
    history = trainer.fit(progress=False)
    print("| step | SAD | MSE | MAD |")
    print("|---:|---:|---:|---:|")
    for record in history.evals:
        print(
            f"| {int(record['step'])} | {record['SAD']:.3f} | {record['MSE']:.4f} | {record['MAD']:.4f} |"
        )
    Path(args.out, "sad_curve.json").write_text(json.dumps(history.evals))


if __name__ == "__main__":
    main()

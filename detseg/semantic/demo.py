"""``detseg demo``: a synthetic shapes dataset, a small U-Net trained on it, metrics and pictures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detseg.data.images import write_image
from detseg.fileio import write_text_atomic

DEMO_CLASSES = ("background", "disc", "square", "triangle")


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.integers(40, 200, size=3)
    noise = rng.normal(0, 18, size=(size // 8, size // 8, 3))
    noise = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def make_shapes_image(rng: np.random.Generator, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """One (size, size, 3) uint8 image of textured shapes and its (size, size) uint8 label map."""
    image = _texture(rng, size)
    label = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        cls = int(rng.integers(1, len(DEMO_CLASSES)))
        mask = np.zeros_like(label)
        cx, cy = (int(v) for v in rng.integers(size // 8, size - size // 8, size=2))
        r = int(rng.integers(size // 10, size // 5))
        if cls == 1:
            cv2.circle(mask, (cx, cy), r, 1, -1)
        elif cls == 2:
            cv2.rectangle(mask, (cx - r, cy - r), (cx + r, cy + r), 1, -1)
        else:
            pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
            cv2.fillPoly(mask, [pts], 1)
        colour = rng.integers(0, 256, size=3)
        shade = np.clip(colour + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
        image[mask > 0] = shade[mask > 0]
        label[mask > 0] = cls
    return image, label


def make_shapes_dataset(
    root: str | Path, train: int = 160, val: int = 32, size: int = 96, seed: int = 0
) -> Path:
    """Write a CamVid-layout folder (``train/``, ``trainannot/``, ``val/``, ``valannot/``)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            image, label = make_shapes_image(rng, size)
            write_image(root / split / f"{i:04d}.png", image)
            write_image(root / f"{split}annot" / f"{i:04d}.png", label)
    write_text_atomic(root / "classes.json", json.dumps(list(DEMO_CLASSES)))
    return root


def run_demo(
    out_dir: str | Path = "detseg-demo", steps: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Make data, train U-Net (base 16) for ``steps`` (default 600, about two minutes on an idle 2-core CPU),
    evaluate, and write overlays of the validation images and the loss/mIoU plot to ``out_dir``."""
    from detseg.api import load_model, predict
    from detseg.semantic.pipeline import evaluate_semantic, train_semantic

    steps = steps or 600
    out = Path(out_dir)
    data = make_shapes_dataset(out / "data")
    run = out / "run"
    summary = train_semantic(
        model="unet",
        data=data,
        out_dir=run,
        steps=steps,
        batch_size=8,
        lr=3e-3,
        crop=(96, 96),
        eval_every=max(steps // 8, 1),
        num_classes=len(DEMO_CLASSES),
        ignore_index=255,
        model_kwargs={"base_channels": 16, "depth": 3},
        progress=progress,
        log_every=5,
    )
    best = load_model(weights=run / "best.safetensors")
    best.class_names = DEMO_CLASSES
    metrics = evaluate_semantic(
        data=data,
        split="val",
        model=best,
        num_classes=len(DEMO_CLASSES),
        ignore_index=255,
        progress=False,
    )
    predict(best, data / "val", out / "overlays", progress=progress)
    result = {
        "out_dir": str(out),
        "first_mIoU": summary["first_eval"]["mIoU"],
        "final_mIoU": metrics["mIoU"],
        "per_class_IoU": metrics["per_class_IoU"],
        "curves": str(run / "curves.png"),
        "overlays": str(out / "overlays"),
        "checkpoint": str(run / "best.safetensors"),
    }
    write_text_atomic(out / "demo.json", json.dumps(result, indent=1))
    return result

"""FCOS training glue for ``detseg.engine.trainer.Trainer``: collate, loss and evaluation functions.

Dataset items are ``(image, target)``: ``image`` (3, H, W) float32, already preprocessed (resized
and normalised); ``target`` a dict with ``boxes`` (G, 4) float32 continuous xyxy pixels of that
image, ``labels`` (G,) int64 in 0..K-1, ``image_id`` int (``masks`` optional, ignored here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from detseg.data.detection import DetectionDataset
from detseg.detection.coco_eval import evaluate_detections
from detseg.detection.fcos import FCOS
from detseg.results import Detections

Batch = dict[str, Any]


def collate_detection(
    items: Sequence[tuple[Tensor, dict[str, Any]]], size_divisibility: int = 32
) -> Batch:
    """Zero-pad images of different sizes into one batch (bottom/right, as the official loader).

    Returns ``{"images": (B, 3, H, W) with H, W multiples of size_divisibility,
    "image_sizes": (B, 2) int64 (h, w) before padding, "targets": list of the target dicts}``.
    """
    images = [image for image, _ in items]
    height = max(im.shape[-2] for im in images)
    width = max(im.shape[-1] for im in images)
    height = int(math.ceil(height / size_divisibility) * size_divisibility)
    width = int(math.ceil(width / size_divisibility) * size_divisibility)
    batch = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]] = im
    sizes = torch.tensor([list(im.shape[-2:]) for im in images], dtype=torch.int64)
    targets = [
        {
            **target,
            "boxes": torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1),
        }
        for _, target in items
    ]
    return {"images": batch, "image_sizes": sizes, "targets": targets}


def fcos_loss(model: FCOS, batch: Batch) -> tuple[Tensor, dict[str, float]]:
    """``loss_fn`` for the Trainer: (cls + reg + ctr, {"cls", "reg", "ctr"} as floats)."""
    outputs = model(batch["images"])
    losses = model.compute_loss(outputs, batch["targets"], tuple(batch["images"].shape[-2:]))
    total = losses["cls"] + losses["reg"] + losses["ctr"]
    return total, {name: float(value.detach()) for name, value in losses.items()}


@torch.no_grad()
def fcos_predict(
    model: FCOS,
    batch: Batch,
    original_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[Detections]:
    """Detections for a collated batch (eval mode), boxes in the images' (or original) pixels."""
    outputs = model(batch["images"])
    sizes = [tuple(s) for s in batch["image_sizes"].tolist()]
    return model.postprocess(outputs, sizes, original_sizes, tuple(batch["images"].shape[-2:]))


def fcos_evaluate_fn(
    dataset: DetectionDataset, batch_size: int = 2, num_workers: int = 0
) -> Callable[[FCOS], dict[str, float]]:
    """``evaluate_fn(model)`` for the Trainer: COCO box AP of ``model`` on ``dataset``.

    Predicts every item in order (eval mode, as the Trainer calls it), maps the boxes back to the
    original image pixels (``target["orig_size"]``) and scores them with
    ``detseg.detection.coco_eval.evaluate_detections``. Returns {"AP", "AP50", "AP75"}.
    """

    def evaluate(model: FCOS) -> dict[str, float]:
        device = next(model.parameters()).device
        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_detection
        )
        detections: list[Detections] = []
        for batch in loader:
            batch["images"] = batch["images"].to(device)
            original = [tuple(t["orig_size"]) for t in batch["targets"]]
            detections += fcos_predict(model, batch, original)
        stats = evaluate_detections(dataset.dataset, detections).stats
        return {"AP": stats[0], "AP50": stats[1], "AP75": stats[2]}

    return evaluate

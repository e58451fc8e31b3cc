"""PolarMask training glue for ``detseg.engine.trainer.Trainer``: dataset, loss and evaluation.

Dataset items are those of ``DetectionDataset(..., masks=True)``: ``image`` (3, H, W) float32
preprocessed; ``target`` with ``boxes`` (G, 4) continuous xyxy pixels, ``labels`` (G,) 0..K-1,
``masks`` (G, H, W) uint8, ``image_id``, ``orig_size``. Batches come from FCOS's
``collate_detection`` (zero padding to a multiple of 32; the masks stay unpadded per image).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from detseg.data.coco import DetectionSet
from detseg.data.detection import DetectionDataset
from detseg.data.preprocess import Preprocess
from detseg.detection.coco_eval import evaluate_detections
from detseg.detection.fcos_training import collate_detection
from detseg.instance.polarmask import PolarMask
from detseg.results import Instances

Batch = dict[str, Any]


def polarmask_dataset(
    source: DetectionSet | str | Path,
    train: bool,
    max_size: int | None = 768,
    preprocess: Preprocess | None = None,
) -> DetectionDataset:
    """A mask dataset for PolarMask (COCO JSON, VIA or YOLO; see ``DetectionDataset``)."""
    return DetectionDataset(
        source, train=train, max_size=max_size, masks=True, preprocess=preprocess
    )


def polarmask_loss(model: PolarMask, batch: Batch) -> tuple[Tensor, dict[str, float]]:
    """``loss_fn`` for the Trainer: (cls + bbox + mask + centerness, the four as floats)."""
    losses = model.compute_loss(model(batch["images"]), batch["targets"])
    total = losses["cls"] + losses["bbox"] + losses["mask"] + losses["centerness"]
    return total, {name: float(value.detach()) for name, value in losses.items()}


@torch.no_grad()
def polarmask_predict(
    model: PolarMask, batch: Batch, original_sizes: Sequence[tuple[int, int]] | None = None
) -> list[Instances]:
    """Instances for a collated batch (eval mode), in the images' (or original) pixels."""
    sizes = [tuple(s) for s in batch["image_sizes"].tolist()]
    return model.postprocess(model(batch["images"]), sizes, original_sizes)


def polarmask_evaluate_fn(
    dataset: DetectionDataset, batch_size: int = 2, num_workers: int = 0
) -> Callable[[PolarMask], dict[str, float]]:
    """``evaluate_fn(model)`` for the Trainer: COCO mask and box AP of ``model`` on ``dataset``.

    Returns {"AP", "AP50", "AP75"} (mask, primary "AP50" or "AP") and {"box_AP", "box_AP50"}.
    """

    def evaluate(model: PolarMask) -> dict[str, float]:
        device = next(model.parameters()).device
        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_detection
        )
        predictions: list[Instances] = []
        for batch in loader:
            batch["images"] = batch["images"].to(device)
            original = [tuple(t["orig_size"]) for t in batch["targets"]]
            predictions += polarmask_predict(model, batch, original)
        segm = evaluate_detections(dataset.dataset, predictions, "segm").stats
        bbox = evaluate_detections(dataset.dataset, predictions, "bbox").stats
        return {
            "AP": segm[0],
            "AP50": segm[1],
            "AP75": segm[2],
            "box_AP": bbox[0],
            "box_AP50": bbox[1],
        }

    return evaluate

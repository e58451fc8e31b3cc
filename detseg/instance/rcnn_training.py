"""Mask R-CNN / PointRend training glue for ``detseg.engine.trainer.Trainer``: loss and evaluation.

Dataset items are those of ``DetectionDataset(..., masks=True, preprocess=model.default_preprocess)``:
``image`` (3, H, W) float32 BGR 0..255 (the model normalises itself); ``target`` with ``boxes``
(G, 4) xyxy pixels, ``labels`` (G,) 0..K-1, ``masks`` (G, H, W) uint8, ``orig_size``. Batches come
from ``collate_detection`` (zero padding at the bottom/right; masks stay per image, unpadded).
GT masks are bitmasks, as detectron2 with ``INPUT.MASK_FORMAT: bitmask`` (PointRend's setting):
the 28x28 (7x7 coarse) targets are RoIAlign crops thresholded at 0.5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from detseg.data.detection import DetectionDataset
from detseg.detection.coco_eval import detections_to_coco, run_coco_eval
from detseg.detection.fcos_training import collate_detection
from detseg.instance.maskrcnn import MaskRCNN
from detseg.results import Instances

Batch = dict[str, Any]


def rcnn_loss(model: MaskRCNN, batch: Batch) -> tuple[Tensor, dict[str, float]]:
    """``loss_fn`` for the Trainer: the sum of detectron2's named losses (all weight 1), and each."""
    losses = model.compute_loss(batch["images"], batch["image_sizes"], batch["targets"])
    total = sum(losses.values(), torch.zeros((), device=batch["images"].device))
    return total, {name: float(value.detach()) for name, value in losses.items()}


@torch.no_grad()
def rcnn_predict(model: MaskRCNN, batch: Batch) -> list[Instances]:
    """Instances of every image of a collated batch (eval mode), at its ``orig_size``."""
    out = []
    for image, (h, w), target in zip(
        batch["images"], batch["image_sizes"].tolist(), batch["targets"], strict=True
    ):
        out.append(model.predict(image[:, :h, :w], tuple(target["orig_size"])))
    return out


def ap_at_iou(precision: np.ndarray, iou_index: int) -> float:
    """COCO AP at one IoU threshold (``precision`` (T, R, K, A, M); area all, 100 detections)."""
    p = precision[iou_index, :, :, 0, -1]
    valid = p > -1
    return float(p[valid].mean()) if valid.any() else -1.0


def rcnn_evaluate_fn(
    dataset: DetectionDataset, batch_size: int = 2, num_workers: int = 0
) -> Callable[[MaskRCNN], dict[str, float]]:
    """``evaluate_fn(model)`` for the Trainer: COCO mask and box AP of ``model`` on ``dataset``.

    Returns mask ``AP``, ``AP50``, ``AP75``, ``AP90`` (the boundary-sensitive threshold: IoU 0.9
    of the COCO precision array), ``boundary_AP`` and ``boundary_AP50`` (Boundary AP: the same
    masks matched by min(mask IoU, boundary IoU)) and ``box_AP``, ``box_AP50``.
    """

    def evaluate(model: MaskRCNN) -> dict[str, float]:
        device = next(model.parameters()).device
        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_detection
        )
        records, cats = iter(dataset.dataset.images), dataset.dataset.category_ids
        results: dict[str, list[dict[str, Any]]] = {"segm": [], "bbox": []}
        for batch in loader:
            batch["images"] = batch["images"].to(device)
            for inst in rcnn_predict(model, batch):  # RLE at once: full-size masks are large
                image_id = next(records).id
                for kind, out in results.items():
                    out += detections_to_coco(image_id, inst, cats, kind)  # type: ignore[arg-type]
        segm = run_coco_eval(dataset.dataset, results["segm"], "segm")
        bbox = run_coco_eval(dataset.dataset, results["bbox"], "bbox").stats
        boundary = run_coco_eval(dataset.dataset, results["segm"], "boundary").stats
        return {
            "AP": segm.stats[0],
            "AP50": segm.stats[1],
            "AP75": segm.stats[2],
            "AP90": ap_at_iou(segm.precision, 8),
            "boundary_AP": boundary[0],
            "boundary_AP50": boundary[1],
            "box_AP": bbox[0],
            "box_AP50": bbox[1],
        }

    return evaluate

"""TensorMask training glue for ``detseg.engine.trainer.Trainer``: dataset, loss and evaluation.

Dataset items are those of ``DetectionDataset(..., masks=True)`` (boxes (G, 4) continuous xyxy
pixels, labels (G,) 0..K-1, masks (G, H, W) uint8 of the unpadded image); batches come from
FCOS's ``collate_detection``. The window targets are sampled from the bitmasks (detectron2's
``BitMasks.crop_and_resize``). Evaluation is the dense-instance COCO evaluation shared with
PolarMask (``polarmask_evaluate_fn``: any model with ``postprocess``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from detseg.data.coco import DetectionSet
from detseg.data.detection import DetectionDataset
from detseg.data.preprocess import Preprocess
from detseg.instance.tensormask import TensorMask

LIGHT_KWARGS: dict[str, Any] = {
    "backbone": "mobilenet_v2",
    "fpn_channels": 64,
    "num_convs": 2,
    "cls_channels": 64,
    "bbox_channels": 64,
    "mask_channels": 64,
}
"""The light CPU configuration of the balloon protocol (random-init MobileNetV2, FPN 64)."""


def tensormask_dataset(
    source: DetectionSet | str | Path,
    train: bool,
    max_size: int | None = 768,
    preprocess: Preprocess | None = None,
) -> DetectionDataset:
    """A mask dataset for TensorMask (COCO JSON, VIA or YOLO; see ``DetectionDataset``)."""
    return DetectionDataset(
        source, train=train, max_size=max_size, masks=True, preprocess=preprocess
    )


def tensormask_loss(model: TensorMask, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
    """``loss_fn`` for the Trainer: loss_cls + loss_box_reg + loss_mask (weights inside, §8)."""
    losses = model.compute_loss(model(batch["images"]), batch["targets"])
    total = losses["loss_cls"] + losses["loss_box_reg"] + losses["loss_mask"]
    return total, {name: float(value.detach()) for name, value in losses.items()}

"""Semantic-segmentation losses: cross-entropy with ignore, optional Dice and class weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detseg.ops.point_sample import point_sample

# Point predictions (PointRend): logits (N, C, P) at image-normalised points (N, P, 2) in [0, 1]^2.
PointLogits = tuple[torch.Tensor, torch.Tensor]


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, eps: float = 1.0
) -> torch.Tensor:
    """Soft multi-class Dice loss, 1 - mean over classes present in the batch.

    Args:
        logits: (N, C, H, W) float; target: (N, H, W) int64 with ``ignore_index`` for void.
    """
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)
    probs = logits.softmax(dim=1) * valid
    one_hot = F.one_hot(target.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2)
    one_hot = one_hot.to(probs.dtype) * valid
    dims = (0, 2, 3)
    inter = (probs * one_hot).sum(dims)
    denom = probs.sum(dims) + one_hot.sum(dims)
    present = one_hot.sum(dims) > 0
    dice = (2 * inter + eps) / (denom + eps)
    return 1 - dice[present].mean() if present.any() else logits.sum() * 0


class SegmentationLoss(nn.Module):
    """``CE(weight, ignore_index) + dice_weight * Dice``, averaged over valid pixels.

    Args:
        ignore_index: label excluded from the loss (CamVid void 11, VOC 255).
        class_weights: optional (C,) per-class CE weights (e.g. ENet ``1/ln(1.02 + p_c)``).
        dice_weight: weight of the Dice term (0 disables it).
    """

    def __init__(
        self,
        ignore_index: int = 255,
        class_weights: list[float] | None = None,
        dice_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.dice_weight = dice_weight
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (N, C, H, W), target (N, H, W) int64 -> scalar loss."""
        if (target != self.ignore_index).sum() == 0:
            return logits.sum() * 0
        loss = F.cross_entropy(
            logits, target, weight=self.class_weights, ignore_index=self.ignore_index
        )
        if self.dice_weight:
            loss = loss + self.dice_weight * dice_loss(logits, target, self.ignore_index)
        return loss


def enet_class_weights(label_counts: torch.Tensor, c: float = 1.02) -> list[float]:
    """ENet weighting ``1 / ln(c + p_class)`` from (C,) pixel counts."""
    p = label_counts.double() / label_counts.sum().clamp(min=1)
    return (1.0 / torch.log(c + p)).tolist()


def semantic_loss(
    outputs: torch.Tensor | dict[str, torch.Tensor | PointLogits],
    target: torch.Tensor,
    criterion: nn.Module,
    aux_weights: dict[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of a model's training output: a logits tensor, or ``{"out": ..., "<aux>": ...}``.

    Every auxiliary head (any key besides ``"out"``) adds ``aux_weights[key]`` (default 0.4,
    PSPNet's) times its own loss; the parts are reported by name. A dense head's logits are
    resized to the label if needed; a point head's ``(logits (N, C, P), coords (N, P, 2))`` is
    scored against the label sampled at the points with ``mode='nearest'`` (detectron2's
    PointRend rule).
    """
    if isinstance(outputs, torch.Tensor):
        return criterion(outputs, target), {}
    weights = aux_weights or {}
    total = torch.zeros((), device=target.device)
    parts: dict[str, float] = {}
    for name, value in outputs.items():
        if isinstance(value, tuple):
            logits, coords = value
            labels = point_sample(target[:, None].to(coords.dtype), coords, mode="nearest")
            loss = criterion(logits[..., None], labels[:, 0, :, None].long())
        else:
            if value.shape[-2:] != target.shape[-2:]:
                value = F.interpolate(
                    value, size=target.shape[-2:], mode="bilinear", align_corners=False
                )
            loss = criterion(value, target)
        total = total + (1.0 if name == "out" else weights.get(name, 0.4)) * loss
        parts[f"loss_{name}"] = float(loss.detach())
    return total, parts

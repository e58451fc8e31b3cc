"""One result type per task, in plain tensors with documented shapes (all on CPU unless stated)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class SemanticResult:
    """Per-pixel classes for one image.

    Attributes:
        labels: (H, W) int64 class ids at the input image's resolution.
        scores: (H, W) float32 softmax probability of the chosen class.
        class_names: names indexed by class id (may be empty).
    """

    labels: torch.Tensor
    scores: torch.Tensor
    class_names: tuple[str, ...] = ()


@dataclass
class Detections:
    """Boxes for one image.

    Attributes:
        boxes: (N, 4) float32 xyxy in input-image pixels.
        scores: (N,) float32 confidence in [0, 1].
        labels: (N,) int64 class ids.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def select(self, keep: torch.Tensor) -> Detections:
        """The detections where ``keep`` (N,) bool is True, in order, of the same type."""
        return replace(
            self, boxes=self.boxes[keep], scores=self.scores[keep], labels=self.labels[keep]
        )

    def above(self, threshold: float) -> Detections:
        """The detections scoring at least ``threshold``."""
        return self.select(self.scores >= threshold)


@dataclass
class Instances(Detections):
    """Detections with one mask each.

    Attributes:
        masks: (N, H, W) bool masks at the input image's resolution.
    """

    masks: torch.Tensor | None = None

    def select(self, keep: torch.Tensor) -> Instances:
        """The instances where ``keep`` (N,) bool is True, masks included."""
        out = super().select(keep)
        if self.masks is not None:
            out.masks = self.masks[keep]
        return out


@dataclass
class Matte:
    """Alpha matte and foreground for one image.

    Attributes:
        alpha: (1, H, W) float32 in [0, 1].
        foreground: (3, H, W) float32 RGB in [0, 1], or None when the model predicts alpha only.
    """

    alpha: torch.Tensor
    foreground: torch.Tensor | None = None

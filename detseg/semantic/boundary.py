"""Boundary F-score of a label map (Csurka et al., BMVC 2013; the "BF" score of semantic
segmentation benchmarks), class-agnostic, with a pixel tolerance.

A pixel is a boundary pixel when one of its 4-neighbours has another label. Precision is the
share of predicted boundary pixels within ``tolerance`` pixels (chessboard distance) of a ground-truth
boundary pixel, recall the converse; F = 2PR / (P + R). Pixels whose ground truth is void, and
boundaries next to void, are left out.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def boundaries(labels: torch.Tensor) -> torch.Tensor:
    """(H, W) int labels -> (H, W) bool, True where a right or lower neighbour differs (both
    pixels of every differing pair are marked)."""
    out = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    dx = labels[:, 1:] != labels[:, :-1]
    dy = labels[1:, :] != labels[:-1, :]
    out[:, 1:] |= dx
    out[:, :-1] |= dx
    out[1:, :] |= dy
    out[:-1, :] |= dy
    return out


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    if radius == 0:
        return mask
    x = mask[None, None].float()
    return F.max_pool2d(x, 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0


class BoundaryF:
    """Accumulates boundary precision / recall counts over images; ``compute()`` -> percent.

    Args:
        tolerance: match distance in pixels (chessboard).
        ignore_index: void label of the ground truth, or None.
    """

    def __init__(self, tolerance: int = 2, ignore_index: int | None = None) -> None:
        self.tolerance, self.ignore_index = tolerance, ignore_index
        self.matched_pred = self.pred = self.matched_gt = self.gt = 0

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Add one image: ``pred`` and ``target`` (H, W) integer label maps."""
        pred, target = torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(target))
        valid = torch.ones_like(target, dtype=torch.bool)
        if self.ignore_index is not None:
            valid = ~_dilate(target == self.ignore_index, 1)
            pred = torch.where(target == self.ignore_index, self.ignore_index, pred)
        pb, gb = boundaries(pred) & valid, boundaries(target) & valid
        self.matched_pred += int((pb & _dilate(gb, self.tolerance)).sum())
        self.matched_gt += int((gb & _dilate(pb, self.tolerance)).sum())
        self.pred += int(pb.sum())
        self.gt += int(gb.sum())

    def compute(self) -> dict[str, float]:
        """``{"BF", "boundary_precision", "boundary_recall"}`` in percent over all images."""
        p = self.matched_pred / self.pred if self.pred else 0.0
        r = self.matched_gt / self.gt if self.gt else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        return {"BF": 100 * f, "boundary_precision": 100 * p, "boundary_recall": 100 * r}

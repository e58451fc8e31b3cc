"""Dataset-level semantic segmentation metrics from one accumulated confusion matrix.

The matrix is ``cm[gt, pred]`` over ``num_classes`` valid classes plus, when ``ignore_index`` is
set, one extra last row/column ``num_classes`` for void: void ground truth lands in that row, a
prediction equal to ``ignore_index`` (a model that was trained with void as a class, e.g. ESPNet's
CamVid weights predicting 11) lands in that column.

Two conventions read the same matrix (all numbers in percent):

- ``"standard"``: void ground truth is ignored; a valid pixel predicted as void is a miss (FN).
- ``"authors"``: ESPNet's protocol: void rows are kept, so void pixels predicted as ``c`` are false
  positives of ``c``; a valid pixel predicted void is a miss; void's own IoU is left out.

In both, IoU is averaged over the classes present in the ground truth or the prediction
(``TP + FP + FN > 0``), class accuracy (recall) over the classes present in the ground truth, and
pixel accuracy is over pixels with valid ground truth.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from detseg.errors import DetsegError

CONVENTIONS = ("standard", "authors")


def _as_long(x: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    """Integer label map (any shape) -> flat int64 tensor on its own device."""
    t = torch.as_tensor(x)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise DetsegError(f"{what} must hold integer class ids, got dtype {t.dtype}.")
    return t.reshape(-1).long()


class ConfusionMatrix:
    """Accumulates ``cm[gt, pred]`` over a dataset and derives mIoU, per-class IoU and accuracies.

    Args:
        num_classes: number of valid classes ``C``; ids ``0..C-1``.
        ignore_index: label id of void / unlabelled pixels (CamVid 11, VOC 255), or None. It must
            not be a valid id: ``ConfusionMatrix(11, ignore_index=11)`` for CamVid.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index {ignore_index} is a valid class id for num_classes={num_classes}; "
                "num_classes counts the valid classes only"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        size = num_classes + (ignore_index is not None)
        self.matrix = torch.zeros(size, size, dtype=torch.int64)  # (K, K) cm[gt, pred]

    @classmethod
    def from_matrix(
        cls, matrix: np.ndarray | torch.Tensor, ignore_index: int | None = None
    ) -> ConfusionMatrix:
        """Wrap a stored ``cm[gt, pred]`` (void last when ``ignore_index`` is given)."""
        m = torch.as_tensor(np.asarray(matrix), dtype=torch.int64)
        num_classes = m.shape[0] - (ignore_index is not None)
        cm = cls(num_classes, ignore_index)
        if m.shape != cm.matrix.shape:
            raise ValueError(f"expected a square matrix, got shape {tuple(m.shape)}")
        cm.matrix = m.clone()
        return cm

    def reset(self) -> None:
        self.matrix.zero_()

    def _to_index(self, labels: torch.Tensor, what: str) -> torch.Tensor:
        """Map ids to matrix rows/columns (void -> ``C``), refusing anything else."""
        if self.ignore_index is not None:
            labels = torch.where(labels == self.ignore_index, self.num_classes, labels)
        bad = (labels < 0) | (labels >= self.matrix.shape[0])
        if bool(bad.any()):
            value = int(labels[bad][0])
            allowed = f"0..{self.num_classes - 1}"
            if self.ignore_index is not None:
                allowed += f" or {self.ignore_index} (ignored)"
            raise DetsegError(
                f"{what} contains class id {value}, outside {allowed}; check the number of "
                "classes and the ignore index of the dataset."
            )
        return labels

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> None:
        """Add one batch: ``pred`` and ``target`` integer label maps of the same shape, e.g. (N, H, W).

        Raises:
            DetsegError: shapes differ, non-integer dtypes, or ids outside the valid range.
        """
        if tuple(pred.shape) != tuple(target.shape):
            raise DetsegError(
                f"prediction shape {tuple(pred.shape)} differs from label shape "
                f"{tuple(target.shape)}; predictions must be at label resolution."
            )
        p = self._to_index(_as_long(pred, "prediction"), "prediction")
        t = self._to_index(_as_long(target, "label map"), "label map")
        k = self.matrix.shape[0]
        counts = torch.bincount(t * k + p.to(t.device), minlength=k * k)
        self.matrix += counts.reshape(k, k).cpu()

    def compute(self, convention: str = "standard") -> dict[str, Any]:
        """Metrics in percent; classes undefined under the rules above are None in the lists.

        Returns:
            ``mIoU``, ``per_class_IoU`` (list of C), ``pixel_acc``, ``mean_class_acc``,
            ``per_class_acc`` (list of C), ``num_pixels`` (pixels with valid ground truth),
            ``convention``.
        """
        if convention not in CONVENTIONS:
            raise DetsegError(
                f"unknown metric convention {convention!r}; use one of {', '.join(CONVENTIONS)}."
            )
        cm = self.matrix.double()
        c = self.num_classes
        tp = cm.diagonal()[:c]
        gt = cm[:c].sum(1)  # all predictions of valid pixels, void column included
        rows = cm if convention == "authors" else cm[:c]
        predicted = rows.sum(0)[:c]
        union = gt + predicted - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
        recall = torch.where(gt > 0, tp / gt.clamp(min=1), torch.nan)
        valid = gt.sum()
        return {
            "mIoU": _nanmean_percent(iou),
            "per_class_IoU": _percent_list(iou),
            "pixel_acc": float(100 * tp.sum() / valid) if valid > 0 else None,
            "mean_class_acc": _nanmean_percent(recall),
            "per_class_acc": _percent_list(recall),
            "num_pixels": int(valid),
            "convention": convention,
        }


def _nanmean_percent(values: torch.Tensor) -> float | None:
    kept = values[~values.isnan()]
    return float(100 * kept.mean()) if kept.numel() else None


def _percent_list(values: torch.Tensor) -> list[float | None]:
    return [None if bool(v.isnan()) else float(100 * v) for v in values]

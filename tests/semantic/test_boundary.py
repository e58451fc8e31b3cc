"""Boundary F-score on hand-made label maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detseg.semantic.boundary import BoundaryF, boundaries


def test_boundaries_mark_both_sides() -> None:
    labels = np.zeros((3, 4), np.int64)
    labels[:, 2:] = 1
    assert boundaries(torch.as_tensor(labels)).int().tolist() == [[0, 1, 1, 0]] * 3


def test_perfect_shifted_and_void() -> None:
    gt = np.zeros((20, 20), np.int64)
    gt[:, 10:] = 1
    metric = BoundaryF(tolerance=1)
    metric.update(gt, gt)
    assert metric.compute()["BF"] == pytest.approx(100.0)
    shifted = np.zeros_like(gt)
    shifted[:, 13:] = 1  # 3 px away: outside a 1 px tolerance, inside 3 px
    far, near = BoundaryF(tolerance=1), BoundaryF(tolerance=3)
    far.update(shifted, gt)
    near.update(shifted, gt)
    assert far.compute()["BF"] == 0.0 and near.compute()["BF"] == pytest.approx(100.0)
    # a wrong prediction on void ground truth does not count
    void = gt.copy()
    void[:, 14:] = 255
    noisy = gt.copy()
    noisy[5:8, 16:18] = 0
    metric = BoundaryF(tolerance=0, ignore_index=255)
    metric.update(noisy, void)
    assert metric.compute()["BF"] == pytest.approx(100.0)

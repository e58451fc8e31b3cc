"""Closed-form / KNN baseline: solves a synthetic matte, respects the trimap, checks inputs."""

from __future__ import annotations

import numpy as np
import pytest

from detseg.errors import DetsegError
from detseg.matting.classic import classic_matte
from detseg.matting.composite import alpha_composite, trimap_from_alpha


def _scene() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:40, :40]
    alpha = np.clip((14 - np.hypot(yy - 20, xx - 20)) / 4, 0, 1)
    fg = np.zeros((40, 40, 3)) + [230, 40, 40]
    bg = np.zeros((40, 40, 3)) + [20, 60, 200]
    return np.round(alpha_composite(fg, bg, alpha)).astype(np.uint8), alpha


@pytest.mark.parametrize("method", ["closed-form", "knn"])
def test_solves_synthetic_matte(method: str) -> None:
    image, alpha = _scene()
    trimap = trimap_from_alpha(np.round(alpha * 255).astype(np.uint8), 5)
    pred = classic_matte(image, trimap, method)
    assert np.abs(pred - alpha)[trimap == 128].mean() < 0.05
    assert (pred[trimap == 255] == 1).all() and (pred[trimap == 0] == 0).all()


def test_downscaled_solve_keeps_size() -> None:
    image, alpha = _scene()
    trimap = trimap_from_alpha(np.round(alpha * 255).astype(np.uint8), 5)
    pred = classic_matte(image, trimap, max_side=20)
    assert pred.shape == alpha.shape and np.abs(pred - alpha).mean() < 0.05


def test_input_errors() -> None:
    image, _ = _scene()
    with pytest.raises(DetsegError, match="unknown"):
        classic_matte(image, np.zeros((40, 40), np.uint8))
    with pytest.raises(DetsegError, match="sizes differ"):
        classic_matte(image, np.zeros((10, 10), np.uint8))
    with pytest.raises(DetsegError, match="method"):
        classic_matte(image, np.full((40, 40), 128, np.uint8), "magic")

"""Classical trimap-based matting baselines on pymatting: closed-form (Levin et al. 2008) and KNN.

These solve a sparse linear system per image (conjugate gradients, pymatting's default
incomplete-Cholesky preconditioner for closed-form); cost grows with the number of pixels, so
``max_side`` can downscale large images first (the alpha is resized back).
"""

from __future__ import annotations

import cv2
import numpy as np

from detseg.errors import DetsegError

METHODS = ("closed-form", "knn")


def _solver(method: str):
    import pymatting

    if method == "closed-form":
        return pymatting.estimate_alpha_cf
    if method == "knn":
        return pymatting.estimate_alpha_knn
    raise DetsegError(f"unknown classical matting method {method!r}; use one of {METHODS}.")


def classic_matte(
    image: np.ndarray,
    trimap: np.ndarray,
    method: str = "closed-form",
    max_side: int | None = None,
) -> np.ndarray:
    """Alpha from an image and a trimap.

    Args:
        image: (H, W, 3) uint8 RGB.
        trimap: (H, W) uint8, 0 = background, 128 (any value strictly between) = unknown,
            255 = foreground.
        method: ``"closed-form"`` or ``"knn"``.
        max_side: if set and the longer side exceeds it, solve at that size (INTER_AREA for the
            image, nearest for the trimap) and resize the alpha back bilinearly.

    Returns:
        (H, W) float64 alpha in [0, 1], exactly 0 / 1 in the trimap's known regions.
    """
    solve = _solver(method)
    if image.shape[:2] != trimap.shape[:2] or image.ndim != 3:
        raise DetsegError(
            f"image {image.shape} and trimap {trimap.shape} sizes differ; give the trimap made for "
            "this image."
        )
    if not ((trimap > 0) & (trimap < 255)).any():
        raise DetsegError("the trimap has no unknown (grey) region; nothing to solve.")
    h, w = trimap.shape
    scale = 1.0 if max_side is None else min(1.0, max_side / max(h, w))
    img, tri = image, trimap
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        tri = cv2.resize(trimap, size, interpolation=cv2.INTER_NEAREST)
    alpha = solve(img.astype(np.float64) / 255.0, tri.astype(np.float64) / 255.0)
    if scale < 1.0:
        alpha = cv2.resize(alpha, (w, h), interpolation=cv2.INTER_LINEAR)
    alpha = np.clip(alpha, 0.0, 1.0)
    alpha[trimap == 0] = 0.0
    alpha[trimap == 255] = 1.0
    return alpha

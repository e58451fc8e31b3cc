"""Matting metrics: SAD, MSE, MAD, gradient and connectivity errors, under two conventions.

All functions take alpha mattes as (H, W) arrays in [0, 1] (float, or uint8 which is divided by
255) and trimaps as (H, W) uint8 with 0 = background, 128 = unknown, 255 = foreground.

``convention="gfm"`` (default) is the official GFM evaluation (``JizhiziLi/GFM core/evaluate.py``):
- whole image; SAD = sum|d| / 1000, MSE = sum d^2 / P, MAD = sum|d| / P (P pixels);
- Grad = sum (|grad pred| - |grad gt|)^2 / 10, gradients by ``scipy.ndimage.gaussian_filter``
  derivatives (sigma 1.4, reflect borders, float32 maps), no rescaling of the mattes;
- Conn = sum |phi(pred) - phi(gt)| / 1000 (thresholds 0, 0.1, ..., 1; 4-connectivity);
- with a trimap also SAD_trimap / MSE_trimap / MAD_trimap (prediction forced to the trimap in
  known regions, SAD over the whole image, MSE and MAD per unknown pixel) and SAD_fg / SAD_bg
  (raw prediction, /1000).

``convention="dim"`` is the Deep Image Matting MATLAB evaluation (Xu et al. 2017), used by
trimap-based methods: every error is summed over the unknown region only; SAD / 1000, MSE and MAD
per unknown pixel, Grad on min-max normalised mattes with a 9x9 unit-L2 derivative-of-Gaussian
kernel (sigma 1.4, replicate borders) / 1000, Conn / 1000. The DIM scripts read 8-bit PNGs;
``evaluate_folder`` does too, the array functions use the values they are given.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.measure import label

from detseg.data.images import list_images, read_image
from detseg.errors import DetsegError, InputFileError

CONVENTIONS = ("gfm", "dim")
UNKNOWN, FOREGROUND, BACKGROUND = 128, 255, 0


def _as_alpha(x: np.ndarray) -> np.ndarray:
    """(H, W) float64 in [0, 1] from uint8 (/255) or float input."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"alpha mattes must be (H, W), got shape {x.shape}")
    return x / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def _region(trimap: np.ndarray | None, value: int, shape: tuple[int, ...]) -> np.ndarray:
    if trimap is None:
        return np.ones(shape, dtype=bool)
    return np.asarray(trimap) == value


def sad(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Sum of absolute differences over ``mask`` (default: whole image), divided by 1000."""
    d = np.abs(_as_alpha(pred) - _as_alpha(gt))
    return float(d[mask].sum() if mask is not None else d.sum()) / 1000.0


def mse(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean squared difference over ``mask`` (default: whole image); 0 for an empty mask."""
    d = (_as_alpha(pred) - _as_alpha(gt)) ** 2
    d = d[mask] if mask is not None else d
    return float(d.sum() / d.size) if d.size else 0.0


def mad(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute difference over ``mask`` (default: whole image); 0 for an empty mask."""
    d = np.abs(_as_alpha(pred) - _as_alpha(gt))
    d = d[mask] if mask is not None else d
    return float(d.sum() / d.size) if d.size else 0.0


def _gfm_gradient_magnitude(x: np.ndarray, sigma: float) -> np.ndarray:
    gx = ndimage.gaussian_filter(x, sigma, order=(1, 0), output=np.float32)
    gy = ndimage.gaussian_filter(x, sigma, order=(0, 1), output=np.float32)
    return np.sqrt(gx**2 + gy**2)


def dim_gradient_kernel(sigma: float = 1.4) -> np.ndarray:
    """DIM's derivative-of-Gaussian kernel hx (derivative along columns), unit L2 norm.

    Half size ceil(sigma * sqrt(-2 ln(sqrt(2 pi) sigma 0.01))) (4 for sigma 1.4, i.e. 9x9).
    """
    half = math.ceil(sigma * math.sqrt(-2.0 * math.log(math.sqrt(2 * math.pi) * sigma * 1e-2)))
    u = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-(u**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    dg = -u * g / sigma**2
    hx = g[:, None] * dg[None, :]
    return hx / np.sqrt((hx**2).sum())


def _mat2gray(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _dim_gradient_magnitude(x: np.ndarray, sigma: float) -> np.ndarray:
    hx = dim_gradient_kernel(sigma)
    x = _mat2gray(x)
    gx = ndimage.convolve(x, hx, mode="nearest")
    gy = ndimage.convolve(x, hx.T, mode="nearest")
    return np.sqrt(gx**2 + gy**2)


def gradient_error(
    pred: np.ndarray,
    gt: np.ndarray,
    mask: np.ndarray | None = None,
    convention: str = "gfm",
    sigma: float = 1.4,
) -> float:
    """Sum over ``mask`` of (|grad pred| - |grad gt|)^2, /10 (gfm) or /1000 (dim); see module doc."""
    _check_convention(convention)
    magnitude = _gfm_gradient_magnitude if convention == "gfm" else _dim_gradient_magnitude
    err = (magnitude(_as_alpha(pred), sigma) - magnitude(_as_alpha(gt), sigma)) ** 2
    total = err[mask].sum() if mask is not None else err.sum()
    return float(total) / (10.0 if convention == "gfm" else 1000.0)


def _connectivity_levels(
    pred: np.ndarray, gt: np.ndarray, step: float, dtype: type[np.floating]
) -> np.ndarray:
    """Per pixel, the last threshold at which it was still connected to the largest common blob."""
    thresholds = np.arange(0, 1 + step, step)
    level = np.full(pred.shape, -1.0, dtype=dtype)
    for i in range(1, len(thresholds)):
        components = label((pred >= thresholds[i]) & (gt >= thresholds[i]), connectivity=1)
        sizes = np.bincount(components.ravel())[1:]
        if sizes.size == 0:
            continue
        largest = components == (int(np.argmax(sizes)) + 1)
        level[(level == -1) & ~largest] = thresholds[i - 1]
    level[level == -1] = 1.0
    return level


def connectivity_error(
    pred: np.ndarray,
    gt: np.ndarray,
    mask: np.ndarray | None = None,
    step: float = 0.1,
    convention: str = "gfm",
) -> float:
    """Sum over ``mask`` of |phi(pred) - phi(gt)| / 1000, phi(x) = 1 - (x - l)[x - l >= 0.15].

    ``l`` is the connectivity level map; GFM stores it in float32, DIM (MATLAB) in float64.
    """
    _check_convention(convention)
    p, g = _as_alpha(pred), _as_alpha(gt)
    level = _connectivity_levels(p, g, step, np.float32 if convention == "gfm" else np.float64)
    dp, dg = p - level, g - level
    err = np.abs((1 - dp * (dp >= 0.15)) - (1 - dg * (dg >= 0.15)))
    return float(err[mask].sum() if mask is not None else err.sum()) / 1000.0


def trimap_sad_mse_mad(
    pred: np.ndarray, gt: np.ndarray, trimap: np.ndarray
) -> tuple[float, float, float]:
    """GFM's trimap SAD/MSE/MAD: prediction forced to 1 (fg) / 0 (bg) in the known regions.

    SAD is summed over the whole image (/1000); MSE and MAD are divided by the number of unknown
    pixels (falling back, as the official code does, to the count of pixels that are neither 0
    nor 255 when there is none).
    """
    p, g, t = _as_alpha(pred).copy(), _as_alpha(gt), np.asarray(trimap)
    p[t == FOREGROUND] = 1.0
    p[t == BACKGROUND] = 0.0
    d = p - g
    count = int((t == UNKNOWN).sum()) or int(t.size - (t == FOREGROUND).sum() - (t == 0).sum())
    if count == 0:
        return float(np.abs(d).sum()) / 1000.0, 0.0, 0.0
    return (
        float(np.abs(d).sum()) / 1000.0,
        float((d**2).sum()) / count,
        float(np.abs(d).sum()) / count,
    )


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise DetsegError(
            f"unknown matting metric convention {convention!r}; use one of {CONVENTIONS}."
        )


def evaluate_matte(
    pred: np.ndarray, gt: np.ndarray, trimap: np.ndarray | None = None, convention: str = "gfm"
) -> dict[str, float]:
    """All metrics of one matte: ``SAD, MSE, MAD, Grad, Conn`` and, given a trimap, ``SAD_fg,
    SAD_bg`` plus (gfm) ``SAD_trimap, MSE_trimap, MAD_trimap``. The dim convention needs a trimap.
    """
    _check_convention(convention)
    if np.shape(pred) != np.shape(gt) or (trimap is not None and np.shape(trimap) != np.shape(gt)):
        raise DetsegError(
            f"matte sizes differ: prediction {np.shape(pred)}, ground truth {np.shape(gt)}"
            + (f", trimap {np.shape(trimap)}" if trimap is not None else "")
            + "; predictions must be saved at the ground-truth resolution."
        )
    if convention == "dim" and trimap is None:
        raise DetsegError("the dim convention scores the trimap's unknown region: give a trimap.")
    region = _region(trimap, UNKNOWN, np.shape(gt)) if convention == "dim" else None
    out = {
        "SAD": sad(pred, gt, region),
        "MSE": mse(pred, gt, region),
        "MAD": mad(pred, gt, region),
        "Grad": gradient_error(pred, gt, region, convention),
        "Conn": connectivity_error(pred, gt, region, convention=convention),
    }
    if trimap is not None:
        if convention == "gfm":
            out["SAD_trimap"], out["MSE_trimap"], out["MAD_trimap"] = trimap_sad_mse_mad(
                pred, gt, trimap
            )
        out["SAD_fg"] = sad(pred, gt, _region(trimap, FOREGROUND, np.shape(gt)))
        out["SAD_bg"] = sad(pred, gt, _region(trimap, BACKGROUND, np.shape(gt)))
    return out


def read_matte(path: str | Path) -> np.ndarray:
    """(H, W) uint8 from a matte or trimap image (first channel of an RGB/palette file)."""
    return read_image(path)[..., 0]


def _by_stem(folder: str | Path, what: str) -> dict[str, Path]:
    if not Path(folder).is_dir():
        raise InputFileError(f"{what} folder {folder} does not exist; give a folder of PNG files.")
    files = {p.stem: p for p in list_images(folder)}
    if not files:
        raise InputFileError(f"{what} folder {folder} holds no images.")
    return files


def evaluate_folder(
    pred_dir: str | Path,
    alpha_dir: str | Path,
    trimap_dir: str | Path | None = None,
    convention: str = "gfm",
) -> dict:
    """Score every prediction in ``pred_dir`` against the same-named ground truth.

    Files are matched by name without extension (``GT01.png`` <-> ``GT01.png``/``GT01.jpg``).
    Returns ``{"convention", "count", "mean": {metric: float}, "per_image": {name: {...}}}``;
    the mean is the plain average over images, as the GFM and DIM scripts report.

    Raises:
        DetsegError: unknown convention, a prediction without ground truth (or trimap), sizes that
            differ, or an empty folder.
    """
    _check_convention(convention)
    preds = _by_stem(pred_dir, "prediction")
    alphas = _by_stem(alpha_dir, "ground-truth alpha")
    trimaps = _by_stem(trimap_dir, "trimap") if trimap_dir is not None else None
    missing = sorted(set(preds) - set(alphas))
    if trimaps is not None:
        missing += sorted(f"{n} (trimap)" for n in set(preds) - set(trimaps))
    if missing:
        raise DetsegError(
            f"{len(missing)} prediction(s) have no same-named ground truth, e.g. {missing[0]}; "
            f"name each prediction like its alpha in {alpha_dir}."
        )
    per_image = {}
    for name in sorted(preds):
        trimap = read_matte(trimaps[name]) if trimaps is not None else None
        try:
            per_image[name] = evaluate_matte(
                read_matte(preds[name]), read_matte(alphas[name]), trimap, convention
            )
        except DetsegError as exc:
            raise DetsegError(f"{name}: {exc}") from exc
    keys = next(iter(per_image.values())).keys()
    mean = {k: float(np.mean([m[k] for m in per_image.values()])) for k in keys}
    return {"convention": convention, "count": len(per_image), "mean": mean, "per_image": per_image}

"""Composition for matting training: plain alpha blending, GFM's RSSN route, trimaps from alpha.

RSSN (GFM, Li et al. IJCV 2022, section "RSSN"; official ``core/util.py``) makes composites look
less synthetic: background resized to the foreground, optional denoising of both layers (the paper
uses BM3D offline; here OpenCV's non-local means, ``cv2.fastNlMeansDenoisingColored``, is the
fast stand-in unless denoised copies are passed in), a box blur of the background with a random
kernel (depth of field), and one Gaussian noise field shared by composite, foreground and
background. Each step has its own probability (0 switches it off) and all randomness comes from
the ``numpy.random.Generator`` the caller passes, so a seed reproduces a sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from skimage.transform import resize

from detseg.errors import DetsegError


def alpha_composite(fg: np.ndarray, bg: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """alpha * fg + (1 - alpha) * bg.

    Args:
        fg, bg: (H, W, 3) float or uint8 in the same value range.
        alpha: (H, W) float in [0, 1].

    Returns:
        (H, W, 3) float64 composite in the range of ``fg``/``bg``.
    """
    if fg.shape != bg.shape or fg.shape[:2] != alpha.shape:
        raise DetsegError(
            f"foreground {fg.shape}, background {bg.shape} and alpha {alpha.shape} must have "
            "the same height and width; resize the background first."
        )
    a = alpha.astype(np.float64)[..., None]
    return a * fg + (1.0 - a) * bg


def _ellipse(kernel: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel, kernel))


def dilate_mask(alpha: np.ndarray, kernel: int = 50) -> np.ndarray:
    """255 * dilate([alpha > 0]) with a ``kernel`` x ``kernel`` ellipse; (H, W) uint8 in {0, 255}."""
    return 255 * cv2.dilate((alpha > 0).astype(np.uint8), _ellipse(kernel))


def erode_mask(alpha: np.ndarray, kernel: int = 50) -> np.ndarray:
    """255 * erode([alpha == 255]) with a ``kernel`` x ``kernel`` ellipse; (H, W) uint8 in {0, 255}."""
    return 255 * cv2.erode((alpha == 255).astype(np.uint8), _ellipse(kernel))


def trimap_from_alpha(alpha: np.ndarray, kernel: int = 25) -> np.ndarray:
    """Trimap (H, W) uint8 in {0, 128, 255}: unknown = dilate(alpha > 0) minus erode(alpha == 255).

    ``alpha`` is (H, W) uint8 (0..255). GFM uses kernel 25 for its TT training trimap.
    """
    unknown = dilate_mask(alpha, kernel) // 255
    sure = erode_mask(alpha, kernel) // 255
    return (255 * sure + 128 * (unknown - sure)).astype(np.uint8)


def estimate_foreground(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Foreground colours for compositing, pymatting's multilevel ``estimate_foreground_ml``.

    Args:
        image: (H, W, 3) uint8 RGB photo.
        alpha: (H, W) float in [0, 1] or uint8.

    Returns:
        (H, W, 3) uint8 RGB foreground.
    """
    from pymatting import estimate_foreground_ml

    a = alpha / 255.0 if alpha.dtype == np.uint8 else alpha.astype(np.float64)
    fg = estimate_foreground_ml(image.astype(np.float64) / 255.0, a)
    return np.clip(np.round(fg * 255.0), 0, 255).astype(np.uint8)


def denoise_nlm(image: np.ndarray, strength: float = 3.0) -> np.ndarray:
    """OpenCV non-local means on an (H, W, 3) uint8 RGB image (stand-in for BM3D)."""
    return cv2.fastNlMeansDenoisingColored(image, None, strength, strength, 7, 21)


def wrap_uint8(x: np.ndarray) -> np.ndarray:
    """``np.uint8(x)`` as the official code gets it: truncate towards zero, wrap modulo 256."""
    return np.mod(np.trunc(x).astype(np.int64), 256).astype(np.uint8)


@dataclass(frozen=True)
class RSSNConfig:
    """Probabilities and parameters of the RSSN steps (official values as defaults).

    ``p_denoise`` uses the caller's denoised copies when given, otherwise ``denoise_nlm``
    (set ``p_denoise=0`` to skip denoising, e.g. when no BM3D copies exist and NLM is too slow).
    """

    p_denoise: float = 0.5
    p_blur: float = 0.5
    blur_kernels: tuple[int, ...] = (20, 30, 40, 50, 60)
    p_noise: float = 0.5
    noise_sigma: float = 10.0
    nlm_strength: float = 3.0


@dataclass
class RSSNSample:
    """One composite: ``image``, ``fg``, ``bg`` (H, W, 3) uint8 and the steps that ran."""

    image: np.ndarray
    fg: np.ndarray
    bg: np.ndarray
    steps: dict[str, float] = field(default_factory=dict)


def rssn_composite(
    fg: np.ndarray,
    bg: np.ndarray,
    alpha: np.ndarray,
    rng: np.random.Generator,
    config: RSSNConfig = RSSNConfig(),
    denoised: tuple[np.ndarray, np.ndarray] | None = None,
) -> RSSNSample:
    """RSSN composition of ``fg`` (H, W, 3) uint8 over ``bg`` (any size, uint8) with alpha (H, W).

    Steps, in the official order: (1) bg resized to (H, W) with skimage ``resize`` (bilinear,
    anti-aliased); (2) with ``p_denoise`` fg and bg replaced by denoised copies; (3) with
    ``p_blur`` bg box-blurred (``cv2.blur``) with k drawn from ``blur_kernels``; (4) composite
    alpha*fg + (1-alpha)*bg truncated to uint8; (5) with ``p_noise`` one N(0, sigma^2) field
    added to composite, fg and bg, wrapping modulo 256 like the official ``np.uint8(x + noise)``.
    ``alpha`` is float in [0, 1] or uint8. Returned fg/bg are what the composition loss uses.
    """
    a = alpha / 255.0 if alpha.dtype == np.uint8 else alpha.astype(np.float64)
    h, w = fg.shape[:2]
    steps: dict[str, float] = {}
    fg_out = fg.astype(np.float64)
    bg_src = bg
    if rng.random() < config.p_denoise:
        fg_d, bg_src = denoised or (
            denoise_nlm(fg, config.nlm_strength),
            denoise_nlm(bg, config.nlm_strength),
        )
        fg_out = fg_d.astype(np.float64)
        steps["denoise"] = 1.0
    bg_out = resize(bg_src, (h, w, 3)) * 255.0
    if rng.random() < config.p_blur:
        k = int(rng.choice(config.blur_kernels))
        bg_out = cv2.blur(bg_out, (k, k))
        steps["blur_kernel"] = float(k)
    image = alpha_composite(fg_out, bg_out, a)
    if rng.random() < config.p_noise:
        noise = rng.normal(0.0, config.noise_sigma, image.shape)
        steps["noise_sigma"] = config.noise_sigma
        return RSSNSample(
            wrap_uint8(np.trunc(image) + noise),
            wrap_uint8(fg_out + noise),
            wrap_uint8(bg_out + noise),
            steps,
        )
    return RSSNSample(wrap_uint8(image), wrap_uint8(fg_out), wrap_uint8(bg_out), steps)

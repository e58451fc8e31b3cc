"""Reading and writing images and label maps, with clear errors and a pixel-count cap."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from detseg.errors import ImageTooLargeError, InputFileError
from detseg.fileio import atomic_output

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 250_000_000  # ~ 16k x 16k; DETSEG_MAX_PIXELS overrides
RAISE_CAP = "raise DETSEG_MAX_PIXELS if the file is trusted"


def max_pixels() -> int:
    """The decompression-bomb cap: images with more pixels than this are refused unread."""
    return int(os.environ.get("DETSEG_MAX_PIXELS", DEFAULT_MAX_PIXELS))


def _open_checked(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file.")
    if not path.is_file():
        raise InputFileError(f"{path}: is not a file.")
    if path.stat().st_size == 0:
        raise InputFileError(f"{path}: the file is empty (0 bytes).")
    return _open_source(path, str(path))


def _open_source(
    source: str | Path | BinaryIO,
    name: str,
    limit: int | None = None,
    advice: str = RAISE_CAP,
) -> Image.Image:
    """Open (header only) with our pixel cap (``limit``, default ``max_pixels()``)."""
    limit = max_pixels() if limit is None else limit
    Image.MAX_IMAGE_PIXELS = None  # our own cap below, checked before any decoding
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(source)
    except (UnidentifiedImageError, OSError) as exc:
        reason = exc if isinstance(source, (str, Path)) else "no known image format"
        raise InputFileError(f"{name}: not a readable image ({reason}).") from exc
    w, h = img.size
    if w == 0 or h == 0:
        raise InputFileError(f"{name}: the image has zero size ({w}x{h}).")
    if w * h > limit:
        raise ImageTooLargeError(
            f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {limit:,} "
            f"(possible decompression bomb); {advice}."
        )
    return img


def _decode(img: Image.Image, path: str | Path, mode: str | None) -> np.ndarray:
    try:
        img.load()
        if mode is not None and img.mode != mode:
            img = img.convert(mode)
        return np.asarray(img)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputFileError(f"{path}: the image data is truncated or corrupt ({exc}).") from exc


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) read from the header only (still applies the checks)."""
    return _open_checked(path).size


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB. Raises ``InputFileError`` for missing, empty, corrupt or huge files."""
    return _to_rgb(_open_checked(path), path)


def decode_image(
    data: bytes, name: str = "image", limit: int | None = None, advice: str = RAISE_CAP
) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) -> (H, W, 3) uint8 RGB.

    ``limit``: the pixel cap (default ``max_pixels()``), checked from the header before decoding;
    ``advice``: what the error above it tells the user to do.

    Raises:
        InputFileError: empty, not an image, truncated; ``ImageTooLargeError`` above ``limit``.
    """
    if not data:
        raise InputFileError(f"{name}: empty (0 bytes).")
    return _to_rgb(_open_source(io.BytesIO(data), name, limit, advice), name)


def _to_rgb(img: Image.Image, path: str | Path) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I", "F"):
        arr = _decode(img, path, None).astype(np.float64)
        arr = np.clip(arr / max(float(arr.max()), 1.0) * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    return _decode(img, path, "RGB")


def read_label(path: str | Path) -> np.ndarray:
    """(H, W) uint8 class ids from a grayscale or palette (VOC-style) PNG; the palette is ignored."""
    img = _open_checked(path)
    if img.mode not in ("L", "P", "I;16", "I"):
        raise InputFileError(
            f"{path}: a label map must be a single-channel or palette PNG of class ids, "
            f"not mode {img.mode}."
        )
    arr = _decode(img, path, None)
    if arr.max(initial=0) > 255:
        raise InputFileError(f"{path}: label values above 255 are not supported.")
    return arr.astype(np.uint8)


def write_image(path: str | Path, image: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Write (H, W, 3|4) uint8 or (H, W) uint8 atomically; ``palette`` (256, 3) makes a P-mode PNG."""
    img = Image.fromarray(image)
    if palette is not None:
        if img.mode != "L":
            raise ValueError("a palette applies to (H, W) uint8 label maps only")
        img = img.convert("P")
        img.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
    with atomic_output(path) as tmp:
        img.save(tmp, format=_format_for(Path(path)))


def _format_for(path: Path) -> str:
    ext = path.suffix.lower()
    return {
        ".jpg": "JPEG",
        ".jpeg": "JPEG",
        ".png": "PNG",
        ".bmp": "BMP",
        ".tif": "TIFF",
        ".tiff": "TIFF",
        ".webp": "WEBP",
    }.get(ext, "PNG")


def list_images(source: str | Path) -> list[Path]:
    """A file, a folder (its images, sorted) or a glob pattern -> image paths."""
    import glob

    src = str(source)
    p = Path(src)
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputFileError(f"{p}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        return files
    if p.exists():
        return [p]
    if any(ch in src for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(src, recursive=True))
        files = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise InputFileError(f"{src}: the pattern matches no images.")
        return files
    raise InputFileError(f"{src}: no such file or folder.")

"""Request images in, response bodies out: PNG encoding and the JSON of a ``Prediction``."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image

from detseg.predictor import Prediction


def png_bytes(array: np.ndarray) -> bytes:
    """PNG of an (H, W) uint8/uint16 map or an (H, W, 3|4) uint8 picture."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _b64_png(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array)).decode("ascii")


def label_map(labels: np.ndarray) -> np.ndarray:
    """(H, W) int64 class ids -> uint8, or uint16 when a class id passes 255."""
    dtype = np.uint8 if int(labels.max(initial=0)) < 256 else np.uint16
    return labels.astype(dtype)


def alpha_map(alpha: np.ndarray) -> np.ndarray:
    """(H, W) float alpha in [0, 1] -> (H, W) uint8."""
    return np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8)


def prediction_json(prediction: Prediction, model: str, elapsed_ms: float) -> dict[str, Any]:
    """The ``PredictionResponse`` body: the prediction's summary, and its maps as base64 PNGs."""
    out = {"model": model, **prediction.to_json(), "elapsed_ms": round(elapsed_ms, 2)}
    if prediction.labels is not None:
        out["label_map_png"] = _b64_png(label_map(prediction.labels))
    if prediction.alpha is not None:
        out["alpha_png"] = _b64_png(alpha_map(prediction.alpha))
    return out

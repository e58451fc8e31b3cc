"""Sliding-window semantic inference on a 4000x3000 photo: reference vs fast rows for bench/run.py.

Reference: the eager float32 model, one 512x512 window per forward pass (stride 341). Fast: the
fast path with 4 windows per pass (``sliding_window_predict``'s ``batch_size``); bf16 the same
under autocast. Outputs compared: the (H, W) softmax scores of the chosen classes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch

from bench.run import Row, compare, reduced_precision
from detseg.data.preprocess import Preprocess
from detseg.engine.fast import accelerate
from detseg.registry import get_entry
from detseg.semantic.sliding import sliding_window_predict

MODELS = ("espnet",)
SIZE = (3000, 4000)  # height, width


def sliding_rows(device: torch.device, quick: bool = False) -> Iterator[Row]:
    """One row per model of ``MODELS`` (``quick``: a 2000x1500 image)."""
    h, w = (SIZE[0] // 2, SIZE[1] // 2) if quick else SIZE
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    for name in MODELS:
        torch.manual_seed(0)
        model = get_entry(name).build().eval().to(device)
        classes = int(getattr(model, "num_classes", 0)) or _classes(model, device)
        nets = {
            "ref": (model, 1),
            "fast": (accelerate(model, name), 4),
            "bf16": (accelerate(model, name, reduced_precision(device)), 4),
        }
        paths = {
            key: functools.partial(_scores, net, image, classes, batch, device)
            for key, (net, batch) in nets.items()
        }
        yield compare(f"{name} sliding 512/341", f"{w}x{h}", paths, 1, device)


def _classes(model: torch.nn.Module, device: torch.device) -> int:
    with torch.inference_mode():
        return int(model(torch.zeros(1, 3, 64, 64, device=device)).shape[1])


def _scores(
    model: torch.nn.Module, image: np.ndarray, classes: int, batch: int, device: torch.device
) -> torch.Tensor:
    result = sliding_window_predict(
        model, image, Preprocess(), classes, crop=512, stride=341, batch_size=batch, device=device
    )
    return result.scores

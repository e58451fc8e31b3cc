"""Input normalisation, stored with every checkpoint so that weights and preprocessing travel together."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Preprocess:
    """``x = ((image[..., order] - mean) / std) * post_scale`` for a uint8 RGB image.

    Attributes:
        channel_order: "RGB" or "BGR": order of the network's input channels.
        mean, std: per channel, in 0..255 units and in ``channel_order``.
        post_scale: factor applied after standardisation (ESPNet's extra division by 255).
    """

    channel_order: str = "RGB"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    post_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Preprocess:
        if not d:
            return cls()
        return cls(
            channel_order=d["channel_order"],
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            post_scale=float(d["post_scale"]),
        )

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, H, W) float32 network input."""
        if self.channel_order == "BGR":
            image = image[..., ::-1]
        x = image.astype(np.float32)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.post_scale != 1.0:
            x = x * np.float32(self.post_scale)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

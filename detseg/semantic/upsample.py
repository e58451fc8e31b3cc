"""Bilinear transposed-convolution upsamplers (spec S2) shared by the FCN-VGG and GCN decoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bilinear_kernel(size: int) -> torch.Tensor:
    """(size, size) float32 Caffe/FCN bilinear kernel: ``(1 - |i - c| / f) (1 - |j - c| / f)``.

    ``f = ceil(size / 2)``; the centre ``c`` is ``f - 1`` for odd sizes and ``f - 1/2`` for even.
    """
    f = (size + 1) // 2
    c = f - 1 if size % 2 == 1 else f - 0.5
    r = 1 - (torch.arange(size, dtype=torch.float32) - c).abs() / f
    return r[:, None] * r[None, :]


class BilinearUpsample(nn.Module):
    """Depthwise ``conv_transpose2d`` with a bilinear kernel of size ``2 * scale``.

    ``padding=0`` is the Caffe deconvolution (n -> scale * n + scale, realigned by crops);
    ``padding=scale // 2`` maps n -> scale * n and equals bilinear interpolation away from the border.
    The kernel is a fixed buffer unless ``learnable`` (then a depthwise (C, 1, k, k) parameter).

    ``forward``: (N, C, h, w) -> (N, C, scale * (h - 1) + 2 * scale - 2 * padding, ...).
    """

    def __init__(
        self, channels: int, scale: int, padding: int = 0, learnable: bool = False
    ) -> None:
        super().__init__()
        self.channels, self.scale, self.padding = channels, scale, padding
        weight = bilinear_kernel(2 * scale).expand(channels, 1, -1, -1).clone()
        if learnable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
            # oneDNN has no fast bfloat16 kernel for depthwise transposed convolutions: on the
            # CPU FCN-32s's x32 upsampling of 21 channels took 220 ms in bfloat16 against 4 ms
            # in float32 (channels-last), GCN's x2 ones to 512x512 13 ms against 1.6. Under
            # autocast the upsampling runs in float32; what follows casts again as it needs.
            with torch.autocast(x.device.type, enabled=False):
                return self._upsample(x.float())
        return self._upsample(x)

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype)
        return F.conv_transpose2d(
            x, weight, stride=self.scale, padding=self.padding, groups=self.channels
        )

"""Adaptive average pooling that exports to ONNX with dynamic input sizes.

``torch.onnx.export`` turns ``adaptive_avg_pool2d`` to bins other than 1 into an ``AveragePool``
whose kernel is computed from the traced size, and refuses when the size is dynamic. Pyramid
pooling (PSPNet, GFM) needs bins 2, 3, 5, 6 at any size, so while exporting the pooling is written
as two averaging matrices, ``P_h @ x @ P_w^T``, built from the input's (traced) size with the same
bin edges as PyTorch: bin ``i`` of ``n`` over ``L`` covers ``[floor(i L / n), ceil((i + 1) L / n))``.
Eager execution keeps ``F.adaptive_avg_pool2d`` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bin_matrix(length: int | Tensor, bins: int, like: Tensor) -> Tensor:
    """(bins, length) matrix of ``like``'s dtype/device whose rows average each adaptive bin."""
    i = torch.arange(bins, device=like.device)
    start = torch.div(i * length, bins, rounding_mode="floor")
    end = torch.div((i + 1) * length + bins - 1, bins, rounding_mode="floor")
    r = torch.arange(length, device=like.device)
    inside = (r[None, :] >= start[:, None]) & (r[None, :] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


def adaptive_avg_pool2d_matmul(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.adaptive_avg_pool2d(x, size)`` for (N, C, H, W) ``x`` as two matrix products."""
    ph = bin_matrix(x.shape[-2], size[0], x)
    pw = bin_matrix(x.shape[-1], size[1], x)
    return torch.matmul(torch.matmul(ph, x), pw.transpose(0, 1))


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` whose ONNX export keeps H and W dynamic (same state dict: none)."""

    def forward(self, x: Tensor) -> Tensor:
        size = self.output_size
        pair = (size, size) if isinstance(size, int) else tuple(size)
        if torch.onnx.is_in_onnx_export() and None not in pair:
            return adaptive_avg_pool2d_matmul(x, pair)  # type: ignore[arg-type]
        return F.adaptive_avg_pool2d(x, size)

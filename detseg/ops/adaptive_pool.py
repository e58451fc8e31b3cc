"""Adaptive average pooling that exports to ONNX at a dynamic input size.

ONNX has no adaptive pooling (only the global one), and the TorchScript exporter turns
``F.adaptive_avg_pool2d`` into a fixed-kernel AveragePool that is right for the traced size only,
or refuses when the size does not divide. Here the same numbers come from two small matrix
products whose averaging weights are built from the input's size at run time: bin ``i`` of ``b``
over a side of length ``L`` averages ``[floor(i L / b), ceil((i + 1) L / b))``, as PyTorch does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bin_weights(side: torch.Tensor, bins: int) -> torch.Tensor:
    """Averaging weights of adaptive pooling along one side.

    Args:
        side: (L,) float, any values: only its length L and dtype are used (a slice of the
            input, so that the length stays dynamic in an exported graph).
        bins: output size b.

    Returns:
        (b, L) ``side.dtype``: row i is ``1 / (end_i - start_i)`` on ``[start_i, end_i)``, else 0.
    """
    positions = torch.ones_like(side, dtype=torch.long).cumsum(0) - 1  # (L,) 0 .. L-1
    length = positions[-1:] + 1  # (1,)
    i = torch.arange(bins, dtype=torch.long, device=side.device).unsqueeze(1)  # (b, 1)
    start = torch.div(i * length, bins, rounding_mode="floor")
    end = torch.div((i + 1) * length + bins - 1, bins, rounding_mode="floor")  # ceil
    inside = ((positions >= start) & (positions < end)).to(side.dtype)  # (b, L)
    return inside / inside.sum(1, keepdim=True)


def adaptive_avg_pool2d_matmul(x: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, output_size)`` as ``W_h @ x @ W_w^T`` (exports at any size).

    ``x``: (N, C, H, W) float -> (N, C, bh, bw), same dtype and device.
    """
    rows = bin_weights(x[0, 0, :, 0], output_size[0])  # (bh, H)
    cols = bin_weights(x[0, 0, 0, :], output_size[1])  # (bw, W)
    return rows @ x @ cols.transpose(0, 1)


class AdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` in eager mode; the matrix form while exporting to ONNX.

    Eager keeps PyTorch's kernel (faster, and what the FLOP counter knows); both compute the
    same bins (``tests/ops/test_adaptive_pool.py``). ``forward``: (N, C, H, W) -> (N, C, bh, bw).
    """

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.output_size = (
            (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return adaptive_avg_pool2d_matmul(x, self.output_size)
        return F.adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"

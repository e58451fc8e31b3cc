"""``F.linear`` through oneDNN: fully connected layers run as 1x1 convolutions on the CPU."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def linear_by_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (M, C_in), weight (C_out, C_in) or a 1x1 convolution's
    (C_out, C_in, 1[, 1]) -> (M, C_out), the same products summed in another order.

    On the CPU, x is viewed (without a copy when its rows are contiguous) as the M pixels of a
    (1, C_in, M, 1) channels-last map and convolved with the weight as a 1x1 kernel, which
    oneDNN runs at its GEMM rate; PyTorch's float32 ``F.linear`` goes to MKL, which on AMD
    CPUs reaches less than half of it (about 220 vs 500 GFLOP/s on this project's two-core
    EPYC), and a 1x1 ``conv1d`` (PointRend's point head) about 70. Elsewhere: ``F.linear``.
    """
    weight = weight.reshape(weight.shape[0], -1)
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    m, c = x.shape
    pixels = x.reshape(1, m, 1, c).permute(0, 3, 1, 2)
    out = F.conv2d(pixels, weight[:, :, None, None], bias)
    return out.permute(0, 2, 3, 1).reshape(m, -1)

"""linear_by_conv: F.linear through a 1x1 convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from detseg.ops.linear import linear_by_conv


def test_linear_by_conv_equals_linear() -> None:
    torch.manual_seed(0)
    x, weight, bias = torch.randn(37, 20), torch.randn(9, 20), torch.randn(9)
    expected = F.linear(x, weight, bias)
    torch.testing.assert_close(linear_by_conv(x, weight, bias), expected, atol=1e-5, rtol=1e-5)
    conv1d = weight[:, :, None]  # a 1x1 Conv1d's weight, no bias
    torch.testing.assert_close(linear_by_conv(x, conv1d), F.linear(x, weight), atol=1e-5, rtol=1e-5)
    strided = torch.randn(20, 37).t()  # rows not contiguous: copied, same result
    torch.testing.assert_close(
        linear_by_conv(strided, weight, bias), F.linear(strided, weight, bias), atol=1e-5, rtol=1e-5
    )

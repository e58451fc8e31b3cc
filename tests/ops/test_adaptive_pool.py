"""Adaptive average pooling as averaging matrices: equal to PyTorch's, and ONNX-exportable at any size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detseg.ops.adaptive_pool import AdaptiveAvgPool2d, adaptive_avg_pool2d_matmul, bin_matrix


def test_bin_matrix_hand_worked() -> None:
    # 5 cells into 3 bins: PyTorch's edges [0, 2), [1, 4), [3, 5) (bins overlap when L % n != 0)
    m = bin_matrix(5, 3, torch.zeros(1))
    want = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 1, 1]]) / torch.tensor(
        [[2.0], [3.0], [2.0]]
    )
    assert torch.allclose(m, want)


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 3), (5, 5), (6, 6), (3, 5)])
@pytest.mark.parametrize("hw", [(7, 9), (13, 5), (64, 48), (1, 3)])
def test_equals_adaptive_avg_pool(size, hw) -> None:
    x = torch.randn(2, 3, *hw)
    assert torch.allclose(
        adaptive_avg_pool2d_matmul(x, size), F.adaptive_avg_pool2d(x, size), atol=1e-6
    )


def test_onnx_export_keeps_sizes_dynamic(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pool = AdaptiveAvgPool2d((3, 5))
    path = tmp_path / "pool.onnx"
    torch.onnx.export(
        pool,
        (torch.randn(1, 2, 12, 20),),
        str(path),
        input_names=["x"],
        dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}},
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for hw in ((12, 20), (17, 23)):  # the traced size and another one, not divisible by the bins
        x = torch.randn(2, 2, *hw)
        (got,) = session.run(None, {"x": x.numpy()})
        assert np.abs(got - F.adaptive_avg_pool2d(x, (3, 5)).numpy()).max() < 1e-5

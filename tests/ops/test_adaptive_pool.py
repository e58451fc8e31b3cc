"""Adaptive average pooling as matrix products: PyTorch's bins, and an ONNX graph of any size."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from detseg.ops.adaptive_pool import AdaptiveAvgPool2d, adaptive_avg_pool2d_matmul, bin_weights


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (7, 11), (13, 13), (45, 61)])
@pytest.mark.parametrize("bins", [(1, 1), (2, 2), (3, 3), (6, 6), (2, 5)])
def test_matmul_form_equals_adaptive_avg_pool2d(size, bins):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    assert torch.allclose(adaptive_avg_pool2d_matmul(x, bins), F.adaptive_avg_pool2d(x, bins))


def test_bins_use_floor_and_ceil_boundaries():
    """L = 7, b = 3: [0, 3), [2, 5), [4, 7) (overlapping, as PyTorch's kernel)."""
    w = bin_weights(torch.zeros(7), 3)
    expected = torch.zeros(3, 7)
    for i, (start, end) in enumerate([(0, 3), (2, 5), (4, 7)]):
        expected[i, start:end] = 1 / (end - start)
    assert torch.equal(w, expected)
    assert torch.equal(bin_weights(torch.zeros(2), 3), torch.tensor([[1, 0], [0.5, 0.5], [0, 1]]))


def test_module_exports_one_graph_for_every_size(tmp_path):
    """Traced at 12 x 12 (bins divide it), run at sizes that they do not divide."""
    pool = AdaptiveAvgPool2d(6).eval()
    path = tmp_path / "pool.onnx"
    torch.onnx.export(
        pool,
        (torch.randn(1, 3, 12, 12),),
        str(path),
        dynamo=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in [(7, 11), (45, 61), (5, 3)]:
        x = torch.randn(2, 3, *size)
        (got,) = session.run(None, {"x": x.numpy()})
        assert abs(got - F.adaptive_avg_pool2d(x, 6).numpy()).max() < 1e-5

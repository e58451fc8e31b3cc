"""ONNX export of Mask R-CNN / PointRend raw head outputs against PyTorch (onnxruntime)."""

from __future__ import annotations

import pytest
import torch

from detseg.instance.maskrcnn import MaskRCNN
from detseg.instance.pointrend import PointRendRCNN
from detseg.instance.rcnn_export import export_rcnn


@pytest.mark.parametrize("cls", [MaskRCNN, PointRendRCNN])
def test_export_matches_pytorch(tmp_path, cls: type[MaskRCNN]) -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = cls(num_classes=2, backbone="mobilenet_v2", fpn_channels=16, box_fc_dim=32,
                mask_conv_dim=16)  # fmt: skip
    out = export_rcnn(model, tmp_path / "m.onnx", height=64, width=96)
    dense = 5 + 5 + 5  # p2..p6, objectness and deltas per level
    assert len(out["outputs"]) == dense and len(out["heads_outputs"]) == (
        4 if cls is PointRendRCNN else 3
    )
    assert len(out["max_abs_diff"]) == dense + len(out["heads_outputs"])
    assert max(out["max_abs_diff"].values()) < 1e-4, out["max_abs_diff"]

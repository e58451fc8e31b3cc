"""ONNX export of Mask R-CNN / PointRend up to their raw head outputs, in two graphs.

The data-dependent middle (proposal top-k and NMS, RoI level assignment, detection NMS, mask
pasting, adaptive subdivision) stays in Python, as in detectron2's own tracing-based export; the
graphs are the dense and the per-RoI computations around it:

- ``dense``: ``image`` (N, 3, H, W) BGR 0..255, H and W multiples of 32 -> p2..p6 FPN maps, the RPN
  objectness (N, A, H_l, W_l) and anchor deltas (N, 4A, H_l, W_l) of every level.
- ``heads``: RoI features -> box scores (R, K+1) and deltas (R, 4K) from ``box_features``
  (R, C, 7, 7), and mask logits: Mask R-CNN's (R, K, 28, 28) from ``mask_features`` (R, C, 14, 14);
  PointRend's coarse (R, K, 7, 7) from ``mask_features`` (its 14x14 p2 grid samples) and point
  logits (R, K, P) from ``fine_features`` (R, C, P) at box-normalised ``points`` (R, P, 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detseg.engine.export import export_model, export_with_inputs
from detseg.instance.maskrcnn import MaskRCNN
from detseg.instance.pointrend import PointRendMaskHead
from detseg.ops.point_sample import point_sample


class HeadStage(nn.Module):
    """Box and mask heads of ``model`` on given RoI features (see the module docstring)."""

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.roi_heads = model.roi_heads
        self.pointrend = isinstance(model.roi_heads.mask_head, PointRendMaskHead)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        box_features, mask_features = inputs[:2]
        heads = self.roi_heads
        scores, deltas = heads.box_predictor(heads.box_head(box_features))
        if not self.pointrend:
            return scores, deltas, heads.mask_head(mask_features)
        fine, points = inputs[2:]
        head = heads.mask_head
        coarse = head.coarse_head(mask_features)
        return scores, deltas, coarse, head.point_head(fine, point_sample(coarse, points))

    def example_inputs(self, num_rois: int = 3, num_points: int = 50) -> dict[str, Tensor]:
        """Random inputs of the right shapes: R = ``num_rois`` RoIs, ``num_points`` points."""
        c = self.roi_heads.box_head.fc1.in_features // 49
        inputs = {
            "box_features": torch.rand(num_rois, c, 7, 7),
            "mask_features": torch.rand(num_rois, c, 14, 14),
        }
        if self.pointrend:
            inputs["fine_features"] = torch.rand(num_rois, c, num_points)
            inputs["points"] = torch.rand(num_rois, num_points, 2)
        return inputs


def export_rcnn(
    model: MaskRCNN,
    path: str | Path,
    height: int = 256,
    width: int = 320,
    check: bool = True,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``path`` (the dense stage, ``MaskRCNN.onnx_spec``: ``RPNRawOutputs``) and
    ``<stem>.heads.onnx`` beside it (the head stage); ``metadata`` goes into the dense file.

    Returns the dense export's summary plus ``heads_path`` and ``heads_outputs``; the check
    compares onnxruntime with eager PyTorch on new inputs (another image size, another RoI and
    point count) and reports the max abs difference of every output of both graphs.
    """
    model = model.eval().float().cpu()
    dense = export_model(model, path, height, width, check=check, metadata=metadata)
    head_path = Path(path).with_suffix(".heads.onnx")
    stage = HeadStage(model)
    inputs = stage.example_inputs()
    axes = {name: {0: "rois"} for name in inputs}
    if stage.pointrend:
        axes["fine_features"][2] = axes["points"][1] = "points"
    heads = export_with_inputs(
        stage, head_path, inputs, axes, stage.example_inputs(5, 70) if check else None
    )
    diffs = {f"dense.{k}": v for k, v in dense["max_abs_diff"].items()}
    diffs.update({f"heads.{k}": v for k, v in heads["max_abs_diff"].items()})
    return {
        **dense,
        "heads_path": str(head_path),
        "heads_outputs": heads["outputs"],
        "note": f"{dense['note']}; RoI heads graph in {head_path.name}",
        "max_abs_diff": diffs,
    }

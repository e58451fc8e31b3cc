"""Semantic PointRend, as detectron2's ``PointRendSemSegHead`` computes it.

A coarse ``SemSegFPNHead`` (p2..p5, each brought to stride 4 by conv3x3 + GN + ReLU + x2 bilinear
steps, summed, 1x1 predictor) gives stride-4 logits. Inference then repeats ``subdivision_steps``
times: upsample x2 (bilinear, ``align_corners=False``), rank cells by ``top2 - top1`` (the most
uncertain have the smallest margin between the two best classes), and re-predict the
``subdivision_num_points`` most uncertain cells with the point head over fine features (p2) and the
stride-4 coarse logits sampled there. Module names are detectron2's (``coarse_sem_seg_head``,
``point_head``; prefix ``sem_seg_head.`` in model-zoo files).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detseg.instance.pointrend import PointHead
from detseg.ops.point_sample import point_sample, uncertain_points_on_grid


class ConvGN(nn.Conv2d):
    """3x3 conv without bias, then GroupNorm(32) as ``.norm``, then ReLU (detectron2 names)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(32, cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(super().forward(x)))


class SemSegFPNHead(nn.Module):
    """detectron2 ``SemSegFPNHead``: ``forward(*features) -> logits (N, K, H/common, W/common)``."""

    def __init__(
        self,
        num_classes: int = 19,
        in_features: Sequence[str] = ("p2", "p3", "p4", "p5"),
        in_channels: int = 256,
        in_strides: Sequence[int] = (4, 8, 16, 32),
        conv_dims: int = 128,
        common_stride: int = 4,
    ) -> None:
        super().__init__()
        self.in_features = list(in_features)
        for name, stride in zip(self.in_features, in_strides, strict=True):
            ops: list[nn.Module] = []
            steps = max(1, int(math.log2(stride) - math.log2(common_stride)))
            for k in range(steps):
                ops.append(ConvGN(in_channels if k == 0 else conv_dims, conv_dims))
                if stride != common_stride:
                    ops.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.add_module(name, nn.Sequential(*ops))
        self.predictor = nn.Conv2d(conv_dims, num_classes, 1)

    def forward(self, *features: Tensor) -> Tensor:
        x = None
        for name, feat in zip(self.in_features, features, strict=True):
            y = getattr(self, name)(feat)
            x = y if x is None else x + y
        return self.predictor(x)


def top2_uncertainty(logits: Tensor) -> Tensor:
    """``second best - best`` logit per pixel: (N, K, H, W) -> (N, 1, H, W), <= 0."""
    top2 = torch.topk(logits, k=2, dim=1)[0]
    return (top2[:, 1] - top2[:, 0]).unsqueeze(1)


class SemanticPointRendHead(nn.Module):
    """detectron2 ``PointRendSemSegHead`` (inference path) with the FPN coarse head.

    ``forward(*features)`` with the maps of ``in_features`` (N, C, H/s, W/s) returns the
    subdivided logits (N, K, H/s0 * 2^steps, ...) and the coarse stride-``common_stride`` logits.
    """

    def __init__(
        self,
        num_classes: int = 19,
        in_features: Sequence[str] = ("p2", "p3", "p4", "p5"),
        in_channels: int = 256,
        in_strides: Sequence[int] = (4, 8, 16, 32),
        conv_dims: int = 128,
        common_stride: int = 4,
        norm: str = "GN",
        point_in_features: Sequence[str] = ("p2",),
        point_fc_dim: int = 256,
        point_num_fc: int = 3,
        coarse_pred_each_layer: bool = False,
        subdivision_steps: int = 2,
        subdivision_num_points: int = 8192,
    ) -> None:
        super().__init__()
        if norm != "GN":
            raise ValueError("only the GN coarse head (detectron2's config) is supported")
        self.coarse_sem_seg_head = SemSegFPNHead(
            num_classes, in_features, in_channels, in_strides, conv_dims, common_stride
        )
        self.point_index = [list(in_features).index(f) for f in point_in_features]
        self.point_head = PointHead(
            in_channels * len(self.point_index),
            num_classes,
            point_fc_dim,
            point_num_fc,
            coarse_pred_each_layer=coarse_pred_each_layer,
        )
        self.steps, self.num_points = subdivision_steps, subdivision_num_points

    def refine(self, coarse: Tensor, fine_maps: Sequence[Tensor]) -> Tensor:
        """Subdivide ``coarse`` (N, K, h, w) ``steps`` times with point features of ``fine_maps``."""
        logits = coarse
        for _ in range(self.steps):
            logits = F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)
            idx, coords = uncertain_points_on_grid(top2_uncertainty(logits), self.num_points)
            coords = coords.to(logits.dtype)
            fine = torch.cat([point_sample(f, coords) for f in fine_maps], dim=1)
            new = self.point_head(fine, point_sample(coarse, coords))
            n, c, h, w = logits.shape
            logits = logits.reshape(n, c, h * w)
            logits = logits.scatter(2, idx.unsqueeze(1).expand(-1, c, -1), new).view(n, c, h, w)
        return logits

    def forward(self, *features: Tensor) -> tuple[Tensor, Tensor]:
        coarse = self.coarse_sem_seg_head(*features)
        return self.refine(coarse, [features[i] for i in self.point_index]), coarse

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
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detseg.engine.export import OnnxSpec
from detseg.instance.pointrend import PointHead
from detseg.ops.point_sample import (
    point_sample,
    uncertain_points_on_grid,
    uncertain_points_with_randomness,
)
from detseg.registry import register_model
from detseg.semantic.deeplab import DeepLabV3Plus
from detseg.semantic.heads import resize_output, resize_to
from detseg.semantic.losses import PointLogits


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


def refine_logits(
    coarse: Tensor,
    fine_maps: Sequence[Tensor],
    point_head: nn.Module,
    steps: int,
    num_points: int,
) -> Tensor:
    """Subdivide ``coarse`` (N, K, h, w) ``steps`` times -> (N, K, h * 2^steps, w * 2^steps).

    Each step upsamples x2 and re-predicts the ``num_points`` cells with the smallest top-2
    margin from ``fine_maps`` (image-normalised point features) and the original ``coarse``.
    """
    logits = coarse
    for _ in range(steps):
        logits = F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)
        idx, coords = uncertain_points_on_grid(top2_uncertainty(logits), num_points)
        coords = coords.to(logits.dtype)
        fine = torch.cat([point_sample(f, coords) for f in fine_maps], dim=1)
        new = point_head(fine, point_sample(coarse, coords))
        n, c, h, w = logits.shape
        logits = logits.reshape(n, c, h * w)
        logits = logits.scatter(2, idx.unsqueeze(1).expand(-1, c, -1), new).view(n, c, h, w)
    return logits


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

    def forward(self, *features: Tensor) -> tuple[Tensor, Tensor]:
        coarse = self.coarse_sem_seg_head(*features)
        fine = [features[i] for i in self.point_index]
        return refine_logits(coarse, fine, self.point_head, self.steps, self.num_points), coarse


class DeepLabV3PlusPointRend(DeepLabV3Plus):
    """DeepLabV3+ whose stride-4 decoder logits are refined by a PointRend point head.

    Fine features are the encoder's stride-4 level (ResNet ``layer1``); inference subdivides
    twice (stride 4 -> 1, ``subdivision_num_points`` per step) and resizes to the input if its
    size is not a multiple of 4. ``forward`` in training returns ``{"out": coarse logits at input
    size, "point": (point logits, points)}``, which the semantic pipeline's ``semantic_loss``
    scores like any auxiliary head (weight ``aux_weights["point"] = 1``, detectron2's).
    """

    aux_weights: ClassVar[dict[str, float]] = {"point": 1.0}

    def __init__(
        self,
        num_classes: int = 21,
        backbone: str = "resnet50",
        output_stride: int = 16,
        point_fc_dim: int = 256,
        point_num_fc: int = 3,
        subdivision_num_points: int = 8192,
        train_num_points: int = 2048,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        **kwargs: object,
    ) -> None:
        super().__init__(num_classes, backbone, output_stride, **kwargs)  # type: ignore[arg-type]
        fine_channels = self.backbone.channels(self.low_name)
        self.point_head = PointHead(
            fine_channels, num_classes, point_fc_dim, point_num_fc, coarse_pred_each_layer=False
        )
        self.num_points, self.train_num_points = subdivision_num_points, train_num_points
        self.oversample_ratio, self.importance_sample_ratio = (
            oversample_ratio,
            importance_sample_ratio,
        )

    def coarse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Coarse logits (N, K, H/4, W/4) and the fine stride-4 features (N, Cf, H/4, W/4)."""
        feats = self.backbone(x)
        fine = feats[self.low_name]
        high = resize_to(self.aspp(feats[self.high_name]), fine)
        return self.decoder(torch.cat([high, self.project(fine)], dim=1)), fine

    def onnx_spec(self) -> OnnxSpec:
        """The whole forward; valid for inputs whose first subdivision grid (H/2 x W/2) has at
        least ``num_points`` cells, as the top-k of each step keeps a fixed k when traced."""
        return OnnxSpec(
            size_multiple=4,
            min_pixels=4 * self.num_points,
            note=f"whole network; inputs of >= {4 * self.num_points} pixels (fixed top-k)",
        )

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor | PointLogits]:
        coarse, fine = self.coarse(x)
        if self.training:
            return {"out": resize_to(coarse, x), "point": self.point_predictions(coarse, fine)}
        steps = max(0, round(math.log2(x.shape[-1] / coarse.shape[-1])))
        return resize_output(
            refine_logits(coarse, [fine], self.point_head, steps, self.num_points), x
        )

    def point_predictions(self, coarse: Tensor, fine: Tensor) -> PointLogits:
        """Training: point logits (N, K, P) at ``train_num_points`` importance-sampled points
        (N, P, 2) (image-normalised, chosen without gradient from the top-2 margin of ``coarse``),
        for ``semantic_loss`` to score against the label sampled there."""
        with torch.no_grad():
            coords = uncertain_points_with_randomness(
                coarse.detach(),
                top2_uncertainty_points,
                self.train_num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
        return self.point_head(point_sample(fine, coords), point_sample(coarse, coords)), coords


def top2_uncertainty_points(logits: Tensor) -> Tensor:
    """``top2_uncertainty`` of point logits (N, K, P) -> (N, 1, P)."""
    return top2_uncertainty(logits.unsqueeze(3)).squeeze(3)


@register_model("deeplabv3plus_pointrend", task="semantic", defaults={"backbone": "resnet50"})
def build_deeplabv3plus_pointrend(**kwargs: object) -> DeepLabV3PlusPointRend:
    """DeepLabV3+ (ResNet-50, OS 16) with a PointRend point head refining stride 4 -> 1."""
    return DeepLabV3PlusPointRend(**kwargs)  # type: ignore[arg-type]

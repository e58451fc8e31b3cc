"""PointRend mask head for instances, as detectron2's ``projects/PointRend`` computes it.

The coarse head (``ConvFCHead``) predicts 7x7 logits from a 14x14 grid point-sampled on p2 inside
each box (``point_sample``, zero padding: not RoIAlign). The point head (``StandardPointHead``)
re-predicts single points from p2 features and the coarse logits sampled there. Inference is
adaptive subdivision: a 28x28 regular-grid start, then x2 bilinear upsampling and re-prediction of
the ``subdivision_num_points`` most uncertain cells (``-|logit of the predicted class|``) per step.
Module names are detectron2's (``coarse_head``, ``point_head``), so the model-zoo keys under
``roi_heads.mask_head.`` load strictly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detseg.backbones.d2 import c2_msra_fill, c2_xavier_fill, normal_fill
from detseg.engine.memory import rows_per_kept_block
from detseg.instance.maskrcnn import MaskRCNN, d2_official
from detseg.instance.roi_heads import RoIHeads, mask_rcnn_loss, mask_targets
from detseg.ops.linear import linear_by_conv
from detseg.ops.point_sample import (
    box_points_to_image,
    point_sample,
    regular_grid,
    uncertain_points_on_grid,
    uncertain_points_with_randomness,
)
from detseg.registry import register_model


class CoarseMaskHead(nn.Module):
    """detectron2 ``ConvFCHead``: (R, C, S, S) -> coarse logits (R, K, side, side)."""

    def __init__(
        self,
        in_channels: int = 256,
        input_resolution: int = 14,
        conv_dim: int = 256,
        fc_dim: int = 1024,
        num_fc: int = 2,
        num_classes: int = 80,
        output_side_resolution: int = 7,
    ) -> None:
        super().__init__()
        if in_channels > conv_dim:
            self.reduce_channel_dim_conv = nn.Conv2d(in_channels, conv_dim, 1)
            c2_msra_fill(self.reduce_channel_dim_conv)
        self.reduce_spatial_dim_conv = nn.Conv2d(conv_dim, conv_dim, 2, stride=2)
        c2_msra_fill(self.reduce_spatial_dim_conv)
        dim = conv_dim * input_resolution**2 // 4
        for k in range(num_fc):
            fc = nn.Linear(dim, fc_dim)
            c2_xavier_fill(fc)
            self.add_module(f"fc{k + 1}", fc)
            dim = fc_dim
        self.num_fc, self.out_shape = (
            num_fc,
            (num_classes, output_side_resolution, output_side_resolution),
        )
        self.prediction = nn.Linear(fc_dim, num_classes * output_side_resolution**2)
        normal_fill(self.prediction, 0.001)

    def forward(self, pooled: Tensor) -> Tensor:
        x = pooled
        if hasattr(self, "reduce_channel_dim_conv"):
            x = F.relu(self.reduce_channel_dim_conv(x))
        x = F.relu(self.reduce_spatial_dim_conv(x)).flatten(1)
        for k in range(self.num_fc):
            x = F.relu(getattr(self, f"fc{k + 1}")(x))
        return self.prediction(x).view(-1, *self.out_shape)


def _fc_beside(x: Tensor, coarse: Tensor | None, conv: nn.Conv1d) -> Tensor:
    """A 1x1 ``conv`` on the rows of ``cat([x, coarse], 1)`` (M, C) [+ (M, K)] -> (M, C_out),
    as ``linear_by_conv`` of each part summed: the concatenation is never made."""
    n = x.shape[1]
    out = linear_by_conv(x, conv.weight[:, :n], conv.bias)
    return out if coarse is None else out.add_(linear_by_conv(coarse, conv.weight[:, n:]))


class PointHead(nn.Module):
    """detectron2 ``StandardPointHead``: fine (R, C, P) + coarse (R, K, P) -> logits (R, K, P).

    With ``coarse_pred_each_layer`` the coarse logits are concatenated after every hidden layer
    (instances), otherwise only at the input (semantic segmentation). ``forward(..., classes)``
    with ``classes`` (R,) int64 returns only those classes' logits (R, 1, P).

    ``fast_inference`` (set by ``detseg.engine.fast``): in eval, one row of channels per point,
    the 1x1 layers as ``linear_by_conv`` (oneDNN 1x1 convolutions: 2-3x the throughput
    ``conv1d`` reaches on these shapes on the CPU) on the fine and coarse parts separately
    (no concatenation per layer), and with ``classes`` the predictor evaluates each RoI's class
    alone: the same products.
    """

    fast_inference = False

    def __init__(
        self,
        in_channels: int = 256,
        num_classes: int = 80,
        fc_dim: int = 256,
        num_fc: int = 3,
        cls_agnostic_mask: bool = False,
        coarse_pred_each_layer: bool = True,
    ) -> None:
        super().__init__()
        out = 1 if cls_agnostic_mask else num_classes
        self.num_fc, self.coarse_pred_each_layer = num_fc, coarse_pred_each_layer
        dim = in_channels + out
        for k in range(num_fc):
            fc = nn.Conv1d(dim, fc_dim, 1)
            c2_msra_fill(fc)
            self.add_module(f"fc{k + 1}", fc)
            dim = fc_dim + (out if coarse_pred_each_layer else 0)
        self.predictor = nn.Conv1d(dim, out, 1)
        normal_fill(self.predictor, 0.001)

    def forward(
        self, fine_grained_features: Tensor, coarse_features: Tensor, classes: Tensor | None = None
    ) -> Tensor:
        if self.fast_inference and not self.training:
            return self._forward_rows(fine_grained_features, coarse_features, classes)
        x = torch.cat((fine_grained_features, coarse_features), dim=1)
        for k in range(self.num_fc):
            x = F.relu(getattr(self, f"fc{k + 1}")(x))
            if self.coarse_pred_each_layer:
                x = torch.cat((x, coarse_features), dim=1)
        logits = self.predictor(x)
        return logits if classes is None else class_channel(logits, classes)

    def _forward_rows(self, fine: Tensor, coarse: Tensor, classes: Tensor | None) -> Tensor:
        """``forward`` with one row of channels per point: (R, C, P), (R, K, P) -> (R, K|1, P)."""
        r, _, p = fine.shape
        coarse_rows = coarse.transpose(1, 2).reshape(r * p, -1)  # (R*P, K)
        x = fine.transpose(1, 2).reshape(r * p, -1)
        beside: Tensor | None = coarse_rows  # what the next layer's input has beside x
        for k in range(self.num_fc):
            x = _fc_beside(x, beside, getattr(self, f"fc{k + 1}")).relu_()
            beside = coarse_rows if self.coarse_pred_each_layer else None
        if classes is None or self.predictor.out_channels == 1:
            return _fc_beside(x, beside, self.predictor).view(r, p, -1).transpose(1, 2)
        weight = self.predictor.weight[classes, :, 0]  # (R, D): each RoI's class row
        n = x.shape[1]
        out = torch.bmm(x.view(r, p, n), weight[:, :n, None])  # (R, P, 1)
        if beside is not None:
            out += torch.bmm(beside.view(r, p, -1), weight[:, n:, None])
        return (out + self.predictor.bias[classes, None, None]).transpose(1, 2)


def sample_box_features(
    feature: Tensor, stride: int, boxes: Sequence[Tensor], coords: Tensor, threads: int = 1
) -> Tensor:
    """Fine features (R, C, P) of ``feature`` (N, C, H, W) at box-normalised ``coords`` (R, P, 2).

    ``boxes`` are per image (R_i, 4) xyxy in image pixels; image pixels map to the map's [0, 1]
    extent by ``1 / (stride * W, stride * H)``. ``threads``: ``point_sample``'s.
    """
    h, w = feature.shape[-2:]
    scale = torch.tensor([w, h], dtype=coords.dtype, device=coords.device) / (1.0 / stride)
    points = box_points_to_image(torch.cat(list(boxes)), coords).split([len(b) for b in boxes])
    out = [
        point_sample(feature[i : i + 1], (p / scale).unsqueeze(0), threads)[0].transpose(1, 0)
        for i, p in enumerate(points)
    ]
    return torch.cat(out)


def class_channel(logits: Tensor, classes: Tensor) -> Tensor:
    """The ``classes`` (R,) channel of ``logits`` (R, K, ...) -> (R, 1, ...); K = 1 is kept."""
    if logits.shape[1] == 1:
        return logits
    return logits[torch.arange(len(classes), device=logits.device), classes].unsqueeze(1)


def point_labels(
    gt_masks: Sequence[Tensor],
    gt_index: Sequence[Tensor],
    boxes: Sequence[Tensor],
    coords: Tensor,
) -> Tensor:
    """detectron2 ``sample_point_labels``: soft labels (R, P) in [0, 1], the matched GT bitmask
    (G_i, H, W) of each RoI bilinearly sampled (``point_sample``) at its box-normalised
    ``coords`` (R, P, 2) mapped into the image."""
    points = box_points_to_image(torch.cat(list(boxes)), coords).split([len(b) for b in boxes])
    out = []
    for masks, index, pts in zip(gt_masks, gt_index, points, strict=True):
        if len(index) == 0:
            continue
        h, w = masks.shape[-2:]
        scale = torch.tensor([w, h], dtype=pts.dtype, device=pts.device)
        chosen = masks[index][:, None].to(pts.dtype)
        out.append(point_sample(chosen, pts / scale)[:, 0])
    return torch.cat(out) if out else coords.new_zeros(coords.shape[:2])


class PointRendMaskHead(nn.Module):
    """detectron2 ``PointRendMaskHead`` (inference path) on one p2 map.

    ``forward(p2 (N, C, H, W), boxes (R, 4), classes (R,))`` with all boxes in image 0 returns the
    predicted-class logits (R, 1, S, S), S = 7 * 2^steps (224), and the coarse logits
    (R, K, 7, 7). ``predict`` takes per-image boxes and returns all-class logits.

    ``fast_inference`` (set by ``detseg.engine.fast``): ``predict`` carries only the predicted
    class's channel through the subdivision, (R, 1, S, S) instead of (R, K, S, S). The values of
    that channel are the same (bilinear upsampling, the uncertainty and the scatter act on each
    channel alone); with 80 classes at S = 224 that is 80x less memory and upsampling work. The
    point head runs on pieces of RoIs (``_point_logits``).
    """

    fast_inference: bool = False

    def __init__(
        self,
        in_channels: int = 256,
        num_classes: int = 80,
        feature_stride: int = 4,
        pooler_resolution: int = 14,
        conv_dim: int = 256,
        fc_dim: int = 1024,
        num_fc: int = 2,
        output_side_resolution: int = 7,
        point_fc_dim: int = 256,
        point_num_fc: int = 3,
        cls_agnostic_mask: bool = False,
        coarse_pred_each_layer: bool = True,
        subdivision_steps: int = 5,
        subdivision_num_points: int = 784,
        train_num_points: int = 14 * 14,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        self.train_points = (train_num_points, oversample_ratio, importance_sample_ratio)
        self.point_head = PointHead(
            in_channels,
            num_classes,
            point_fc_dim,
            point_num_fc,
            cls_agnostic_mask,
            coarse_pred_each_layer,
        )
        self.coarse_head = CoarseMaskHead(
            in_channels,
            pooler_resolution,
            conv_dim,
            fc_dim,
            num_fc,
            num_classes,
            output_side_resolution,
        )
        self.stride, self.pooler_resolution = feature_stride, pooler_resolution
        self.num_points = subdivision_num_points
        # Start where the first step would re-predict every cell anyway (detectron2's shortcut).
        self.init_resolution, self.steps = output_side_resolution, subdivision_steps
        while 4 * self.init_resolution**2 <= subdivision_num_points:
            self.init_resolution *= 2
            self.steps -= 1

    def coarse(self, p2: Tensor, boxes: Sequence[Tensor]) -> Tensor:
        """Coarse logits (R, K, 7, 7) from the regular grid of p2 features inside each box."""
        r, s = sum(len(b) for b in boxes), self.pooler_resolution
        grid = regular_grid(r, s, p2.device).to(p2.dtype)
        feats = sample_box_features(p2, self.stride, boxes, grid)
        return self.coarse_head(feats.view(r, p2.shape[1], s, s))

    def _point_logits(
        self,
        p2: Tensor,
        boxes: Sequence[Tensor],
        coords: Tensor,
        coarse: Tensor,
        classes: Tensor | None = None,
    ) -> Tensor:
        """Point logits (R, K|1, P) at box-normalised ``coords`` (R, P, 2); the fast path in
        pieces of RoIs whose (P, C) point features stay within ``rows_per_kept_block`` (100
        RoIs x 784 points x 256 channels are 80 MB per layer: half the speed, see there), each
        piece's p2 samples on all threads (``point_sample``)."""
        if not (self.fast_inference and not self.training) or len(coords) == 0:
            fine = sample_box_features(p2, self.stride, boxes, coords)
            return self.point_head(fine, point_sample(coarse, coords), classes)
        per_piece = rows_per_kept_block(coords.shape[1] * p2.shape[1] * p2.element_size())
        pieces, start = [], 0
        for i, image_boxes in enumerate(boxes):
            for first in range(0, len(image_boxes), per_piece):
                piece = image_boxes[first : first + per_piece]
                rows = slice(start + first, start + first + len(piece))
                fine = sample_box_features(
                    p2[i : i + 1], self.stride, [piece], coords[rows], torch.get_num_threads()
                )
                only = None if classes is None else classes[rows]
                pieces.append(self.point_head(fine, point_sample(coarse[rows], coords[rows]), only))
            start += len(image_boxes)
        return torch.cat(pieces)

    def predict(
        self, p2: Tensor, boxes: Sequence[Tensor], classes: Tensor
    ) -> tuple[Tensor, Tensor]:
        """All-class subdivided logits (R, K, S, S) (fast inference: (R, 1, S, S), the ``classes``
        channel) and coarse logits (R, K, 7, 7); ``classes`` (R,) int64."""
        if self.fast_inference:
            # Under autocast p2 is bfloat16: the point coordinates would follow it into bfloat16
            # (steps of up to 1/256 of the box, coarser than the 224 grid), and ``grid_sample``,
            # a float32 operation there, would cast the whole map again at every point sample.
            # One float32 copy: on the d2 mask-head fixture with a bfloat16 p2, mean |logit
            # error| 0.0127 -> 0.0118 and 557 -> 449 of 150,528 signs flipped; time unchanged.
            p2 = p2.float()
        coarse = self.coarse(p2, boxes)
        r, res = len(classes), self.init_resolution
        coords = regular_grid(r, res, p2.device).to(p2.dtype)
        only = classes if self.fast_inference else None  # the point head's classes
        logits = self._point_logits(p2, boxes, coords, coarse, only)
        logits = logits.reshape(r, logits.shape[1], res, res)
        if r == 0:
            return logits, coarse
        for _ in range(self.steps):
            logits = F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)
            chosen = class_channel(logits, classes)
            idx, coords = uncertain_points_on_grid(-chosen.abs(), self.num_points)
            new = self._point_logits(p2, boxes, coords.to(p2.dtype), coarse, only)
            n, c, h, w = logits.shape
            logits = logits.reshape(n, c, h * w)
            logits = logits.scatter(2, idx.unsqueeze(1).expand(-1, c, -1), new).view(n, c, h, w)
        return logits, coarse

    def losses(
        self,
        p2: Tensor,
        boxes: Sequence[Tensor],
        classes: Tensor,
        gt_masks: Sequence[Tensor],
        gt_index: Sequence[Tensor],
    ) -> dict[str, Tensor]:
        """detectron2 ``PointRendMaskHead`` training on the foreground RoIs.

        ``loss_mask``: the coarse 7x7 logits against 7x7 GT crops (``mask_rcnn_loss``).
        ``loss_mask_point``: BCE of the GT-class point logits against soft labels, the GT
        bitmask (G_i, H, W) bilinearly sampled at the points, mean over R x 196. The points
        (no gradient) are 3 x 196 uniform draws of which the 147 with the most uncertain
        (``-|GT-class coarse logit|``) are kept, plus 49 fresh uniform ones.
        """
        coarse = self.coarse(p2, boxes)
        losses = {
            "loss_mask": mask_rcnn_loss(
                coarse, classes, mask_targets(gt_masks, gt_index, boxes, coarse.shape[-1])
            )
        }
        if len(classes) == 0:
            losses["loss_mask_point"] = coarse.sum() * 0
            return losses
        with torch.no_grad():
            coords = uncertain_points_with_randomness(
                coarse, lambda lg: -class_channel(lg, classes).abs(), *self.train_points
            )
            labels = point_labels(gt_masks, gt_index, boxes, coords)
        logits = class_channel(self._point_logits(p2, boxes, coords, coarse), classes)
        losses["loss_mask_point"] = F.binary_cross_entropy_with_logits(
            logits[:, 0], labels, reduction="mean"
        )
        return losses

    def forward(self, p2: Tensor, boxes: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        classes = classes.long()
        logits, coarse = self.predict(p2, [boxes], classes)
        return class_channel(logits, classes), coarse


class PointRendRoIHeads(RoIHeads):
    """Mask R-CNN's ROI heads with the PointRend mask head on p2 (no mask pooler)."""

    def build_mask_stage(
        self, in_channels: int, num_classes: int, conv_dim: int, fc_dim: int
    ) -> None:
        self.mask_head = PointRendMaskHead(
            in_channels, num_classes, conv_dim=conv_dim, fc_dim=fc_dim, point_fc_dim=conv_dim
        )

    def mask_losses(
        self,
        features: Sequence[Tensor],
        boxes: Sequence[Tensor],
        classes: Tensor,
        gt_masks: Sequence[Tensor],
        gt_index: Sequence[Tensor],
    ) -> dict[str, Tensor]:
        """``loss_mask`` (coarse 7x7) and ``loss_mask_point`` on p2 = ``features[0]``."""
        return self.mask_head.losses(features[0], boxes, classes, gt_masks, gt_index)

    def mask_probs(
        self,
        features: Sequence[Tensor],
        boxes: Sequence[Tensor],
        classes: Tensor,
        pooler_features: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Predicted-class probabilities (R, 224, 224) by subdivision on p2 = ``features[0]``,
        as it comes (no RoIAlign here; channels-last p2 samples faster for ``grid_sample``)."""
        logits, _ = self.mask_head.predict(features[0], boxes, classes)
        return class_channel(logits, classes)[:, 0].sigmoid()


class PointRendRCNN(MaskRCNN):
    """PointRend R50-FPN (detectron2 ``pointrend_rcnn_R_50_FPN``): Mask R-CNN whose masks are
    rendered at 224x224 by the PointRend head; same ``forward`` and outputs as ``MaskRCNN``."""

    roi_heads_class = PointRendRoIHeads
    train_on_pred_boxes = True


@register_model(
    "pointrend_r50_fpn",
    aliases=("pointrend_r50",),
    task="instance",
    official=d2_official(
        "roi_heads.mask_head.point_head.fc1.weight",
        "detectron2 PointRend R50-FPN (model_final_*.pkl; all three key generations)",
    ),
)
def pointrend_r50_fpn(**kwargs: object) -> PointRendRCNN:
    """PointRend R50-FPN instance segmentation, detectron2-exact heads."""
    return PointRendRCNN(**kwargs)

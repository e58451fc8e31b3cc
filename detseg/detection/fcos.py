"""FCOS: fully convolutional one-stage detection (Tian et al., ICCV 2019), as the official code.

The parts follow `tianzhi0549/FCOS` (``fcos_core``) and keep its module names, so the authors'
``rpn.head.*`` weights load by renaming only the prefix:

- ``FCOSHead``: two 4-conv GroupNorm towers, per-level ``scales``, centerness on the cls tower
  (plain) or the regression tower (imprv).
- ``FCOSLocations``: the cell centres ``(j*s + s//2, i*s + s//2)`` of every level.
- ``FCOSTargets``: regress ranges, center sampling, smallest-area assignment.
- ``FCOSPostProcessor``: threshold, top-k per level, decode, clip, class-aware NMS, top 100.
- ``FCOS``: ResNet-50 or MobileNetV2 body + FPN (P3-P7) + the parts above, with ``compute_loss``,
  ``postprocess``, ``from_official`` and ``from_torchvision``.

The parts use the official label convention (class ids 1..K, 0 = background, legacy inclusive
boxes: area ``(x2-x1+1)(y2-y1+1)``, clip to ``[0, W-1]``, NMS with +1 widths). ``FCOS`` itself takes
and returns detseg's convention: class ids 0..K-1 and continuous xyxy boxes.

``convention="torchvision"`` reproduces ``torchvision.models.detection.FCOS`` instead; what changes:

======================  ===============================  ====================================
                        official (default)               torchvision
======================  ===============================  ====================================
per-level scales        learnt (``learn_scales``)        none: scales fixed at 1
locations               ``j*s + s//2``                   ``j * (H_in // h)`` (no half-cell)
ResNet body             stride in 1x1, FrozenBN eps 0    stride in 3x3, BatchNorm eps 1e-5
ranges / areas          inclusive ranges, +1 areas       strict ranges, continuous areas
GT boxes                ``x2 - 1`` (inclusive)           as given
regression loss         centerness-weighted (G)IoU on    GIoU on boxes, / #positives
                        (l,t,r,b), smoothed, / sum(ctr)
threshold               p > 0.05 (class prob only)       sqrt(p*c) > 0.2
boxes / NMS             clip to W-1, +1 widths           clip to W, continuous IoU
======================  ===============================  ====================================
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import (
    FeaturePyramidNetwork,
    FrozenBatchNorm2d,
    batched_nms,
    generalized_box_iou_loss,
    sigmoid_focal_loss,
)
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detseg.backbones.trunks import ResNetBackbone
from detseg.checkpoint import load_state_dict_strict, read_state_dict
from detseg.engine.export import OnnxSpec
from detseg.errors import CheckpointError
from detseg.registry import OfficialFormat, register_model
from detseg.results import Detections

FPN_STRIDES = (8, 16, 32, 64, 128)
SIZES_OF_INTEREST = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, 1e8))
_TV_SIZES = ((0.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, math.inf))
CONVENTIONS = ("official", "torchvision")
OFFICIAL_PREPROCESS = {  # MSRA/caffe R-50: BGR 0..255 minus the mean, std 1 (spec F2)
    "channel_order": "BGR",
    "mean": (102.9801, 115.9465, 122.7717),
    "std": (1.0, 1.0, 1.0),
    "post_scale": 1.0,
}


@dataclass(frozen=True)
class Variant:
    """What ``plain`` and ``imprv`` (spec F1) change."""

    norm_reg_targets: bool
    centerness_on_reg: bool
    center_sampling_radius: float
    iou_loss_type: str


VARIANTS = {
    "plain": Variant(False, False, 0.0, "iou"),
    "imprv": Variant(True, True, 1.5, "giou"),
}


# ----------------------------------------------------------------------------------------- head
class Scale(nn.Module):
    """A learnable scalar multiplier (official ``fcos_core.layers.Scale``; key ``scale``, shape (1,))."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(channels: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(32, channels),
            nn.ReLU(),
        ]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """The shared FCOS head (spec F3), official key names (``cls_tower.{3k}``, ``scales.{l}.scale``...).

    ``forward(p3, ..., p7)`` with each level (N, in_channels, H_l, W_l) returns a flat tuple of
    ``3 * levels`` tensors: ``cls_logits`` (N, K, H, W) for every level, then ``bbox_reg`` (N, 4, H, W)
    as (l, t, r, b), then ``centerness`` (N, 1, H, W) logits. ``bbox_reg`` is in input pixels, except
    for ``norm_reg_targets`` in training mode: stride units (the official head multiplies by the
    stride only in eval mode).

    Args:
        learn_scales: False freezes the per-level scales at their value (torchvision has none: 1).
        use_dcn_in_tower: deformable towers (official dcnv2 configs) are not supported.
    """

    def __init__(
        self,
        num_classes: int = 80,
        in_channels: int = 256,
        num_convs: int = 4,
        fpn_strides: Sequence[int] = FPN_STRIDES,
        norm_reg_targets: bool = False,
        centerness_on_reg: bool = False,
        use_dcn_in_tower: bool = False,
        prior_prob: float = 0.01,
        learn_scales: bool = True,
    ) -> None:
        super().__init__()
        if use_dcn_in_tower:
            raise ValueError("use_dcn_in_tower: deformable-conv towers are not supported")
        self.fpn_strides = tuple(int(s) for s in fpn_strides)
        self.norm_reg_targets = norm_reg_targets
        self.centerness_on_reg = centerness_on_reg
        self.cls_tower = _tower(in_channels, num_convs)
        self.bbox_tower = _tower(in_channels, num_convs)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(in_channels, 1, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        self.scales = nn.ModuleList(Scale() for _ in self.fpn_strides)
        self.scales.requires_grad_(learn_scales)

    def forward(self, *features: Tensor) -> tuple[Tensor, ...]:
        logits, regs, ctrs = [], [], []
        for level, x in enumerate(features):
            cls_t, box_t = self.cls_tower(x), self.bbox_tower(x)
            logits.append(self.cls_logits(cls_t))
            ctrs.append(self.centerness(box_t if self.centerness_on_reg else cls_t))
            raw = self.scales[level](self.bbox_pred(box_t))
            if not self.norm_reg_targets:
                regs.append(torch.exp(raw))
            elif self.training:
                regs.append(F.relu(raw))
            else:
                regs.append(F.relu(raw) * self.fpn_strides[level])
        return (*logits, *regs, *ctrs)


# ------------------------------------------------------------------------------------ locations
def compute_locations(
    sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    style: str = "official",
    input_size: tuple[int, int] | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """Per level (H*W, 2) (x, y) cell centres in input pixels, row-major (x fastest).

    ``official``: ``(j*s + s//2, i*s + s//2)``. ``torchvision``: ``(j * (W_in // W), i * (H_in // H))``
    (its anchor centres; ``input_size`` = padded (H_in, W_in), default ``sizes[0] * strides[0]``).
    """
    if style == "torchvision" and input_size is None:
        input_size = (sizes[0][0] * strides[0], sizes[0][1] * strides[0])
    out = []
    for (h, w), s in zip(sizes, strides, strict=True):
        if style == "official":
            sy = sx = s
            offset = s // 2
        else:
            sy, sx, offset = input_size[0] // h, input_size[1] // w, 0
        xs = torch.arange(w, device=device, dtype=dtype) * sx + offset
        ys = torch.arange(h, device=device, dtype=dtype) * sy + offset
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=1))
    return out


class FCOSLocations(nn.Module):
    """``forward(p3, ..., p7) -> (locations_p3, ...)``, each (H*W, 2); only the maps' sizes are read."""

    def __init__(self, fpn_strides: Sequence[int] = FPN_STRIDES, style: str = "official") -> None:
        super().__init__()
        self.fpn_strides = tuple(fpn_strides)
        self.style = style

    def forward(self, *features: Tensor) -> tuple[Tensor, ...]:
        sizes = [tuple(f.shape[-2:]) for f in features]
        ref = features[0]
        return tuple(
            compute_locations(sizes, self.fpn_strides, self.style, None, ref.device, ref.dtype)
        )


# -------------------------------------------------------------------------------------- targets
def centerness_targets(reg: Tensor) -> Tensor:
    """(P, 4) (l, t, r, b) -> (P,) ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))``."""
    lr, tb = reg[:, 0::2], reg[:, 1::2]
    ratio = (lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values)
    return torch.sqrt(ratio)


class FCOSTargets(nn.Module):
    """Target assignment of ``FCOSLossComputation.prepare_targets`` (spec F5).

    ``forward(loc_p3..loc_p7, gt_boxes (B, G, 4), gt_labels (B, G))`` with labels 1..K (0 = padding
    row) returns ``labels_p3..p7`` (B*H*W,) (image-major, 0 = background), ``reg_targets_pos`` (P, 4)
    and ``centerness_targets_pos`` (P,) of the positives in the loss's order (level, image, location).

    Args:
        center_sampling_radius: 0 = inside the box; else inside centre +- radius*stride (clipped to box).
        norm_reg_targets: divide the (l, t, r, b) targets by the level stride.
        legacy: official inclusive ranges ``lo <= m <= hi`` and +1 areas; False = torchvision's strict
            ranges and continuous areas.
    """

    def __init__(
        self,
        fpn_strides: Sequence[int] = FPN_STRIDES,
        center_sampling_radius: float = 0.0,
        norm_reg_targets: bool = False,
        object_sizes_of_interest: Sequence[Sequence[float]] = SIZES_OF_INTEREST,
        legacy: bool = True,
    ) -> None:
        super().__init__()
        self.fpn_strides = tuple(fpn_strides)
        self.radius = float(center_sampling_radius)
        self.norm_reg_targets = norm_reg_targets
        self.sizes = tuple((float(lo), float(hi)) for lo, hi in object_sizes_of_interest)
        self.legacy = legacy

    def assign(
        self, locations: Sequence[Tensor], boxes: Tensor, labels: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One image: locations per level (L_l, 2); boxes (G, 4) xyxy; labels (G,) 1..K.

        Returns labels (L,) int64 (0 = background) and reg targets (L, 4) (l, t, r, b) over the
        concatenated levels, divided by the stride with ``norm_reg_targets``.
        """
        locs = torch.cat(list(locations))
        n = locs.shape[0]
        meta = [
            (s, lo, hi, len(loc))
            for s, (lo, hi), loc in zip(self.fpn_strides, self.sizes, locations, strict=True)
        ]
        stride = torch.cat([locs.new_full((k,), s) for s, _, _, k in meta])
        if boxes.shape[0] == 0:
            return torch.zeros(n, dtype=torch.long, device=locs.device), locs.new_zeros(n, 4)
        lo = torch.cat([locs.new_full((k,), a) for _, a, _, k in meta])[:, None]
        hi = torch.cat([locs.new_full((k,), b) for _, _, b, k in meta])[:, None]
        x, y = locs[:, 0:1], locs[:, 1:2]
        x1, y1, x2, y2 = boxes.unbind(1)
        reg = torch.stack((x - x1, y - y1, x2 - x, y2 - y), dim=2)  # (L, G, 4)
        if self.radius > 0:
            cx, cy, rad = (x1 + x2) / 2, (y1 + y2) / 2, stride[:, None] * self.radius
            region = torch.stack(
                (
                    x - torch.maximum(cx - rad, x1),
                    y - torch.maximum(cy - rad, y1),
                    torch.minimum(cx + rad, x2) - x,
                    torch.minimum(cy + rad, y2) - y,
                ),
                dim=2,
            )
            inside = region.min(2).values > 0
        else:
            inside = reg.min(2).values > 0
        m = reg.max(2).values
        cared = (m >= lo) & (m <= hi) if self.legacy else (m > lo) & (m < hi)
        extra = 1.0 if self.legacy else 0.0
        area = (x2 - x1 + extra) * (y2 - y1 + extra)
        area = area[None].expand(n, -1).masked_fill(~(inside & cared), math.inf)
        best, idx = area.min(1)
        out_labels = labels[idx].masked_fill(best == math.inf, 0)
        out_reg = reg[torch.arange(n, device=locs.device), idx]
        if self.norm_reg_targets:
            out_reg = out_reg / stride[:, None]
        return out_labels, out_reg

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        locations, gt_boxes, gt_labels = inputs[:-2], inputs[-2], inputs[-1].long()
        per_image = [
            self.assign(locations, b[lab > 0], lab[lab > 0])
            for b, lab in zip(gt_boxes, gt_labels, strict=True)
        ]
        counts = [len(loc) for loc in locations]
        labels = [
            torch.cat(t) for t in zip(*(lab.split(counts) for lab, _ in per_image), strict=True)
        ]
        regs = torch.cat(
            [torch.cat(t) for t in zip(*(r.split(counts) for _, r in per_image), strict=True)]
        )
        pos = torch.cat(labels) > 0
        return (*labels, regs[pos], centerness_targets(regs[pos]))


# --------------------------------------------------------------------------------------- losses
def iou_loss(pred: Tensor, target: Tensor, weight: Tensor | None, loss_type: str = "iou") -> Tensor:
    """The official smoothed IoU loss on (P, 4) (l, t, r, b) of the same points, summed.

    ``IoU = (I + 1) / (U + 1)``; ``loss_type``: "iou" (-log IoU), "linear_iou" (1 - IoU), "giou"
    (1 - GIoU built from the smoothed IoU). Weighted by ``weight`` (P,) when its sum is positive.
    """
    pl, pt, pr, pb = pred.unbind(1)
    tl, tt, tr, tb = target.unbind(1)
    inter = (torch.minimum(pl, tl) + torch.minimum(pr, tr)) * (
        torch.minimum(pt, tt) + torch.minimum(pb, tb)
    )
    union = (pl + pr) * (pt + pb) + (tl + tr) * (tt + tb) - inter
    ious = (inter + 1.0) / (union + 1.0)
    if loss_type == "iou":
        losses = -torch.log(ious)
    elif loss_type == "linear_iou":
        losses = 1 - ious
    elif loss_type == "giou":
        enclose = (torch.maximum(pl, tl) + torch.maximum(pr, tr)) * (
            torch.maximum(pt, tt) + torch.maximum(pb, tb)
        ) + 1e-7
        losses = 1 - (ious - (enclose - union) / enclose)
    else:
        raise ValueError(f"unknown IoU loss {loss_type!r}")
    if weight is not None and float(weight.sum()) > 0:
        return (losses * weight).sum()
    return losses.sum()


def _ltrb_as_boxes(reg: Tensor) -> Tensor:
    # GIoU is invariant to translation and scale: boxes around the origin in any unit will do.
    return torch.cat((-reg[:, :2], reg[:, 2:]), dim=1)


# --------------------------------------------------------------------------------- post-process
class FCOSPostProcessor(nn.Module):
    """Inference of the official ``FCOSPostProcessor`` (spec F7); no parameters.

    ``forward(cls_p3..p7 (N, K, H, W), reg_p3..p7 (N, 4, H, W) pixels, ctr_p3..p7 (N, 1, H, W),
    image_sizes (N, 2) (h, w))`` returns padded ``boxes`` (N, T, 4) xyxy, ``scores`` (N, T) =
    sqrt(p*c), ``labels`` (N, T) official ids 1..K and ``num_detections`` (N,), rows sorted by
    descending score, T = ``fpn_post_nms_top_n``. ``select`` gives the same per image, unpadded,
    with 0-based class indices.

    Args:
        threshold_on: "cls" (official: p > thresh) or "score" (torchvision: sqrt(p*c) > thresh).
        legacy_boxes: clip to [0, W-1] and NMS with +1 widths (official); False: [0, W], continuous.
        location_style: "official" or "torchvision" (see ``compute_locations``).
    """

    def __init__(
        self,
        pre_nms_thresh: float = 0.05,
        pre_nms_top_n: int = 1000,
        nms_thresh: float = 0.6,
        fpn_post_nms_top_n: int = 100,
        min_size: float = 0,
        num_classes: int = 80,
        fpn_strides: Sequence[int] = FPN_STRIDES,
        threshold_on: str = "cls",
        legacy_boxes: bool = True,
        location_style: str = "official",
    ) -> None:
        super().__init__()
        self.pre_nms_thresh = pre_nms_thresh
        self.pre_nms_top_n = pre_nms_top_n
        self.nms_thresh = nms_thresh
        self.post_nms_top_n = fpn_post_nms_top_n
        self.min_size = min_size
        self.num_classes = num_classes
        self.fpn_strides = tuple(fpn_strides)
        self.threshold_on = threshold_on
        self.legacy_boxes = legacy_boxes
        self.location_style = location_style

    def _level(
        self, cls: Tensor, reg: Tensor, ctr: Tensor, locs: Tensor, h: int, w: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        # cls (K, H, W), reg (4, H, W), ctr (1, H, W) of one image and level.
        k = cls.shape[0]
        p = cls.sigmoid().permute(1, 2, 0).reshape(-1, k)
        score = p * ctr.sigmoid().reshape(-1, 1)
        keep = (
            p > self.pre_nms_thresh
            if self.threshold_on == "cls"
            else score.sqrt() > self.pre_nms_thresh
        )
        top = min(int(keep.sum()), self.pre_nms_top_n)
        values, idx = score.masked_fill(~keep, -1.0).reshape(-1).topk(top)
        where, label = idx // k, idx % k
        reg = reg.permute(1, 2, 0).reshape(-1, 4)[where]
        pts = locs[where]
        boxes = torch.cat((pts - reg[:, :2], pts + reg[:, 2:]), dim=1)
        edge = 1 if self.legacy_boxes else 0
        boxes = torch.stack(
            (
                boxes[:, 0].clamp(0, w - edge),
                boxes[:, 1].clamp(0, h - edge),
                boxes[:, 2].clamp(0, w - edge),
                boxes[:, 3].clamp(0, h - edge),
            ),
            dim=1,
        )
        return boxes, values.sqrt(), label

    def select(
        self,
        cls: Sequence[Tensor],
        reg: Sequence[Tensor],
        ctr: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        input_size: tuple[int, int] | None = None,
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per image (boxes (D, 4) xyxy, scores (D,), labels (D,) int64 0..K-1), by score."""
        sizes = [tuple(c.shape[-2:]) for c in cls]
        locs = compute_locations(
            sizes, self.fpn_strides, self.location_style, input_size, cls[0].device, reg[0].dtype
        )
        results = []
        for i, (h, w) in enumerate(image_sizes):
            parts = [
                self._level(c[i], r[i], t[i], loc, int(h), int(w))
                for c, r, t, loc in zip(cls, reg, ctr, locs, strict=True)
            ]
            boxes, scores, labels = (torch.cat(x) for x in zip(*parts, strict=True))
            if self.min_size > 0:
                extra = 1 if self.legacy_boxes else 0
                big = (boxes[:, 2:] - boxes[:, :2] + extra).min(1).values >= self.min_size
                boxes, scores, labels = boxes[big], scores[big], labels[big]
            nms_boxes = boxes
            if self.legacy_boxes:
                nms_boxes = torch.cat((boxes[:, :2], boxes[:, 2:] + 1), dim=1)
            keep = batched_nms(nms_boxes.float(), scores.float(), labels, self.nms_thresh)
            keep = keep[: self.post_nms_top_n]
            results.append((boxes[keep], scores[keep], labels[keep]))
        return results

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n = (len(inputs) - 1) // 3
        cls, reg, ctr = inputs[:n], inputs[n : 2 * n], inputs[2 * n : 3 * n]
        image_sizes = [(int(h), int(w)) for h, w in inputs[-1].tolist()]
        results = self.select(cls, reg, ctr, image_sizes)
        t, ref = self.post_nms_top_n, reg[0]
        boxes = ref.new_zeros(len(results), t, 4)
        scores = ref.new_zeros(len(results), t)
        labels = torch.zeros(len(results), t, dtype=torch.long, device=ref.device)
        counts = torch.zeros(len(results), dtype=torch.long, device=ref.device)
        for i, (b, s, lab) in enumerate(results):
            d = len(b)
            boxes[i, :d], scores[i, :d], labels[i, :d], counts[i] = b, s, lab + 1, d
        return boxes, scores, labels, counts


# ------------------------------------------------------------------------------ backbone + FPN
class MobileNetV2Body(nn.Module):
    """torchvision MobileNetV2 ``features[0..17]`` (no final 1x1 conv), tapped at strides 8, 16, 32.

    The official MNV2 body (``fcos_core/modeling/backbone/mobilenet.py``) returns the same blocks
    (3, 6, 13, 17) with other inner names; ``from_official`` renames them.
    """

    taps = (6, 13, 17)
    channels = (32, 96, 320)
    names = ("c3", "c4", "c5")

    def __init__(self) -> None:
        super().__init__()
        self.features = torchvision.models.mobilenet_v2(weights=None).features[:18]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        out: OrderedDict[str, Tensor] = OrderedDict()
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.taps:
                out[self.names[self.taps.index(i)]] = x
        return out


class ResNetBody(ResNetBackbone):
    """torchvision-named ResNet-50 returning C3..C5; optionally the MSRA layout (stride in the 1x1).

    Args:
        stride_in_1x1: official/caffe R-50 (True) or torchvision (False).
        bn_eps: FrozenBatchNorm eps (official 0, torchvision 1e-5).
        freeze_at: 2 freezes the stem and layer1 (official, with ImageNet weights); 0 trains all.
    """

    def __init__(self, stride_in_1x1: bool = True, bn_eps: float = 0.0, freeze_at: int = 0) -> None:
        super().__init__("resnet50", frozen_bn=True)
        for layer in (self.layer2, self.layer3, self.layer4):
            if stride_in_1x1:
                layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
        for m in self.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.eps = bn_eps
        for stage in ((self.conv1, self.bn1), (self.layer1,))[:freeze_at]:
            for m in stage:
                m.requires_grad_(False)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = super().forward(x)
        return OrderedDict((f"c{i + 1}", feats[f"layer{i}"]) for i in (2, 3, 4))


class FCOSBackbone(nn.Module):
    """``body`` + torchvision FPN with P6 from P5 and P7 from ReLU(P6) (spec F2): P3..P7 list."""

    def __init__(self, body: nn.Module, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            list(in_channels), out_channels, extra_blocks=LastLevelP6P7(out_channels, out_channels)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.fpn(self.body(x)).values())


# ---------------------------------------------------------------------------------------- model
class FCOS(nn.Module):
    """FCOS detector: ``forward(images (N, 3, H, W), H and W multiples of 32) -> head outputs``.

    Eval and training both return the head's flat tuple (see ``FCOSHead``); ``compute_loss`` and
    ``postprocess`` turn it into losses or ``Detections``.

    Args:
        num_classes: foreground classes K (detseg class ids 0..K-1).
        backbone: "resnet50" or "mobilenet_v2".
        out_channels: FPN / head width (official: 256 for R-50, 128 for the c128 MNV2 models).
        variant: "plain" or "imprv" (spec F1).
        convention: "official" or "torchvision" (see the module docstring).
        score_thresh: pre-NMS threshold (default 0.05 official on p, 0.2 torchvision on sqrt(p*c)).
        nms_thresh, pre_nms_top_n, detections_per_img: inference settings (0.6, 1000, 100).
        learn_scales: train the per-level scales (False for torchvision, which has none).
        freeze_at: ResNet stages to freeze (official 2 when starting from ImageNet weights).
    """

    def __init__(
        self,
        num_classes: int = 80,
        backbone: str = "resnet50",
        out_channels: int = 256,
        variant: str = "plain",
        convention: str = "official",
        score_thresh: float | None = None,
        nms_thresh: float = 0.6,
        pre_nms_top_n: int = 1000,
        detections_per_img: int = 100,
        learn_scales: bool | None = None,
        freeze_at: int = 0,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, not {variant!r}")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, not {convention!r}")
        if convention == "torchvision" and variant != "imprv":
            raise ValueError("torchvision's FCOS is the imprv variant: pass variant='imprv'")
        official = convention == "official"
        cfg = VARIANTS[variant]
        self.num_classes, self.variant, self.convention = num_classes, variant, convention
        self.iou_loss_type = cfg.iou_loss_type
        if backbone == "resnet50":
            body: nn.Module = ResNetBody(official, 0.0 if official else 1e-5, freeze_at)
            in_channels: Sequence[int] = (512, 1024, 2048)
        elif backbone == "mobilenet_v2":
            body, in_channels = MobileNetV2Body(), MobileNetV2Body.channels
        else:
            raise ValueError(f"backbone must be 'resnet50' or 'mobilenet_v2', not {backbone!r}")
        self.backbone = FCOSBackbone(body, in_channels, out_channels)
        self.head = FCOSHead(
            num_classes,
            out_channels,
            norm_reg_targets=cfg.norm_reg_targets,
            centerness_on_reg=cfg.centerness_on_reg,
            learn_scales=official if learn_scales is None else learn_scales,
        )
        self.targets = FCOSTargets(
            center_sampling_radius=cfg.center_sampling_radius,
            norm_reg_targets=cfg.norm_reg_targets,
            object_sizes_of_interest=SIZES_OF_INTEREST if official else _TV_SIZES,
            legacy=official,
        )
        self.postprocessor = FCOSPostProcessor(
            pre_nms_thresh=(0.05 if official else 0.2) if score_thresh is None else score_thresh,
            pre_nms_top_n=pre_nms_top_n,
            nms_thresh=nms_thresh,
            fpn_post_nms_top_n=detections_per_img,
            num_classes=num_classes,
            threshold_on="cls" if official else "score",
            legacy_boxes=official,
            location_style=convention,
        )

    def onnx_spec(self) -> OnnxSpec:
        """What ``detseg export`` writes: the raw head outputs (``forward``); decoding is
        ``postprocess`` (locations, thresholds, top-k, NMS), run beside the graph."""
        return OnnxSpec(
            size_multiple=32,
            note="raw head outputs (class logits, boxes, centerness per level); decoding + NMS beside",
        )

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return self.head(*self.backbone(images))

    def split_outputs(self, outputs: Sequence[Tensor]) -> tuple[list[Tensor], ...]:
        """The flat head tuple as (cls_logits, bbox_reg, centerness) lists over levels."""
        n = len(outputs) // 3
        return list(outputs[:n]), list(outputs[n : 2 * n]), list(outputs[2 * n :])

    def compute_loss(
        self,
        outputs: Sequence[Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        input_size: tuple[int, int] | None = None,
    ) -> dict[str, Tensor]:
        """Losses (spec F6) of a training-mode ``forward`` on a batch.

        ``targets[i]``: ``boxes`` (G, 4) continuous xyxy input pixels, ``labels`` (G,) 0..K-1.
        Returns {"cls", "reg", "ctr"} scalars; their sum is the official total.
        """
        # float32 throughout: locations and the losses lose too much in half precision.
        cls, reg, ctr = self.split_outputs([o.float() for o in outputs])
        sizes = [tuple(c.shape[-2:]) for c in cls]
        strides = self.head.fpn_strides
        locs = compute_locations(sizes, strides, self.convention, input_size, cls[0].device)
        official = self.convention == "official"
        assigned = []
        for t in targets:
            boxes = t["boxes"].float()
            if official:  # continuous -> the official inclusive boxes (x2 = x + w - 1)
                boxes = torch.cat((boxes[:, :2], boxes[:, 2:] - 1), dim=1)
            assigned.append(self.targets.assign(locs, boxes, t["labels"].long() + 1))
        labels = torch.cat([lab for lab, _ in assigned])
        reg_t = torch.cat([r for _, r in assigned])
        k = cls[0].shape[1]
        cls_p = torch.cat([c.permute(0, 2, 3, 1).reshape(c.shape[0], -1, k) for c in cls], 1)
        reg_p = torch.cat([r.permute(0, 2, 3, 1).reshape(r.shape[0], -1, 4) for r in reg], 1)
        ctr_p = torch.cat([c.reshape(c.shape[0], -1) for c in ctr], 1)
        cls_p, reg_p, ctr_p = cls_p.reshape(-1, k), reg_p.reshape(-1, 4), ctr_p.reshape(-1)
        pos = labels > 0
        num_pos = pos.sum().clamp(min=1).to(cls_p.dtype)
        onehot = F.one_hot(labels, k + 1)[:, 1:].to(cls_p.dtype)
        losses = {"cls": sigmoid_focal_loss(cls_p, onehot, 0.25, 2.0, "sum") / num_pos}
        if not bool(pos.any()):
            losses["reg"], losses["ctr"] = reg_p.sum() * 0, ctr_p.sum() * 0
            return losses
        reg_p, reg_t, ctr_p = reg_p[pos], reg_t[pos], ctr_p[pos]
        ctr_t = centerness_targets(reg_t)
        if official:
            losses["reg"] = iou_loss(reg_p, reg_t, ctr_t, self.iou_loss_type) / ctr_t.sum()
        else:
            boxes_p, boxes_t = _ltrb_as_boxes(reg_p), _ltrb_as_boxes(reg_t)
            losses["reg"] = generalized_box_iou_loss(boxes_p, boxes_t, reduction="sum") / num_pos
        losses["ctr"] = F.binary_cross_entropy_with_logits(ctr_p, ctr_t, reduction="sum") / num_pos
        return losses

    @torch.no_grad()
    def postprocess(
        self,
        outputs: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]] | None = None,
        input_size: tuple[int, int] | None = None,
    ) -> list[Detections]:
        """Eval-mode outputs -> one ``Detections`` per image (continuous xyxy, class ids 0..K-1).

        Args:
            image_sizes: (h, w) of each image inside the padded batch (boxes are clipped to it).
            original_sizes: (h, w) to rescale the boxes to (default: ``image_sizes``).
            input_size: padded (H, W), needed only by the torchvision convention (default: P3 * 8).
        """
        if self.training and self.head.norm_reg_targets:
            raise RuntimeError("postprocess needs eval-mode outputs (pixels): call model.eval()")
        cls, reg, ctr = self.split_outputs([o.float() for o in outputs])
        results = self.postprocessor.select(cls, reg, ctr, image_sizes, input_size)
        out = []
        for i, (boxes, scores, labels) in enumerate(results):
            if original_sizes is not None:
                (h, w), (oh, ow) = image_sizes[i], original_sizes[i]
                rx = torch.tensor(ow, dtype=torch.float32) / torch.tensor(w, dtype=torch.float32)
                ry = torch.tensor(oh, dtype=torch.float32) / torch.tensor(h, dtype=torch.float32)
                boxes = boxes * torch.stack((rx, ry, rx, ry)).to(boxes)
            if self.convention == "official":  # inclusive -> continuous
                boxes = torch.cat((boxes[:, :2], boxes[:, 2:] + 1), dim=1)
            out.append(Detections(boxes.float().cpu(), scores.float().cpu(), labels.cpu()))
        return out

    @classmethod
    def from_official(cls, path: str | Path, **overrides: Any) -> FCOS:
        """Load an official FCOS ``.pth`` or an mmdetection FCOS checkpoint (spec F10).

        The files do not say plain or imprv: ``variant`` is taken from ``overrides``, else "imprv"
        when the file name contains "imprv" or "centeronreg", else "plain".
        """
        state, _ = read_state_dict(path)
        kwargs, converted = convert_checkpoint(state)
        stem = Path(path).name.lower()
        kwargs["variant"] = "imprv" if "imprv" in stem or "centeronreg" in stem else "plain"
        kwargs.update(overrides)
        model = cls(**kwargs)
        name = "fcos_mnv2_fpn" if kwargs["backbone"] == "mobilenet_v2" else "fcos_r50_fpn"
        load_state_dict_strict(model, converted, str(path), name)
        return model.eval()

    @classmethod
    def from_torchvision(cls, tv_model: nn.Module, **overrides: Any) -> FCOS:
        """A detseg FCOS equal to ``torchvision.models.detection.FCOS`` with a ResNet-50 FPN."""
        state = tv_model.state_dict()
        converted = {}
        for key, value in state.items():
            new = _rename(key, _TV_RULES)
            if new is not None and not key.endswith("num_batches_tracked"):
                converted[new] = value
        for i in range(len(FPN_STRIDES)):
            converted[f"head.scales.{i}.scale"] = torch.ones(1)
        kwargs = {
            "num_classes": state["head.classification_head.cls_logits.weight"].shape[0],
            "variant": "imprv",
            "convention": "torchvision",
            "score_thresh": float(tv_model.score_thresh),
            "nms_thresh": float(tv_model.nms_thresh),
            "pre_nms_top_n": int(tv_model.topk_candidates),
            "detections_per_img": int(tv_model.detections_per_img),
            **overrides,
        }
        model = cls(**kwargs)
        load_state_dict_strict(model, converted, "torchvision FCOS", "fcos_r50_fpn")
        return model.eval()


# ---------------------------------------------------------------------- checkpoint key mapping
_Rules = list[tuple[str, str]]

_TV_RULES: _Rules = [
    (r"backbone\.(.*)", r"backbone.\1"),
    (r"head\.classification_head\.conv\.(.*)", r"head.cls_tower.\1"),
    (r"head\.classification_head\.cls_logits\.(.*)", r"head.cls_logits.\1"),
    (r"head\.regression_head\.conv\.(.*)", r"head.bbox_tower.\1"),
    (r"head\.regression_head\.bbox_reg\.(.*)", r"head.bbox_pred.\1"),
    (r"head\.regression_head\.bbox_ctrness\.(.*)", r"head.centerness.\1"),
]

_OFFICIAL_RULES: _Rules = [
    (r"backbone\.body\.stem\.(conv1|bn1)\.(.*)", r"backbone.body.\1.\2"),
    (r"backbone\.body\.(layer\d\..*)", r"backbone.body.\1"),
    (r"backbone\.body\.(features\.\d+\..*)", r"backbone.body.\1"),
    (r"backbone\.fpn\.fpn_inner(\d)\.(.*)", "backbone.fpn.inner_blocks.{0}.0.\\2"),
    (r"backbone\.fpn\.fpn_layer(\d)\.(.*)", "backbone.fpn.layer_blocks.{0}.0.\\2"),
    (r"backbone\.fpn\.top_blocks\.(p6|p7)\.(.*)", r"backbone.fpn.extra_blocks.\1.\2"),
    (r"rpn\.head\.(.*)", r"head.\1"),
]

# mmdetection's ResNet + FPN (P6/P7 from fpn_convs 3/4) onto FCOSBackbone; PolarMask shares them.
MMDET_BACKBONE_NECK_RULES: _Rules = [
    (r"backbone\.((conv1|bn1|layer\d)\..*)", r"backbone.body.\1"),
    (r"neck\.lateral_convs\.(\d)\.conv\.(.*)", r"backbone.fpn.inner_blocks.\1.0.\2"),
    (r"neck\.fpn_convs\.([0-2])\.conv\.(.*)", r"backbone.fpn.layer_blocks.\1.0.\2"),
    (r"neck\.fpn_convs\.3\.conv\.(.*)", r"backbone.fpn.extra_blocks.p6.\1"),
    (r"neck\.fpn_convs\.4\.conv\.(.*)", r"backbone.fpn.extra_blocks.p7.\1"),
]

_MMDET_RULES: _Rules = [
    *MMDET_BACKBONE_NECK_RULES,
    (r"bbox_head\.cls_convs\.(\d)\.(conv|gn)\.(.*)", "head.cls_tower.{1}.\\3"),
    (r"bbox_head\.reg_convs\.(\d)\.(conv|gn)\.(.*)", "head.bbox_tower.{1}.\\3"),
    (r"bbox_head\.(?:conv|fcos)_cls\.(.*)", r"head.cls_logits.\1"),
    (r"bbox_head\.(?:conv|fcos)_reg\.(.*)", r"head.bbox_pred.\1"),
    (r"bbox_head\.(?:conv|fcos)_centerness\.(.*)", r"head.centerness.\1"),
    (r"bbox_head\.scales\.(.*)", r"head.scales.\1"),
]

# Official MNV2 inverted-residual inner indices -> torchvision's (expand ratio 1, then 6).
_MNV2_EXPAND1 = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
_MNV2_EXPAND6 = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}


def _rename(key: str, rules: _Rules) -> str | None:
    for pattern, repl in rules:
        m = re.fullmatch(pattern, key)
        if m is None:
            continue
        if "{0}" in repl:  # official fpn_inner2..4 / fpn_layer2..4 -> index 0..2
            return m.expand(repl.replace("{0}", str(int(m.group(1)) - 2)))
        if "{1}" in repl:  # mmdet tower k: conv -> 3k, gn -> 3k+1
            return m.expand(repl.replace("{1}", str(3 * int(m.group(1)) + (m.group(2) == "gn"))))
        return m.expand(repl)
    return None


def _mnv2_inner(key: str) -> str:
    m = re.fullmatch(r"backbone\.body\.features\.(\d+)\.conv\.(\d+)\.(.*)", key)
    if m is None:
        return key
    block, inner, leaf = m.groups()
    table = _MNV2_EXPAND1 if block == "1" else _MNV2_EXPAND6
    return f"backbone.body.features.{block}.conv.{table[inner]}.{leaf}"


def convert_checkpoint(state: Mapping[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Official (``rpn.head.*``, maybe ``module.``) or mmdet (``bbox_head.*``) FCOS -> detseg.

    Returns constructor kwargs (num_classes, backbone, out_channels) and the renamed state dict;
    mmdet towers without bias get zero biases. Raises ``CheckpointError`` for other files.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("rpn.head.") for k in state):
        rules, source = _OFFICIAL_RULES, "official FCOS"
    elif any(k.startswith("bbox_head.") for k in state):
        rules, source = _MMDET_RULES, "mmdetection FCOS"
    else:
        raise CheckpointError(
            "not an FCOS checkpoint: expected official 'rpn.head.*' or mmdetection 'bbox_head.*' "
            "keys; pass a file of tianzhi0549/FCOS or mmdetection's FCOS."
        )
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = _rename(key, rules)
        if new is None or key.endswith("num_batches_tracked"):
            continue
        out[_mnv2_inner(new)] = value
    for tower in ("cls_tower", "bbox_tower"):
        for k in range(4):
            weight = out.get(f"head.{tower}.{3 * k}.weight")
            if weight is not None:
                out.setdefault(f"head.{tower}.{3 * k}.bias", weight.new_zeros(weight.shape[0]))
    if "head.cls_logits.weight" not in out:
        raise CheckpointError(f"{source} checkpoint without a classifier (head.cls_logits).")
    mnv2 = "backbone.body.features.0.0.weight" in out
    kwargs = {
        "num_classes": int(out["head.cls_logits.weight"].shape[0]),
        "backbone": "mobilenet_v2" if mnv2 else "resnet50",
        "out_channels": int(out["head.cls_logits.weight"].shape[1]),
    }
    return kwargs, out


def _official_preprocess(kwargs: dict[str, Any]) -> dict[str, Any]:
    return dict(OFFICIAL_PREPROCESS)


def _official_format(backbone: str) -> OfficialFormat:
    def convert(state: Mapping[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        kwargs, converted = convert_checkpoint(state)
        if kwargs["backbone"] != backbone:
            other = "fcos_mnv2_fpn" if kwargs["backbone"] == "mobilenet_v2" else "fcos_r50_fpn"
            raise CheckpointError(
                f"this FCOS checkpoint has a {kwargs['backbone']} backbone; load it as {other}."
            )
        return kwargs, converted

    return OfficialFormat(
        description="FCOS authors' .pth (tianzhi0549/FCOS, weights under 'model') or "
        "mmdetection FCOS; pass variant='imprv' for the imprv models",
        convert=convert,
        preprocess=_official_preprocess,
    )


@register_model("fcos_r50_fpn", task="detection", official=_official_format("resnet50"))
def fcos_r50_fpn(**kwargs: Any) -> FCOS:
    """FCOS with a ResNet-50 FPN (P3-P7, 256 channels); variant plain or imprv."""
    return FCOS(**{"backbone": "resnet50", "out_channels": 256, **kwargs})


@register_model("fcos_mnv2_fpn", task="detection", official=_official_format("mobilenet_v2"))
def fcos_mnv2_fpn(**kwargs: Any) -> FCOS:
    """FCOS with a light MobileNetV2 FPN (P3-P7, 128 channels, official c128 MNV2 config)."""
    return FCOS(**{"backbone": "mobilenet_v2", "out_channels": 128, **kwargs})

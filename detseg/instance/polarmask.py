"""PolarMask: single-shot instance segmentation with 36 polar rays (Xie et al., CVPR 2020).

FCOS where every positive location also regresses the lengths of 36 rays, every 10 degrees, from
itself to the instance contour; the mask is the polygon of the ray ends. The parts follow the
official ``xieenze/PolarMask`` (mmdetection v1) at its last commit and keep its key names:

- ``PolarMaskHead``: cls / reg / mask towers (conv without bias, GroupNorm, ReLU), centerness on
  the cls tower, per-level ``scales_bbox`` / ``scales_mask``, ``exp`` on boxes and rays.
- ``PolarMaskTargets``: largest contour, mass centre, mask-centre sampling, regress ranges,
  smallest-area ambiguity, 36 ray lengths (the official angle-slice search, or a corrected one).
- ``polar_losses``: focal, Polar IoU (weighted by polar centerness), IoU box loss, centerness BCE.
- ``PolarMaskDecoder`` / ``PolarMaskPostProcess``: rays -> polygons -> masks; top-k, class-aware
  NMS, score ``p * (centerness + 0.5)``.
- ``PolarMask``: ResNet-50 (caffe layout) or MobileNetV2 FPN body + the parts above, with
  ``compute_loss``, ``postprocess`` and ``from_official``.

Ray convention (the official one since commit d6d1287): ray k points along 10k degrees measured
from +y (down) towards +x, ``x = cx + d sin(theta)``, ``y = cy + d cos(theta)``. The parts use
mmdet v1's coordinates (class ids 1..K with 0 = background, inclusive boxes: areas
``(x2-x1+1)(y2-y1+1)``, clip to ``[0, W-1]``, NMS with +1 widths); ``PolarMask`` itself takes and
returns detseg's (class ids 0..K-1, continuous xyxy boxes).

Deviations from the official code, all outside what the parity fixtures pin: empty masks become
background instead of crashing, a zero-area contour uses the mean of its points (the official
fallback, without the exception), the "first GT's centre x is 0 silences the image" check is gone,
locations come from the real feature-map sizes, positives whose rays are all empty get no weight
in the box / mask losses, and the loss normalisers are clamped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, sigmoid_focal_loss

from detseg.checkpoint import load_state_dict_strict, read_state_dict
from detseg.detection.fcos import (
    MMDET_BACKBONE_NECK_RULES,
    FCOSBackbone,
    MobileNetV2Body,
    ResNetBody,
    compute_locations,
)
from detseg.engine.export import OnnxSpec
from detseg.errors import CheckpointError
from detseg.registry import OfficialFormat, register_model
from detseg.results import Instances

STRIDES = (8, 16, 32, 64, 128)
REGRESS_RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, 1e8))
NUM_RAYS = 36
EMPTY_RAY = 1e-6  # the official length of a ray whose angle slice holds no contour point
SEARCH_OFFSETS = (0, 1, -1, 2, -2, 3, -3)  # official slice search order around each 10k degrees
OFFICIAL_PREPROCESS = {  # mmdet v1 caffe R-50: BGR 0..255 minus the mean, std 1 (spec P2)
    "channel_order": "BGR",
    "mean": (102.9801, 115.9465, 122.7717),
    "std": (1.0, 1.0, 1.0),
    "post_scale": 1.0,
}


def ray_angles(
    num_rays: int = NUM_RAYS, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(num_rays,) ray directions in radians, ``10k / 180 * pi`` as the official float32 values."""
    step = 360.0 / num_rays
    return torch.arange(num_rays, device=device, dtype=dtype) * step / 180 * math.pi


# ----------------------------------------------------------------------------------------- head
class Scale(nn.Module):
    """A learnable scalar (mmdet v1 ``Scale``: key ``scale``, a 0-dim tensor)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class ConvGN(nn.Module):
    """mmdet v1 ``ConvModule``: conv3x3 without bias -> GroupNorm -> ReLU (keys ``conv``, ``gn``)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(num_groups, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.gn(self.conv(x)))


class PolarMaskHead(nn.Module):
    """The official ``PolarMask_Head`` (spec P2), shared across levels.

    ``forward(p3, ..., p7)`` with each level (N, in_channels, H_l, W_l) returns a flat tuple of
    ``4 * levels`` tensors: ``cls_score`` (N, K, H, W) logits for every level, then ``bbox_pred``
    (N, 4, H, W) (l, t, r, b) in input pixels, then ``centerness`` (N, 1, H, W) logits, then
    ``mask_pred`` (N, num_rays, H, W) ray lengths in input pixels (channel k = ray k).

    Args:
        num_classes: foreground classes K (official ``num_classes=81`` counts the background).
        norm: only "GN" (the official configs); DCN towers are not supported.
    """

    def __init__(
        self,
        num_classes: int = 80,
        in_channels: int = 256,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        strides: Sequence[int] = STRIDES,
        norm: str = "GN",
        num_groups: int = 32,
        num_rays: int = NUM_RAYS,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        if norm != "GN":
            raise ValueError(f"PolarMaskHead supports norm='GN' only, not {norm!r}")
        self.num_classes, self.num_rays, self.strides = num_classes, num_rays, tuple(strides)

        def tower() -> nn.ModuleList:
            chans = [in_channels] + [feat_channels] * stacked_convs
            return nn.ModuleList(
                ConvGN(a, b, num_groups) for a, b in zip(chans, chans[1:], strict=False)
            )

        self.cls_convs, self.reg_convs, self.mask_convs = tower(), tower(), tower()
        self.polar_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.polar_reg = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.polar_mask = nn.Conv2d(feat_channels, num_rays, 3, padding=1)
        self.polar_centerness = nn.Conv2d(feat_channels, 1, 3, padding=1)
        self.scales_bbox = nn.ModuleList(Scale() for _ in self.strides)
        self.scales_mask = nn.ModuleList(Scale() for _ in self.strides)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.polar_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    @staticmethod
    def _run(tower: nn.ModuleList, x: Tensor) -> Tensor:
        for layer in tower:
            x = layer(x)
        return x

    def forward(self, *features: Tensor) -> tuple[Tensor, ...]:
        cls, box, ctr, ray = [], [], [], []
        for level, x in enumerate(features):
            cls_t = self._run(self.cls_convs, x)
            cls.append(self.polar_cls(cls_t))
            ctr.append(self.polar_centerness(cls_t))
            box.append(self.scales_bbox[level](self.polar_reg(self._run(self.reg_convs, x))).exp())
            ray.append(
                self.scales_mask[level](self.polar_mask(self._run(self.mask_convs, x))).exp()
            )
        return (*cls, *box, *ctr, *ray)


def split_outputs(outputs: Sequence[Tensor]) -> tuple[list[Tensor], ...]:
    """The flat head tuple as (cls_score, bbox_pred, centerness, mask_pred) lists over levels."""
    n = len(outputs) // 4
    return tuple(list(outputs[i * n : (i + 1) * n]) for i in range(4))


# ------------------------------------------------------------------------- contours and rays
def largest_contour(mask: np.ndarray) -> np.ndarray | None:
    """(K, 2) int32 (x, y) boundary pixels of the largest outer or inner contour of a 0/1 mask.

    ``cv2.findContours(RETR_TREE, CHAIN_APPROX_NONE)``; the first of equal ``contourArea`` wins,
    as the official stable sort. None for an empty mask (officially an IndexError).
    """
    contours = cv2.findContours(
        np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE
    )[-2]
    if len(contours) == 0:
        return None
    areas = [cv2.contourArea(c) for c in contours]
    return contours[int(np.argmax(areas))][:, 0, :]


def mass_center(contour: np.ndarray) -> tuple[int, int]:
    """The official "mass centre" of a (K, 2) contour: its shoelace centroid, truncated to int.

    The sums run sequentially in float64, as the official Python loop, so that centroids that
    fall on an integer truncate the same way. Zero area: the truncated mean of the points.
    """
    x, y = contour[:, 0].astype(np.int64), contour[:, 1].astype(np.int64)
    x1, y1 = np.roll(x, 1), np.roll(y, 1)
    fg = (x * y1 - y * x1) / 2.0
    area = np.cumsum(fg)[-1]
    if area != 0:
        cx = np.cumsum(fg * (x + x1) / 3.0)[-1] / area
        cy = np.cumsum(fg * (y + y1) / 3.0)[-1] / area
        if np.isfinite(cx) and np.isfinite(cy):
            return int(cx), int(cy)
    mean = contour.mean(axis=0)
    return int(mean[0]), int(mean[1])


def _slice_table() -> tuple[Tensor, Tensor]:
    cand = torch.tensor([[10 * k + o for o in SEARCH_OFFSETS] for k in range(NUM_RAYS)])
    return cand.clamp(0, 359), (cand >= 0) & (cand <= 359)


def polar_rays(origins: Tensor, contour: Tensor, official_compat: bool = True) -> Tensor:
    """(P, 36) ray lengths from each (P, 2) origin (x, y) to a (K, 2) float contour.

    ``official_compat``: truncated integer angles ``atan2(dx, dy)`` in 0..359, slices 10k, 10k+1,
    10k-1, ..., 10k-3 (no wrap-around), farthest point of the first non-empty slice, else 1e-6.
    Otherwise: each point goes to its nearest ray (10-degree bins, with wrap-around), farthest
    point per bin, 1e-6 for empty bins.
    """
    d = contour[None] - origins[:, None]  # (P, K, 2)
    dist = torch.sqrt(d[..., 0] ** 2 + d[..., 1] ** 2)
    angle = torch.atan2(d[..., 0], d[..., 1]) * 180 / math.pi
    angle = torch.where(angle < 0, angle + 360, angle)
    p = origins.shape[0]
    if official_compat:
        bins, width = angle.int().long(), 361  # 360 only from -tiny + 360 rounding up
    else:
        bins, width = torch.round(angle / (360 / NUM_RAYS)).long() % NUM_RAYS, NUM_RAYS
    table = dist.new_full((p, width), -1.0).scatter_reduce(1, bins, dist, "amax")
    if not official_compat:
        return torch.where(table >= 0, table, table.new_tensor(EMPTY_RAY))
    cand, valid = (t.to(origins.device) for t in _slice_table())
    vals = table[:, cand]  # (P, 36, 7)
    found = (vals >= 0) & valid
    first = found.int().argmax(-1, keepdim=True)
    rays = vals.gather(-1, first).squeeze(-1)
    return torch.where(found.any(-1), rays, rays.new_tensor(EMPTY_RAY))


def polar_centerness(rays: Tensor) -> Tensor:
    """(P, 36) -> (P,) polar centerness ``sqrt(min / max)`` (spec P4)."""
    return torch.sqrt(rays.min(1).values / rays.max(1).values)


# -------------------------------------------------------------------------------------- targets
class PolarMaskTargets(nn.Module):
    """Per-image training targets (spec P3), official ``polar_target_single`` rules, vectorised.

    ``forward(gt_bboxes (G, 4) inclusive xyxy, gt_masks (G, H, W) 0/1, gt_labels (G,) 1..K)``
    uses the dataset's ``int(H/s) x int(W/s)`` locations (as the official dataset) and returns
    ``labels`` (L,) (0 = background), ``bbox_targets`` (L, 4) (l, t, r, b) pixels (0 at
    negatives), ``mask_targets`` (L, 36) (0 at negatives) and ``mass_centers`` (G, 2) (x, y).
    ``assign`` takes the locations of the real feature maps instead (training).

    Args:
        official_compat: the official ray search (see ``polar_rays``); False: corrected binning.
        use_mask_center: sample around the mass centre (True, official) or the box centre.
    """

    def __init__(
        self,
        strides: Sequence[int] = STRIDES,
        regress_ranges: Sequence[Sequence[float]] = REGRESS_RANGES,
        center_sample_radius: float = 1.5,
        use_mask_center: bool = True,
        num_rays: int = NUM_RAYS,
        official_compat: bool = True,
    ) -> None:
        super().__init__()
        if num_rays != NUM_RAYS:
            raise ValueError(f"PolarMaskTargets supports {NUM_RAYS} rays, not {num_rays}")
        self.strides = tuple(strides)
        self.regress_ranges = [tuple(map(float, r)) for r in regress_ranges]
        self.radius = center_sample_radius
        self.use_mask_center = use_mask_center
        self.official_compat = official_compat

    def _centers(self, masks: np.ndarray, boxes: Tensor) -> tuple[list, Tensor, Tensor]:
        contours = [largest_contour(m) for m in masks]
        valid = torch.tensor([c is not None for c in contours], dtype=torch.bool)
        centers = [mass_center(c) if c is not None else (0, 0) for c in contours]
        ctr = torch.tensor(centers, dtype=torch.float32).reshape(-1, 2).to(boxes)
        if not self.use_mask_center:
            ctr = (boxes[:, :2] + boxes[:, 2:]) / 2
        return contours, ctr, valid.to(boxes.device)

    def assign(
        self, locations: Sequence[Tensor], boxes: Tensor, masks: Tensor, labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Targets for per-level (HW_l, 2) ``locations``; see the class docstring for the rest."""
        points = torch.cat(list(locations))  # (L, 2)
        sizes = [len(loc) for loc in locations]
        stride = torch.cat(
            [points.new_full((n,), float(s)) for n, s in zip(sizes, self.strides, strict=True)]
        )
        ranges = torch.cat(
            [
                points.new_tensor(r).expand(n, 2)
                for n, r in zip(sizes, self.regress_ranges, strict=True)
            ]
        )
        num_points, num_gts = points.shape[0], boxes.shape[0]
        boxes, labels = boxes.to(points), labels.to(points.device).long()
        contours, centers, valid = self._centers(masks.detach().cpu().numpy(), boxes)
        bbox_targets = points.new_zeros(num_points, 4)
        mask_targets = points.new_zeros(num_points, NUM_RAYS)
        if num_gts == 0:
            return labels.new_zeros(num_points), bbox_targets, mask_targets, centers
        xs, ys = points[:, 0, None], points[:, 1, None]  # (L, 1)
        ltrb = torch.stack(
            (xs - boxes[:, 0], ys - boxes[:, 1], boxes[:, 2] - xs, boxes[:, 3] - ys), -1
        )  # (L, G, 4)
        r = (stride * self.radius)[:, None]
        x1 = torch.maximum(centers[:, 0] - r, boxes[:, 0])
        y1 = torch.maximum(centers[:, 1] - r, boxes[:, 1])
        x2 = torch.minimum(centers[:, 0] + r, boxes[:, 2])
        y2 = torch.minimum(centers[:, 1] + r, boxes[:, 3])
        inside = torch.stack((xs - x1, ys - y1, x2 - xs, y2 - ys), -1).min(-1).values > 0
        reach = ltrb.max(-1).values
        in_range = (reach >= ranges[:, :1]) & (reach <= ranges[:, 1:])
        areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
        allowed = inside & in_range & valid
        areas = areas[None].expand(num_points, num_gts).masked_fill(~allowed, math.inf)
        min_area, gt_index = areas.min(dim=1)  # first GT on ties, as the official
        positive = min_area < math.inf
        out_labels = torch.where(positive, labels[gt_index], 0)
        picked = ltrb[torch.arange(num_points, device=points.device), gt_index]
        bbox_targets = torch.where(positive[:, None], picked, bbox_targets)
        for g, contour in enumerate(contours):
            sel = positive & (gt_index == g)
            if contour is not None and bool(sel.any()):
                pts = torch.from_numpy(contour).to(points)
                mask_targets[sel] = polar_rays(points[sel], pts, self.official_compat)
        return out_labels, bbox_targets, mask_targets, centers

    def forward(
        self, gt_bboxes: Tensor, gt_masks: Tensor, gt_labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        h, w = gt_masks.shape[-2:]
        sizes = [(int(h / s), int(w / s)) for s in self.strides]
        locations = compute_locations(sizes, self.strides, device=gt_bboxes.device)
        return self.assign(locations, gt_bboxes.float(), gt_masks.to(torch.uint8), gt_labels.long())


# ------------------------------------------------------------------------------------- decoding
def distance2mask(
    points: Tensor, distances: Tensor, max_shape: Sequence[int] | None = None
) -> Tensor:
    """Rays to polygons: (P, 2) origins (x, y) and (P, R) lengths -> (P, 2, R) (x row, y row).

    ``x = cx + d sin(theta_k)``, ``y = cy + d cos(theta_k)``; with ``max_shape`` (h, w), clamped
    to ``[0, w-1] x [0, h-1]`` (mmdet v1).
    """
    angles = ray_angles(distances.shape[1], distances.device, distances.dtype)
    x = distances * torch.sin(angles) + points[:, :1]
    y = distances * torch.cos(angles) + points[:, 1:]
    if max_shape is not None:
        x = x.clamp(min=0, max=max_shape[1] - 1)
        y = y.clamp(min=0, max=max_shape[0] - 1)
    return torch.stack((x, y), dim=1)


def polygons_to_masks(polygons: Tensor, height: int, width: int) -> Tensor:
    """(P, 2, R) polygons -> (P, height, width) uint8 masks, as the official ``bbox_mask2result``.

    Vertices are truncated to int and filled as one contour by ``cv2.drawContours`` (boundary
    pixels included, cv2's 8-connected lines).
    """
    pts = polygons.detach().to("cpu", torch.float32).int().permute(0, 2, 1).numpy()
    out = np.zeros((len(pts), height, width), np.uint8)
    for i, poly in enumerate(pts):
        cv2.drawContours(out[i], [np.ascontiguousarray(poly[:, None, :])], -1, 1, thickness=-1)
    return torch.from_numpy(out)


class PolarMaskDecoder(nn.Module):
    """``forward(points (P, 2), distances (P, R)) -> (polygons clamped to max_shape, polygons
    unclamped (P, 2, R), masks (P, *mask_shape) uint8 of the clamped polygons)``; no parameters."""

    def __init__(
        self,
        max_shape: Sequence[int] | None = None,
        mask_shape: Sequence[int] = (48, 64),
        num_rays: int = NUM_RAYS,
    ) -> None:
        super().__init__()
        self.max_shape = tuple(max_shape) if max_shape is not None else None
        self.mask_shape = tuple(mask_shape)
        self.num_rays = num_rays

    def forward(self, points: Tensor, distances: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        polygons = distance2mask(points, distances, self.max_shape)
        masks = polygons_to_masks(polygons, *self.mask_shape).to(points.device)
        return polygons, distance2mask(points, distances), masks


# --------------------------------------------------------------------------------- post-process
class PolarMaskPostProcess(nn.Module):
    """Official inference for one image (``get_bboxes_single`` + ``multiclass_nms_with_mask``).

    ``forward(cls_p3..p7 (1, K, H, W) logits, bbox_p3..p7 (1, 4, H, W) pixels, ctr_p3..p7
    (1, 1, H, W) logits, mask_p3..p7 (1, R, H, W) pixels, img_shape (2,) (h, w) of the resized
    unpadded input, scale_factor (4,) (w_s, h_s, w_s, h_s) resized / original)`` returns ``boxes``
    (k, 4) inclusive xyxy, ``scores`` (k,), ``labels`` (k,) 0-based, ``polygons`` (k, 2, R) in
    original pixels and ``num_detections`` (1,). Rows are in the official order (class-major,
    then candidate) unless more than ``max_per_img`` survive: then the best by score, descending.
    ``select`` does the same from per-level lists.

    Args:
        mask_nms: NMS on the polygons' bounding boxes instead of the box branch.
        official_compat: kept for the fixtures' kwargs; the computation is the official one.
    """

    def __init__(
        self,
        num_classes: int = 80,
        strides: Sequence[int] = STRIDES,
        nms_pre: int = 1000,
        score_thr: float = 0.05,
        nms_iou_thr: float = 0.5,
        max_per_img: int = 100,
        centerness_factor: float = 0.5,
        mask_nms: bool = False,
        official_compat: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes, self.strides = num_classes, tuple(strides)
        self.nms_pre, self.score_thr, self.nms_iou_thr = nms_pre, score_thr, nms_iou_thr
        self.max_per_img, self.centerness_factor = max_per_img, centerness_factor
        self.mask_nms, self.official_compat = mask_nms, official_compat

    def _candidates(
        self,
        cls: list[Tensor],
        box: list[Tensor],
        ctr: list[Tensor],
        ray: list[Tensor],
        h: int,
        w: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sizes = [tuple(c.shape[-2:]) for c in cls]
        locs = compute_locations(sizes, self.strides, device=cls[0].device, dtype=box[0].dtype)
        out: list[list[Tensor]] = [[], [], [], []]
        for c, b, z, r, loc in zip(cls, box, ctr, ray, locs, strict=True):
            p = c.reshape(c.shape[-3], -1).t().sigmoid()  # (HW, K)
            cz = z.reshape(-1).sigmoid()
            b, r = b.reshape(4, -1).t(), r.reshape(r.shape[-3], -1).t()
            if p.shape[0] > self.nms_pre:
                keep = (p * cz[:, None]).max(1).values.topk(self.nms_pre).indices
                p, cz, b, r, loc = p[keep], cz[keep], b[keep], r[keep], loc[keep]
            boxes = torch.cat((loc - b[:, :2], loc + b[:, 2:]), dim=1)
            limit = boxes.new_tensor([w - 1, h - 1, w - 1, h - 1])
            boxes = torch.minimum(boxes.clamp(min=0), limit)
            for i, t in enumerate((p, cz, boxes, distance2mask(loc, r, (h, w)))):
                out[i].append(t)
        return tuple(torch.cat(t) for t in out)

    def select(
        self,
        cls: list[Tensor],
        box: list[Tensor],
        ctr: list[Tensor],
        ray: list[Tensor],
        image_size: tuple[int, int],
        scale: tuple[float, float] = (1.0, 1.0),
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One image's levels ((1, C, H, W) each), ``image_size`` (h, w), ``scale`` (w_s, h_s)."""
        p, cz, boxes, polygons = self._candidates(cls, box, ctr, ray, *image_size)
        sx, sy = (torch.as_tensor(v, dtype=boxes.dtype, device=boxes.device) for v in scale)
        boxes = boxes / torch.stack((sx, sy, sx, sy))
        polygons = torch.stack((polygons[:, 0] / sx, polygons[:, 1] / sy), dim=1)
        label, where = (p.t() > self.score_thr).nonzero(as_tuple=True)  # class-major order
        scores = p[where, label] * (cz[where] + self.centerness_factor)
        nms_boxes = boxes[where]
        if self.mask_nms:
            poly = polygons[where]
            nms_boxes = torch.cat((poly.min(-1).values, poly.max(-1).values), dim=1)
        legacy = torch.cat((nms_boxes[:, :2], nms_boxes[:, 2:] + 1), dim=1)  # +1 widths and areas
        keep = batched_nms(legacy, scores, label, self.nms_iou_thr).sort().values
        if keep.numel() > self.max_per_img:
            order = scores[keep].sort(descending=True, stable=True).indices
            keep = keep[order[: self.max_per_img]]
        return boxes[where[keep]], scores[keep], label[keep], polygons[where[keep]]

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        n = (len(inputs) - 2) // 4
        cls, box, ctr, ray = split_outputs(inputs[: 4 * n])
        img_shape, scale_factor = inputs[-2], inputs[-1]
        size = (int(img_shape[0]), int(img_shape[1]))
        scale = (scale_factor[0], scale_factor[1])
        boxes, scores, labels, polygons = self.select(cls, box, ctr, ray, size, scale)
        return boxes, scores, labels, polygons, boxes.new_tensor([float(len(boxes))])


# --------------------------------------------------------------------------------------- losses
def polar_iou_loss(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Polar IoU loss ``log(sum_k max(d, d*) / sum_k min(d, d*))`` on (P, R) rays, weighted by
    ``weight`` (P,) and summed (the official ``MaskIOULoss`` before its normalisation)."""
    total = torch.stack((pred, target), -1)
    ratio = total.max(-1).values.sum(1) / total.min(-1).values.sum(1)
    return (ratio.log() * weight).sum()


def legacy_iou_loss(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """mmdet v1 ``IoULoss`` on (P, 4) (l, t, r, b) of the same points: ``-log(IoU)`` with +1
    widths and IoU clamped at 1e-6, weighted by ``weight`` (P,) and summed."""
    inter_w = torch.minimum(pred[:, 0], target[:, 0]) + torch.minimum(pred[:, 2], target[:, 2]) + 1
    inter_h = torch.minimum(pred[:, 1], target[:, 1]) + torch.minimum(pred[:, 3], target[:, 3]) + 1
    inter = inter_w.clamp(min=0) * inter_h.clamp(min=0)

    def area(d: Tensor) -> Tensor:
        return (d[:, 0] + d[:, 2] + 1) * (d[:, 1] + d[:, 3] + 1)

    iou = (inter / (area(pred) + area(target) - inter)).clamp(min=1e-6)
    return (-iou.log() * weight).sum()


def polar_losses(
    cls: Tensor,
    box: Tensor,
    ctr: Tensor,
    ray: Tensor,
    labels: Tensor,
    box_t: Tensor,
    ray_t: Tensor,
    num_images: int,
) -> dict[str, Tensor]:
    """PolarMask losses (spec P4) on flattened predictions and targets of a batch.

    Args:
        cls: (L, K) logits; box: (L, 4) pixels; ctr: (L,) logits; ray: (L, R) pixels.
        labels: (L,) 0 = background, 1..K; box_t: (L, 4); ray_t: (L, R) (from ``PolarMaskTargets``).
        num_images: images in the batch (the focal normaliser is ``num_pos + num_images``).

    Returns {"cls", "bbox", "mask", "centerness"}; the official total is their sum. Positives
    whose 36 target rays are all empty get zero weight in "bbox" / "mask" (spec bug 5); the
    weighted sums are divided by ``max(sum(weights), 1e-6)``.
    """
    pos = labels > 0
    num_pos = int(pos.sum())
    onehot = F.one_hot(labels, cls.shape[1] + 1)[:, 1:].to(cls.dtype)
    losses = {"cls": sigmoid_focal_loss(cls, onehot, 0.25, 2.0, "sum") / (num_pos + num_images)}
    if num_pos == 0:
        zero = box.sum() * 0 + ray.sum() * 0 + ctr.sum() * 0
        return {**losses, "bbox": zero, "mask": zero, "centerness": zero}
    ray_t = ray_t[pos]
    ctr_t = polar_centerness(ray_t)
    weight = torch.where(ray_t.max(1).values > 2 * EMPTY_RAY, ctr_t, torch.zeros_like(ctr_t))
    norm = weight.sum().clamp(min=1e-6)
    losses["bbox"] = legacy_iou_loss(box[pos], box_t[pos], weight) / norm
    losses["mask"] = polar_iou_loss(ray[pos], ray_t, weight) / norm
    losses["centerness"] = F.binary_cross_entropy_with_logits(ctr[pos], ctr_t)
    return losses


# ---------------------------------------------------------------------------------------- model
class PolarMask(nn.Module):
    """PolarMask: ``forward(images (N, 3, H, W), H and W multiples of 32) -> head outputs``.

    Eval and training both return the head's flat tuple (see ``PolarMaskHead``);
    ``compute_loss`` and ``postprocess`` turn it into losses or ``Instances``.

    Args:
        num_classes: foreground classes K (detseg class ids 0..K-1).
        backbone: "resnet50" (mmdet v1 caffe layout, frozen BN eps 1e-5, official) or
            "mobilenet_v2" (light, for CPU training).
        out_channels: FPN / head width (official 256); feat_channels, stacked_convs: head towers.
        freeze_at: ResNet stages to freeze (official 1-2 from ImageNet weights; 0 from scratch).
        official_compat: the official ray target search (False: corrected binning, see
            ``polar_rays``).
        nms_pre, score_thr, nms_iou_thr, max_per_img: the official test settings.
    """

    def __init__(
        self,
        num_classes: int = 80,
        backbone: str = "resnet50",
        out_channels: int = 256,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        freeze_at: int = 0,
        official_compat: bool = True,
        nms_pre: int = 1000,
        score_thr: float = 0.05,
        nms_iou_thr: float = 0.5,
        max_per_img: int = 100,
    ) -> None:
        super().__init__()
        if backbone == "resnet50":
            body: nn.Module = ResNetBody(True, 1e-5, freeze_at)
            in_channels: Sequence[int] = (512, 1024, 2048)
        elif backbone == "mobilenet_v2":
            body, in_channels = MobileNetV2Body(), MobileNetV2Body.channels
        else:
            raise ValueError(f"backbone must be 'resnet50' or 'mobilenet_v2', not {backbone!r}")
        self.num_classes = num_classes
        self.backbone = FCOSBackbone(body, in_channels, out_channels)
        self.head = PolarMaskHead(num_classes, out_channels, feat_channels, stacked_convs)
        self.targets = PolarMaskTargets(official_compat=official_compat)
        self.postprocessor = PolarMaskPostProcess(
            num_classes, STRIDES, nms_pre, score_thr, nms_iou_thr, max_per_img
        )

    def onnx_spec(self) -> OnnxSpec:
        """What ``detseg export`` writes: the raw head outputs (``forward``); polar decoding,
        NMS and rasterisation are ``postprocess``, run beside the graph."""
        return OnnxSpec(
            size_multiple=32,
            note="raw head outputs (class, centerness, 36 ray lengths per level); decoding beside",
        )

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return self.head(*self.backbone(images))

    def compute_loss(
        self, outputs: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Losses of a ``forward`` on a batch (float32 throughout).

        ``targets[i]``: ``boxes`` (G, 4) continuous xyxy input pixels, ``labels`` (G,) 0..K-1,
        ``masks`` (G, h, w) uint8 of the unpadded image. Returns {"cls", "bbox", "mask",
        "centerness"}.
        """
        cls, box, ctr, ray = split_outputs([o.float() for o in outputs])
        sizes = [tuple(c.shape[-2:]) for c in cls]
        locs = compute_locations(sizes, STRIDES, device=cls[0].device)
        assigned = []
        for t in targets:  # continuous -> the official inclusive boxes (x2 = x + w - 1)
            boxes = t["boxes"].float()
            boxes = torch.cat((boxes[:, :2], boxes[:, 2:] - 1), dim=1)
            assigned.append(self.targets.assign(locs, boxes, t["masks"], t["labels"].long() + 1))
        labels, box_t, ray_t = (torch.cat([a[i] for a in assigned]) for i in range(3))

        def flat(maps: list[Tensor]) -> Tensor:  # per image, level-major, row-major locations
            c = maps[0].shape[1]
            per = torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, c) for m in maps], 1)
            return per.reshape(-1, c)

        return polar_losses(
            flat(cls),
            flat(box),
            flat(ctr).squeeze(1),
            flat(ray),
            labels,
            box_t,
            ray_t,
            len(targets),
        )

    @torch.no_grad()
    def postprocess(
        self,
        outputs: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[Instances]:
        """Eval outputs -> one ``Instances`` per image, in original pixels (default: image_sizes).

        Boxes are continuous xyxy (the inclusive official boxes plus 1 at x2, y2), labels 0..K-1,
        ``masks`` (k, H0, W0) bool: the official filled polygon at the original size.
        """
        cls, box, ctr, ray = split_outputs([o.float() for o in outputs])
        out = []
        for i, (h, w) in enumerate(image_sizes):
            oh, ow = (original_sizes or image_sizes)[i]
            scale = (w / ow, h / oh)
            one = [[x[i] for x in maps] for maps in (cls, box, ctr, ray)]
            boxes, scores, labels, polygons = self.postprocessor.select(*one, (h, w), scale)
            masks = polygons_to_masks(polygons, int(oh), int(ow)).bool()
            boxes = torch.cat((boxes[:, :2], boxes[:, 2:] + 1), dim=1).cpu()
            out.append(Instances(boxes, scores.cpu(), labels.cpu(), masks=masks))
        return out

    @classmethod
    def from_official(
        cls, path: str | Path, ray_roll: int | None = None, **overrides: Any
    ) -> PolarMask:
        """Load an mmdetection 1.x PolarMask ``.pth`` (weights under ``state_dict``; spec P6).

        ``ray_roll``: shift of the 36 ray channels; None: -9 for the pre-d6d1287 checkpoints
        (``bbox_head.fcos_*`` names, old angle convention), else 0.
        """
        state, _ = read_state_dict(path)
        kwargs, converted = convert_official(state, ray_roll)
        model = cls(**{**kwargs, **overrides})
        load_state_dict_strict(model, converted, str(path), "polarmask_r50")
        return model.eval()


# ------------------------------------------------------------------------- official checkpoints
_RULES: list[tuple[str, str]] = [
    *MMDET_BACKBONE_NECK_RULES,
    (r"bbox_head\.((cls|reg|mask)_convs\..*)", r"head.\1"),
    (r"bbox_head\.(?:polar|fcos)_(cls|reg|mask|centerness)\.(.*)", r"head.polar_\1.\2"),
    (r"bbox_head\.(scales_(bbox|mask)\.\d\.scale)", r"head.\1"),
]


def convert_official(
    state: Mapping[str, Tensor], ray_roll: int | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """mmdetection v1 PolarMask state dict -> (constructor kwargs, detseg state dict).

    Accepts the current ``polar_*`` and the older ``fcos_*`` predictor names; scales become 0-dim;
    BN counters are dropped. ``ray_roll`` as in ``PolarMask.from_official``.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith("bbox_head.") and "_mask." in k for k in state):
        raise CheckpointError(
            "not a PolarMask checkpoint: no 'bbox_head.polar_mask' / 'bbox_head.fcos_mask' "
            "weights; pass an mmdetection 1.x PolarMask .pth (xieenze/PolarMask)."
        )
    old = any(k.startswith("bbox_head.fcos_") for k in state)
    roll = (-9 if old else 0) if ray_roll is None else ray_roll
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, repl in _RULES:
            m = re.fullmatch(pattern, key)
            if m is not None:
                out[m.expand(repl)] = value.reshape(()) if ".scale" in key else value
                break
    for leaf in ("weight", "bias"):
        name = f"head.polar_mask.{leaf}"
        if roll and name in out:
            out[name] = torch.roll(out[name], roll, dims=0)
    cls_w = out["head.polar_cls.weight"]
    kwargs = {"num_classes": int(cls_w.shape[0]), "out_channels": int(cls_w.shape[1])}
    return kwargs, out


def _official_preprocess(kwargs: dict[str, Any]) -> dict[str, Any]:
    return dict(OFFICIAL_PREPROCESS)


@register_model(
    "polarmask_r50",
    task="instance",
    summary="PolarMask, ResNet-50 FPN, 36 polar rays (Xie et al., CVPR 2020)",
    official=OfficialFormat(
        description="xieenze/PolarMask mmdetection 1.x .pth (weights under 'state_dict'); "
        "pre-2019-11-12 'fcos_*' checkpoints get their rays rolled by -9",
        convert=convert_official,
        preprocess=_official_preprocess,
    ),
)
def polarmask_r50(**kwargs: Any) -> PolarMask:
    """PolarMask with the official ResNet-50 FPN (P3-P7, 256 channels); see ``PolarMask``."""
    return PolarMask(**{"backbone": "resnet50", **kwargs})

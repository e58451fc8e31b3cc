"""TensorMask (Chen, Girshick, He, Dollár, ICCV 2019): dense sliding-window instance segmentation.

A RetinaNet-like one-stage detector whose windows (detectron2's anchors: two square windows per
location of P2..P7) each carry an M×M mask. The released configuration is the tensor bipyramid:
the mask features of every level are upsampled to P2 resolution and fused with P2's, a 1×1 conv
predicts the *aligned* representation on the P2 grid, and SwapAlign2Nat (λ = 2^k) turns it into
the *natural* representation of level k (one (m·2^k)² mask per P_k location, 4 input pixels per
mask pixel at every level). Module and parameter names follow detectron2's
``projects/TensorMask/tensormask/arch.py`` so its checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import batched_nms, roi_align

from detseg.backbones.d2 import ResNetFPN
from detseg.checkpoint import load_state_dict_strict, read_state_dict
from detseg.engine.export import OnnxSpec
from detseg.errors import CheckpointError
from detseg.ops.masks import polygons_to_rle, rle_to_mask
from detseg.ops.swap_align2nat import DEFAULT_PAD, SwapAlign2Nat, swap_align2nat_windows
from detseg.registry import OfficialFormat, register_model
from detseg.results import Instances

WINDOW_SIZES = ((44, 60), (88, 120), (176, 240), (352, 480), (704, 960), (1408, 1920))
STRIDES = (4, 8, 16, 32, 64, 128)
BBOX_REG_WEIGHTS = (1.5, 1.5, 0.75, 0.75)
SCALE_CLAMP = math.log(1000.0 / 16)


def _tower(in_channels: int, channels: int, num_convs: int) -> nn.Sequential:
    """``num_convs`` × [conv3x3 + ReLU]; convs at Sequential indices 0, 2, 4, ..."""
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers += [
            nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1),
            nn.ReLU(),
        ]
    return nn.Sequential(*layers)


class TensorMaskHead(nn.Module):
    """Shared class / box / mask towers of TensorMask over the pyramid levels.

    Args:
        in_channels: channels of every input level (256).
        num_classes: K, sigmoid classes, no background (80).
        num_convs: convs per tower (4).
        cls_channels, bbox_channels, mask_channels: tower widths (256, 128, 128).
        num_levels: pyramid levels P2.. (6 = P2..P7).
        num_anchors: A, windows per location (2).
        mask_sizes: base mask side m per window size (``[44 // 4, 60 // 4] = [11, 15]``).
        mask_on, aligned_on, bipyramid_on: the released model has all three True; with
            ``aligned_on=False`` the mask convs predict natural m×m masks directly, with
            ``bipyramid_on=False`` SwapAlign2Nat(1) is applied per level.
        apply_swap_align2nat: False returns the aligned masks (what the parity fixture pins).
    """

    def __init__(
        self,
        in_channels: int = 256,
        num_classes: int = 80,
        num_convs: int = 4,
        cls_channels: int = 256,
        bbox_channels: int = 128,
        mask_channels: int = 128,
        num_levels: int = 6,
        num_anchors: int = 2,
        mask_sizes: Sequence[int] = (11, 15),
        mask_on: bool = True,
        aligned_on: bool = True,
        bipyramid_on: bool = True,
        apply_swap_align2nat: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_levels = num_levels
        self.mask_sizes = list(mask_sizes)
        self.mask_on = mask_on
        self.aligned_on = aligned_on
        self.bipyramid_on = bipyramid_on
        self.apply_swap_align2nat = apply_swap_align2nat
        self.cls_subnet = _tower(in_channels, cls_channels, num_convs)
        self.cls_score = nn.Conv2d(cls_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_subnet = _tower(in_channels, bbox_channels, num_convs)
        self.bbox_pred = nn.Conv2d(bbox_channels, num_anchors * 4, 3, padding=1)
        if mask_on:
            self.mask_subnet = _tower(in_channels, mask_channels, num_convs)
            for m in self.mask_sizes:
                self.add_module(f"mask_pred_{m:02d}", nn.Conv2d(mask_channels, m * m, 1))
            if bipyramid_on:
                self.mask_fuse = _tower(mask_channels, mask_channels, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - 0.01) / 0.01))

    def level_lambda(self, level: int) -> int:
        """λ of SwapAlign2Nat at ``level`` (0 = P2): 2^level with the bipyramid, else 1."""
        return 2**level if self.bipyramid_on else 1

    def mask_features(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Per level (N, mask_channels, h, w): mask-tower features (P2-sized with the bipyramid)."""
        feats = [self.mask_subnet(f) for f in features]
        if not self.bipyramid_on:
            return feats
        high = feats[0]
        height, width = high.shape[-2:]
        fused = []
        for level, feat in enumerate(feats):
            if level > 0:
                feat = F.interpolate(
                    feat, scale_factor=float(2**level), mode="bilinear", align_corners=False
                )
            fused.append(self.mask_fuse(feat[:, :, :height, :width] + high))
        return fused

    def aligned_masks(self, features: Sequence[Tensor]) -> list[list[Tensor]]:
        """Per level, per window size: (N, m², h, w) mask logits before SwapAlign2Nat."""
        return [
            [getattr(self, f"mask_pred_{m:02d}")(feat) for m in self.mask_sizes]
            for feat in self.mask_features(features)
        ]

    def forward(self, *features: Tensor) -> tuple[Tensor, ...]:
        """P2.. levels, each (N, in_channels, H_k, W_k) -> flat tuple of raw outputs.

        Returns, in order: ``num_levels`` class logits (N, A·K, H_k, W_k) (channel a·K + class),
        ``num_levels`` box deltas (N, A·4, H_k, W_k) (channel a·4 + (dx, dy, dw, dh)), then for
        each level each window size a mask tensor: natural (N, M², H_k, W_k) (channel v·M + u,
        M = λ_k·m) when ``aligned_on and apply_swap_align2nat``, else as predicted
        ((N, m², H_2, W_2) aligned with the bipyramid).
        """
        logits = [self.cls_score(self.cls_subnet(f)) for f in features]
        deltas = [self.bbox_pred(self.bbox_subnet(f)) for f in features]
        masks: list[Tensor] = []
        if self.mask_on:
            for level, per_size in enumerate(self.aligned_masks(features)):
                if self.aligned_on and self.apply_swap_align2nat:
                    swap = SwapAlign2Nat(self.level_lambda(level), DEFAULT_PAD)
                    per_size = [swap(m) for m in per_size]
                masks.extend(per_size)
        return (*logits, *deltas, *masks)


def split_head_outputs(
    outputs: Sequence[Tensor], num_levels: int
) -> tuple[list[Tensor], list[Tensor], list[list[Tensor]]]:
    """Flat :meth:`TensorMaskHead.forward` output -> (logits per level, deltas per level,
    masks per level per window size)."""
    logits = list(outputs[:num_levels])
    deltas = list(outputs[num_levels : 2 * num_levels])
    rest = list(outputs[2 * num_levels :])
    per_level = len(rest) // num_levels if rest else 0
    masks = [rest[k * per_level : (k + 1) * per_level] for k in range(num_levels)] if rest else []
    return logits, deltas, masks


def grid_windows(
    height: int, width: int, stride: int, sizes: Sequence[float], device=None, dtype=None
) -> Tensor:
    """Square windows of one level, (height·width·A, 4) xyxy pixels, order (h, w, a).

    Window (h, w, a) is centred at (w·stride, h·stride) (no half-stride offset) with side
    ``sizes[a]``, unrounded and unclipped.
    """
    dtype = dtype or torch.float32
    half = torch.tensor(sizes, device=device, dtype=dtype) / 2
    ys = torch.arange(height, device=device, dtype=dtype) * stride
    xs = torch.arange(width, device=device, dtype=dtype) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    cx, cy = cx.reshape(-1, 1), cy.reshape(-1, 1)
    boxes = torch.stack((cx - half, cy - half, cx + half, cy + half), dim=-1)
    return boxes.reshape(-1, 4)


def decode_boxes(deltas: Tensor, windows: Tensor) -> Tensor:
    """(R, 4) deltas (dx, dy, dw, dh) relative to (R, 4) xyxy windows -> (R, 4) xyxy boxes.

    Weights (1.5, 1.5, 0.75, 0.75), dw/dh clamped at log(1000/16), width = x2 − x1 (no +1).
    """
    coder = BoxCoder(BBOX_REG_WEIGHTS, bbox_xform_clip=SCALE_CLAMP)
    return coder.decode_single(deltas, windows)


def natural_masks_at(
    aligned: Tensor, level: int, bipyramid_on: bool, batch_index: Tensor, rows: Tensor, cols: Tensor
) -> Tensor:
    """Natural mask logits of selected windows only: (K, M, M), without the dense tensor.

    Args:
        aligned: (N, m², H, W) aligned logits of one level and window size (P2 grid with the
            bipyramid).
        level: 0 = P2; λ = 2^level with the bipyramid, 1 without.
        batch_index, rows, cols: (K,) int64 image index and level-k grid cell (h, w).
    """
    lam = 2**level if bipyramid_on else 1
    return swap_align2nat_windows(aligned, lam, batch_index, rows, cols, DEFAULT_PAD)


def level_windows(shapes: Sequence[tuple[int, int]], device=None, dtype=None) -> list[Tensor]:
    """Windows of every level for feature sizes ``shapes`` [(H_k, W_k)], P2 first (§3 sizes)."""
    return [
        grid_windows(h, w, STRIDES[k], WINDOW_SIZES[k], device=device, dtype=dtype)
        for k, (h, w) in enumerate(shapes)
    ]


def flatten_levels(outputs: Sequence[Tensor], num_anchors: int) -> Tensor:
    """Per level (N, A·C, H_k, W_k) -> (N, Σ H_k·W_k·A, C), order (level, h, w, a)."""
    flat = []
    for x in outputs:
        n, ac, h, w = x.shape
        flat.append(x.view(n, num_anchors, ac // num_anchors, h, w).permute(0, 3, 4, 1, 2))
    return torch.cat([f.reshape(f.shape[0], -1, f.shape[-1]) for f in flat], dim=1)


def window_index(shapes: Sequence[Sequence[int]], num_anchors: int, device=None) -> Tensor:
    """(Σ H_k·W_k·A, 4) int64 (level, h, w, a) of every window, in :func:`flatten_levels` order."""
    index = []
    for k, (h, w) in enumerate(shapes):
        cell = torch.arange(h * w * num_anchors, device=device)
        a, hw = cell % num_anchors, cell // num_anchors
        index.append(torch.stack((torch.full_like(cell, k), hw // w, hw % w, a), dim=1))
    return torch.cat(index)


def select_detections(
    logits: Sequence[Tensor],
    deltas: Sequence[Tensor],
    windows: Sequence[Tensor],
    score_thresh: float = 0.05,
    topk_candidates: int = 6000,
    nms_thresh: float = 0.5,
    max_detections: int = 100,
) -> dict[str, Tensor]:
    """Top-k, box decoding and per-class NMS for one image, jointly over all levels.

    Args:
        logits: per level (A·K, H_k, W_k) class logits of one image.
        deltas: per level (A·4, H_k, W_k) box deltas.
        windows: per level (H_k·W_k·A, 4) xyxy windows from :func:`level_windows`.

    Returns:
        ``boxes`` (R, 4) xyxy (unclipped), ``scores`` (R,) sigmoid probabilities,
        ``classes`` (R,) int64, ``windows`` (R, 4) xyxy, and the window index 4-tuple
        ``level``, ``row``, ``col``, ``anchor`` (R,) int64; R ≤ ``max_detections``, by
        descending score.
    """
    num_anchors = deltas[0].shape[0] // 4
    index = window_index([x.shape[-2:] for x in logits], num_anchors, logits[0].device)
    flat_logits = flatten_levels([x[None] for x in logits], num_anchors)[0]
    num_classes = flat_logits.shape[1]
    flat_deltas = flatten_levels([x[None] for x in deltas], num_anchors)[0]
    probs = flat_logits.reshape(-1).sigmoid()
    candidates = torch.nonzero(probs > score_thresh).squeeze(1)
    scores, order = probs[candidates].sort(descending=True)
    scores, candidates = scores[:topk_candidates], candidates[order[:topk_candidates]]
    window_idx, classes = candidates // num_classes, candidates % num_classes
    all_windows = torch.cat(list(windows))[window_idx]
    boxes = decode_boxes(flat_deltas[window_idx], all_windows)
    keep = batched_nms(boxes, scores, classes, nms_thresh)[:max_detections]
    level, row, col, anchor = index[window_idx[keep]].unbind(1)
    return {
        "boxes": boxes[keep],
        "scores": scores[keep],
        "classes": classes[keep],
        "windows": all_windows[keep],
        "level": level,
        "row": row,
        "col": col,
        "anchor": anchor,
    }


def paste_masks(
    masks: Tensor, boxes: Tensor, height: int, width: int, threshold: float = 0.5
) -> Tensor:
    """Paste (R, M, M) probabilities into (R, 4) xyxy boxes of a (height, width) image.

    detectron2's ``paste_masks_in_image`` rule: pixel (i, j) has centre (j + 0.5, i + 0.5), is
    sampled bilinearly (``align_corners=False``, zero outside the mask) at its position relative
    to the box, and is on where the value is ≥ ``threshold``. Returns (R, height, width) bool.
    """
    if masks.shape[0] == 0:
        return torch.zeros(0, height, width, dtype=torch.bool, device=masks.device)
    dtype = masks.dtype
    x0, y0, x1, y1 = boxes.to(dtype).unbind(1)
    ys = torch.arange(height, device=masks.device, dtype=dtype) + 0.5
    xs = torch.arange(width, device=masks.device, dtype=dtype) + 0.5
    gy = (ys[None] - y0[:, None]) / (y1 - y0)[:, None] * 2 - 1
    gx = (xs[None] - x0[:, None]) / (x1 - x0)[:, None] * 2 - 1
    grid = torch.stack(
        (gx[:, None, :].expand(-1, height, -1), gy[:, :, None].expand(-1, -1, width)), dim=3
    )
    pasted = F.grid_sample(masks[:, None], grid, mode="bilinear", align_corners=False)
    return pasted[:, 0] >= threshold


def detection_masks(
    aligned: Sequence[Sequence[Tensor]], dets: dict[str, Tensor], image: int, bipyramid_on: bool
) -> list[Tensor]:
    """Natural mask probabilities of the kept detections only (memory ∝ detections).

    Args:
        aligned: per level, per window size (N, m², H, W) aligned logits
            (:meth:`TensorMaskHead.aligned_masks`).
        dets: :func:`select_detections` output for image ``image``.

    Returns:
        One (M, M) float probability map per detection, M = λ_k·m_a.
    """
    out: list[Tensor | None] = [None] * len(dets["scores"])
    for k, per_size in enumerate(aligned):
        for a, logits in enumerate(per_size):
            sel = torch.nonzero((dets["level"] == k) & (dets["anchor"] == a)).squeeze(1)
            if sel.numel() == 0:
                continue
            batch = torch.full_like(sel, image)
            probs = natural_masks_at(
                logits, k, bipyramid_on, batch, dets["row"][sel], dets["col"][sel]
            ).sigmoid()
            for i, p in zip(sel.tolist(), probs, strict=True):
                out[i] = p
    return out


def postprocess(
    dets: dict[str, Tensor],
    masks: Sequence[Tensor],
    input_size: tuple[int, int],
    output_size: tuple[int, int],
) -> Instances:
    """Scale one image's detections from the network input (resized, unpadded) to the output size.

    Boxes are scaled, clipped and empty ones dropped; windows are scaled without clipping and
    each mask is pasted into its **window** box (not the regressed box), threshold 0.5.
    """
    out_h, out_w = output_size
    scale = torch.tensor(
        [out_w / input_size[1], out_h / input_size[0]] * 2,
        device=dets["boxes"].device,
        dtype=dets["boxes"].dtype,
    )
    boxes = dets["boxes"] * scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, out_w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, out_h)
    keep = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).nonzero().squeeze(1)
    windows = dets["windows"][keep] * scale
    pasted = torch.zeros(len(keep), out_h, out_w, dtype=torch.bool, device=boxes.device)
    kept_masks = [masks[i] for i in keep.tolist()]
    for side in sorted({m.shape[-1] for m in kept_masks}):
        group = [i for i, m in enumerate(kept_masks) if m.shape[-1] == side]
        idx = torch.tensor(group, device=boxes.device, dtype=torch.long)
        stacked = torch.stack([kept_masks[i] for i in group])
        pasted[idx] = paste_masks(stacked, windows[idx], out_h, out_w)
    return Instances(
        boxes=boxes[keep], scores=dets["scores"][keep], labels=dets["classes"][keep], masks=pasted
    )


def assign_windows(
    gt_boxes: Tensor,
    windows: Tensor,
    unit_lengths: Tensor,
    min_window_size: float = 40.0,
    scale_thresh: float = 2.0,
    spatial_thresh: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """TensorMask's assignment rule for one image (containment, scale, centrality, uniqueness).

    Window W (side S, unit length s) satisfies GT g iff W contains g, ``S − s ≤ max(2·L_g, 40)``
    (L_g the GT's long side) and ``‖c_g − c_W‖ / s ≤ 1``. A window satisfied by exactly one GT is
    positive; by none or several, negative (nothing is ignored).

    Args:
        gt_boxes: (G, 4) xyxy.
        windows: (M, 4) xyxy, all levels concatenated.
        unit_lengths: (M,) the stride of each window's level.

    Returns:
        ``matches`` (M,) int64 GT index (meaningful where positive) and ``positive`` (M,) bool.
    """
    num = windows.shape[0]
    if gt_boxes.numel() == 0:
        zeros = torch.zeros(num, dtype=torch.long, device=windows.device)
        return zeros, zeros.bool()
    g, w = gt_boxes[:, None], windows[None]
    contains = (w[..., :2] <= g[..., :2]).all(-1) & (w[..., 2:] >= g[..., 2:]).all(-1)
    long_side = (gt_boxes[:, 2:] - gt_boxes[:, :2]).max(dim=1).values
    upper = (long_side * scale_thresh).clamp(min=min_window_size)
    size = (windows[:, 2:] - windows[:, :2]).max(dim=1).values - unit_lengths
    scale_ok = upper[:, None] >= size[None]
    offset = ((g[..., :2] + g[..., 2:]) - (w[..., :2] + w[..., 2:])) / 2 / unit_lengths[:, None]
    central = (offset * offset).sum(-1) <= spatial_thresh * spatial_thresh
    assigned = (contains & scale_ok & central).int()
    count, matches = assigned.sum(dim=0), assigned.argmax(dim=0)
    return matches, count == 1


def encode_boxes(gt_boxes: Tensor, windows: Tensor) -> Tensor:
    """(R, 4) xyxy targets relative to (R, 4) xyxy windows -> (R, 4) deltas, weights (1.5, 1.5, 0.75, 0.75)."""
    return BoxCoder(BBOX_REG_WEIGHTS, bbox_xform_clip=SCALE_CLAMP).encode_single(gt_boxes, windows)


def window_mask_targets(
    polygons: Sequence[Sequence[Sequence[float]]], windows: Tensor, side: int
) -> Tensor:
    """Rasterise each GT's polygons over its window at ``side × side`` (detectron2 crop_and_resize).

    Args:
        polygons: per positive window, the matched GT's COCO polygons (image pixels).
        windows: (R, 4) xyxy square windows.
        side: M, the mask side of the window's level in the bipyramid.

    Returns:
        (R, side, side) bool; parts of the window outside the image are simply 0 when the polygon
        lies inside the image.
    """
    out = np.zeros((len(polygons), side, side), dtype=bool)
    for i, (polys, box) in enumerate(zip(polygons, windows.tolist(), strict=True)):
        scale = side / (box[2] - box[0])
        shifted = []
        for poly in polys:
            xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2) - box[:2]
            shifted.append((xy * scale).reshape(-1).tolist())
        out[i] = rle_to_mask(polygons_to_rle(shifted, side, side)).astype(bool)
    return torch.from_numpy(out).to(windows.device)


def window_bitmask_targets(masks: Tensor, windows: Tensor, side: int) -> Tensor:
    """(R, H, W) GT bitmasks sampled over (R, 4) windows -> (R, side, side) bool.

    detectron2 ``BitMasks.crop_and_resize``: RoIAlign (side × side, scale 1, sampling_ratio 0,
    aligned=True), then ≥ 0.5; outside the image reads 0.
    """
    rois = torch.cat([torch.arange(len(windows), device=windows.device)[:, None], windows], 1)
    sampled = roi_align(masks[:, None].to(windows.dtype), rois, (side, side), 1.0, 0, True)
    return sampled[:, 0] >= 0.5


def _mask_targets(
    targets: Sequence[dict], pairs: Sequence[tuple[int, int]], windows: Tensor, side: int
) -> Tensor:
    """Window mask targets of (image, GT) ``pairs``, from polygons when given, else bitmasks."""
    if "polygons" in targets[0]:
        return window_mask_targets([targets[n]["polygons"][g] for n, g in pairs], windows, side)
    out = torch.zeros(len(pairs), side, side, dtype=torch.bool, device=windows.device)
    for n in sorted({n for n, _ in pairs}):
        rows = [i for i, (m, _) in enumerate(pairs) if m == n]
        gts = torch.tensor([pairs[i][1] for i in rows], device=windows.device)
        out[rows] = window_bitmask_targets(targets[n]["masks"][gts], windows[rows], side)
    return out


def focal_loss_star(
    logits: Tensor, targets: Tensor, gamma: float = 3.0, alpha: float = 0.3
) -> Tensor:
    """FL* (RetinaNet appendix; fvcore ``sigmoid_focal_loss_star``), summed.

    ``−log σ(γ·x·(2t − 1)) / γ · (α·t + (1 − α)(1 − t))`` per logit x and 0/1 target t.
    """
    signed = logits * (2 * targets - 1)
    loss = -F.logsigmoid(gamma * signed) / gamma
    return (loss * (alpha * targets + (1 - alpha) * (1 - targets))).sum()


def mask_loss(
    logits: Tensor, targets: Tensor, loss_weight: float = 2.0, pos_weight: float = 1.5
) -> Tensor:
    """Summed over windows: ``loss_weight`` × the per-window pixel mean of BCE with pos_weight.

    Args:
        logits: (F, M, M) natural mask logits of the positive windows of one (level, size).
        targets: (F, M, M) 0/1.
    """
    side = logits.shape[-1]
    return F.binary_cross_entropy_with_logits(
        logits,
        targets.to(logits.dtype),
        weight=torch.full_like(logits, loss_weight / side**2),
        pos_weight=torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device),
        reduction="sum",
    )


def tensormask_losses(
    logits: Sequence[Tensor],
    deltas: Sequence[Tensor],
    aligned: Sequence[Sequence[Tensor]],
    targets: Sequence[dict],
    mask_sizes: Sequence[int] = (11, 15),
    bipyramid_on: bool = True,
) -> dict[str, Tensor]:
    """TensorMask's training losses for a batch, each divided by max(1, number of positives).

    Args:
        logits, deltas: per level (N, A·K, H_k, W_k) and (N, A·4, H_k, W_k) head outputs.
        aligned: per level, per window size (N, m², H, W) aligned mask logits.
        targets: per image ``{"boxes": (G, 4) xyxy, "labels": (G,) int64 0..K-1}`` and either
            ``"polygons"`` (G lists of COCO polygons, detectron2's default mask format) or
            ``"masks"`` ((G, h, w) bitmasks), in network-input pixels.

    Returns:
        ``loss_cls`` (FL*, γ 3, α 0.3), ``loss_box_reg`` (L1 on weighted deltas),
        ``loss_mask`` (per-window mean BCE, pos_weight 1.5, × 2).
    """
    num_anchors = deltas[0].shape[1] // 4
    shapes = [x.shape[-2:] for x in logits]
    device, dtype = logits[0].device, logits[0].dtype
    windows = torch.cat(level_windows(shapes, device=device, dtype=dtype))
    unit = torch.cat(
        [
            torch.full((h * w * num_anchors,), float(STRIDES[k]), device=device, dtype=dtype)
            for k, (h, w) in enumerate(shapes)
        ]
    )
    index = window_index(shapes, num_anchors, device)
    flat_logits = flatten_levels(logits, num_anchors)
    flat_deltas = flatten_levels(deltas, num_anchors)
    cls_target = torch.zeros_like(flat_logits)
    pos_images, pos_windows, pos_gt, box_loss = [], [], [], flat_deltas.sum() * 0
    for n, target in enumerate(targets):
        matches, positive = assign_windows(target["boxes"].to(dtype), windows, unit)
        pos = torch.nonzero(positive).squeeze(1)
        cls_target[n, pos, target["labels"][matches[pos]]] = 1.0
        box_target = encode_boxes(target["boxes"].to(dtype)[matches[pos]], windows[pos])
        box_loss = box_loss + (flat_deltas[n, pos] - box_target).abs().sum()
        pos_images += [n] * len(pos)
        pos_windows.append(pos)
        pos_gt += [(n, g) for g in matches[pos].tolist()]
    pos_windows = torch.cat(pos_windows)
    pos_images = torch.tensor(pos_images, dtype=torch.long, device=device)
    norm = max(1, len(pos_windows))
    loss_mask = sum(m.sum() * 0 for per_size in aligned for m in per_size)
    level, row, col, anchor = index[pos_windows].unbind(1)
    for k, per_size in enumerate(aligned):
        for a, pred in enumerate(per_size):
            sel = torch.nonzero((level == k) & (anchor == a)).squeeze(1)
            if sel.numel() == 0:
                continue
            lam = 2**k if bipyramid_on else 1
            natural = natural_masks_at(pred, k, bipyramid_on, pos_images[sel], row[sel], col[sel])
            pairs = [pos_gt[i] for i in sel.tolist()]
            gt = _mask_targets(targets, pairs, windows[pos_windows[sel]], lam * mask_sizes[a])
            loss_mask = loss_mask + mask_loss(natural, gt)
    return {
        "loss_cls": focal_loss_star(flat_logits, cls_target) / norm,
        "loss_box_reg": box_loss / norm,
        "loss_mask": loss_mask / norm,
    }


class RetinaNetResNetFPN(ResNetFPN):
    """detectron2 ``build_retinanet_resnet_fpn_backbone`` as TensorMask configures it.

    The FPN of :class:`~detseg.backbones.d2.ResNetFPN` with ``FUSE_TYPE avg`` (each top-down sum
    halved, the halved map propagating) and ``LastLevelP6P7`` from C5 (2048 channels; ReLU only
    before p7). ``forward(image (N, 3, H, W), H, W multiples of 32) -> (p2, ..., p7)``.
    """

    def __init__(self, depth: int = 50, out_channels: int = 256) -> None:
        super().__init__(depth=depth, fpn_out_channels=out_channels)
        self.top_block = nn.Module()
        self.top_block.p6 = nn.Conv2d(2048, out_channels, 3, stride=2, padding=1)
        self.top_block.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        for conv in (self.top_block.p6, self.top_block.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        feats = self.bottom_up(image)
        prev = self.fpn_lateral5(feats["res5"])
        outs = [self.fpn_output5(prev)]
        for level in (4, 3, 2):
            lateral = getattr(self, f"fpn_lateral{level}")(feats[f"res{level}"])
            prev = (lateral + F.interpolate(prev, scale_factor=2.0, mode="nearest")) / 2
            outs.insert(0, getattr(self, f"fpn_output{level}")(prev))
        p6 = self.top_block.p6(feats["res5"])
        return (*outs, p6, self.top_block.p7(F.relu(p6)))


class TensorMask(nn.Module):
    """TensorMask R50-FPN: ``forward(images) -> raw head outputs`` (exportable, memory-bounded).

    ``images``: (N, 3, H, W) BGR 0..255 minus ``PIXEL_MEAN``, zero-padded to multiples of 32.
    The forward returns the head's flat tuple with the **aligned** masks (the P2-grid logits
    before SwapAlign2Nat): the natural masks are formed only where needed, for the training
    positives (:meth:`compute_loss`) and the kept detections (:meth:`postprocess`).

    Args:
        num_classes: K sigmoid classes (80 for COCO).
        score_thresh, topk_candidates, nms_thresh, max_detections: test settings (§9).
    """

    def __init__(
        self,
        num_classes: int = 80,
        score_thresh: float = 0.05,
        topk_candidates: int = 6000,
        nms_thresh: float = 0.5,
        max_detections: int = 100,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.test_settings = (score_thresh, topk_candidates, nms_thresh, max_detections)
        self.backbone = RetinaNetResNetFPN()
        self.head = TensorMaskHead(num_classes=num_classes, apply_swap_align2nat=False)

    def onnx_spec(self) -> OnnxSpec:
        """What ``detseg export`` writes: the raw head outputs with the aligned mask logits;
        window selection, NMS and SwapAlign2Nat of the kept windows are ``postprocess``."""
        return OnnxSpec(
            size_multiple=32,
            note="raw head outputs (aligned mask logits); selection, NMS, SwapAlign2Nat beside",
        )

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return self.head(*self.backbone(images))

    def _split(self, outputs: Sequence[Tensor]) -> tuple[list, list, list]:
        return split_head_outputs(outputs, self.head.num_levels)

    def compute_loss(self, outputs: Sequence[Tensor], targets: Sequence[dict]) -> dict[str, Tensor]:
        """Losses of a ``forward``; ``targets`` as in :func:`tensormask_losses`."""
        logits, deltas, aligned = self._split(outputs)
        return tensormask_losses(
            logits, deltas, aligned, targets, self.head.mask_sizes, self.head.bipyramid_on
        )

    @torch.no_grad()
    def postprocess(
        self,
        outputs: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[Instances]:
        """Eval outputs -> one ``Instances`` per image at ``original_sizes`` (default image_sizes).

        ``image_sizes``: the resized, unpadded (H, W) of each image in the batch.
        """
        logits, deltas, aligned = self._split(outputs)
        shapes = [x.shape[-2:] for x in logits]
        windows = level_windows(shapes, device=logits[0].device, dtype=logits[0].dtype)
        results = []
        for n, size in enumerate(image_sizes):
            dets = select_detections(
                [x[n] for x in logits], [x[n] for x in deltas], windows, *self.test_settings
            )
            masks = detection_masks(aligned, dets, n, self.head.bipyramid_on)
            results.append(postprocess(dets, masks, size, (original_sizes or image_sizes)[n]))
        return results

    @classmethod
    def from_detectron2(cls, path: str | Path, **overrides: Any) -> TensorMask:
        """Load a detectron2 model-zoo TensorMask ``.pkl`` (319 arrays) through the safe unpickler."""
        state, _ = read_state_dict(path)
        kwargs, converted = convert_detectron2(state)
        model = cls(**{**kwargs, **overrides})
        load_state_dict_strict(model, converted, str(path), "tensormask_r50_fpn")
        return model.eval()


D2_PREPROCESS = {  # MSRA caffe R-50: BGR 0..255 minus detectron2's PIXEL_MEAN, std 1
    "channel_order": "BGR",
    "mean": (103.530, 116.280, 123.675),
    "std": (1.0, 1.0, 1.0),
    "post_scale": 1.0,
}


def d2_test_size(
    height: int, width: int, short: int = 800, max_size: int = 1333
) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge`` test size (h, w): short side ``short``, long ≤ ``max_size``."""
    scale = short / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def convert_detectron2(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """detectron2 TensorMask state dict -> (constructor kwargs, detseg state dict).

    The names are already detectron2's; anchors and pixel statistics are dropped. The class count
    comes from ``head.cls_score`` (2 windows per location).
    """
    if "head.cls_score.weight" not in state or "head.mask_pred_11.weight" not in state:
        raise CheckpointError(
            "not a TensorMask checkpoint: no 'head.cls_score' / 'head.mask_pred_11' weights; "
            "pass a detectron2 projects/TensorMask model_final_*.pkl."
        )
    out = {
        k: torch.as_tensor(v)
        for k, v in state.items()
        if not k.startswith(("anchor_generator.", "pixel_mean", "pixel_std"))
    }
    return {"num_classes": int(out["head.cls_score.weight"].shape[0]) // 2}, out


@register_model(
    "tensormask_r50_fpn",
    aliases=("tensormask_r50",),
    task="instance",
    summary="TensorMask, ResNet-50 FPN P2-P7, tensor bipyramid (Chen et al., ICCV 2019)",
    official=OfficialFormat(
        description="detectron2 projects/TensorMask model_final_*.pkl (weights under 'model')",
        convert=convert_detectron2,
        preprocess=lambda kwargs: dict(D2_PREPROCESS),
    ),
)
def tensormask_r50_fpn(**kwargs: Any) -> TensorMask:
    """TensorMask R50-FPN with the released 1x/6x head (aligned, bipyramid); see ``TensorMask``."""
    return TensorMask(**kwargs)

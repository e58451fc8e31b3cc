"""TensorMask training targets and losses (spec §7-§8).

Assignment by containment, scale, centrality and uniqueness; FL* classification, L1 box and
per-window mask BCE losses, each normalised by the number of positive windows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from detseg.instance.tensormask_windows import (
    STRIDES,
    encode_boxes,
    flatten_levels,
    level_windows,
    natural_masks_at,
    window_index,
)
from detseg.ops.masks import polygons_to_rle, rle_to_mask


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

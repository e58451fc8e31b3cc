"""TensorMask inference (spec §9): top-k, box decoding, NMS, masks of the kept windows, paste.

Masks are formed only for the detections that survive (:func:`sparse_detection_masks`): per
kept window, the 1x1 mask predictor runs on the crop of the level's fused P2-grid features that
SwapAlign2Nat reads, in row chunks of bounded size, so the peak memory grows with the kept
detections rather than with the image area times the mask area. :func:`dense_detection_masks`
picks the same masks out of the dense natural tensors (training-time path, equality test).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detseg.instance.tensormask_windows import decode_boxes, flatten_levels, window_index
from detseg.ops.swap_align2nat import DEFAULT_PAD, input_span, swap_align2nat_windows
from detseg.results import Instances

if TYPE_CHECKING:
    from detseg.instance.tensormask import TensorMaskHead


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


def _covered(lo: Tensor, hi: Tensor, size: int) -> tuple[int, int]:
    """Pixel indices [a, b) whose centres can lie in [lo, hi] (one pixel of margin), clipped."""
    return max(0, math.floor(lo.item()) - 1), min(size, math.ceil(hi.item()) + 1)


def paste_masks(
    masks: Sequence[Tensor], boxes: Tensor, height: int, width: int, threshold: float = 0.5
) -> Tensor:
    """Paste R probability maps (M_i, M_i) into (R, 4) xyxy boxes of a (height, width) image.

    detectron2's ``paste_masks_in_image`` rule: pixel (i, j) has centre (j + 0.5, i + 0.5), is
    sampled bilinearly (``align_corners=False``, zero outside the mask) at its position relative
    to the box, and is on where the value is ≥ ``threshold``. Returns (R, height, width) bool.
    A pixel whose centre is outside the box samples under half the border value and stays off,
    so each map is sampled only over its box (memory ∝ box area, one map at a time).
    """
    out = torch.zeros(len(masks), height, width, dtype=torch.bool, device=boxes.device)
    for i, mask in enumerate(masks):
        dtype = mask.dtype
        x0, y0, x1, y1 = boxes[i].to(dtype).unbind()
        r0, r1 = _covered(y0, y1, height)
        c0, c1 = _covered(x0, x1, width)
        if r1 <= r0 or c1 <= c0:
            continue
        ys = torch.arange(r0, r1, device=mask.device, dtype=dtype) + 0.5
        xs = torch.arange(c0, c1, device=mask.device, dtype=dtype) + 0.5
        gy = (ys - y0) / (y1 - y0) * 2 - 1
        gx = (xs - x0) / (x1 - x0) * 2 - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=2)
        pasted = F.grid_sample(mask[None, None], grid[None], align_corners=False)
        out[i, r0:r1, c0:c1] = pasted[0, 0] >= threshold
    return out


def window_mask_logits(
    fused: Tensor,
    predictor: nn.Conv2d,
    lambda_val: int,
    row: int,
    col: int,
    max_elements: int = 1 << 22,
) -> Tensor:
    """Natural (M, M) mask logits of one window, M = λ·m, from its level's fused features.

    Args:
        fused: (1, C, H, W) fused mask features on the P2 grid
            (:meth:`TensorMaskHead.fused_mask_features`).
        predictor: the window size's 1×1 conv (C -> m²), run only on the crops read here.
        lambda_val: λ of the level; row, col: the window's cell on the level's grid.
        max_elements: bound on the aligned logits of one crop (m² × rows × columns).

    Equals ``swap_align2nat(predictor(fused), λ)[0, :, row, col].view(M, M)``: the natural rows
    are evaluated in chunks, each on the crop of aligned logits that its taps read.
    """
    channels = predictor.out_channels
    side = math.isqrt(channels)
    vout = lambda_val * side
    height, width = fused.shape[-2:]
    x0, x1 = input_span(lambda_val, side, col, 0, vout, width)
    chunk = max(1, max_elements // (channels * max(1, x1 - x0)) - 1)
    zero = torch.zeros(1, dtype=torch.long, device=fused.device)
    parts = []
    for v0 in range(0, vout, chunk):
        v1 = min(vout, v0 + chunk)
        y0, y1 = input_span(lambda_val, side, row, v0, v1, height)
        if y1 <= y0 or x1 <= x0:  # these rows read only padding
            parts.append(fused.new_full((v1 - v0, vout), DEFAULT_PAD))
            continue
        crop = predictor(fused[:, :, y0:y1, x0:x1])
        parts.append(
            swap_align2nat_windows(
                crop, lambda_val, zero, zero + row, zero + col, origin=(y0, x0), v_rows=(v0, v1)
            )[0]
        )
    return torch.cat(parts)


def sparse_detection_masks(
    head: TensorMaskHead,
    towers: Sequence[Tensor],
    dets: dict[str, Tensor],
    max_elements: int = 1 << 22,
) -> list[Tensor]:
    """Natural mask probabilities of the kept detections only (memory ∝ detections).

    Args:
        head: the aligned, bipyramid head.
        towers: per level (1, C, H_k, W_k) mask-tower features of one image.
        dets: :func:`select_detections` output for that image.

    Returns:
        One (M, M) float probability map per detection, M = λ_k·m_a. The fused P2-grid features
        exist for one level at a time; the mask logits for one row chunk of one window.
    """
    out: list[Tensor] = [torch.empty(0)] * len(dets["scores"])
    for level in sorted(set(dets["level"].tolist())):
        fused = head.fused_mask_features(towers, level)
        lam = head.level_lambda(level)
        for i in torch.nonzero(dets["level"] == level).squeeze(1).tolist():
            predictor = head.mask_predictor(int(dets["anchor"][i]))
            row, col = int(dets["row"][i]), int(dets["col"][i])
            out[i] = window_mask_logits(fused, predictor, lam, row, col, max_elements).sigmoid()
    return out


def dense_detection_masks(
    natural: Sequence[Sequence[Tensor]], dets: dict[str, Tensor], image: int
) -> list[Tensor]:
    """The same maps as :func:`sparse_detection_masks`, read from dense natural tensors.

    Args:
        natural: per level, per window size (N, M², H_k, W_k) natural logits
            (:meth:`TensorMaskHead.natural_masks`).
        dets: :func:`select_detections` output for image ``image``.
    """
    out = []
    keys = ("level", "anchor", "row", "col")
    for k, a, row, col in zip(*(dets[key].tolist() for key in keys), strict=True):
        logits = natural[k][a][image, :, row, col]
        side = math.isqrt(logits.numel())
        out.append(logits.view(side, side).sigmoid())
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
    pasted = paste_masks([masks[i] for i in keep.tolist()], windows, out_h, out_w)
    return Instances(
        boxes=boxes[keep], scores=dets["scores"][keep], labels=dets["classes"][keep], masks=pasted
    )

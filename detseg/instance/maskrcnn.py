"""Mask R-CNN R50-FPN as detectron2's ``Base-RCNN-FPN`` / ``mask_rcnn_R_50_FPN_1x`` computes it.

Module names are detectron2's (``backbone``, ``proposal_generator.rpn_head``,
``roi_heads.box_head``, ``roi_heads.box_predictor``, ``roi_heads.mask_head``), so model-zoo
``model_final_*.pkl`` state dicts load with ``strict=True``. Every part is a small module that a
``d2_*`` parity fixture pins (``../shared/parity/README_d2.md``):

- ``AnchorGenerator``: one size and three aspect ratios per level, unrounded, offset 0.
- ``RPNHead`` + ``RPNProposals``: per-level top-k, decode, clip, drop empty, per-level NMS, top-k.
- ``MultiLevelRoIAlign``: ``torchvision.ops.roi_align(aligned=True)`` (= detectron2's ROIAlignV2)
  with the level rule ``floor(4 + log2(sqrt(area)/224 + 1e-8))``. torchvision's
  ``MultiScaleRoIAlign`` is not used: it is not aligned and puts the epsilon outside the log.
- ``BoxHead`` + ``BoxInference``: 2 FC, class-specific deltas, background last, score > 0.05,
  per-class NMS 0.5, top 100.
- ``MaskHead`` + ``PasteMasks``: 4 conv + deconv to 28x28, pasted by grid sampling inside the box
  window (detectron2's CPU path), threshold >= 0.5.

Boxes are xyxy in absolute pixels throughout; classes are 0..K-1 (background is column K).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, roi_align

from detseg.backbones.d2 import ResNetFPN
from detseg.checkpoint import load_state_dict_strict, read_state_dict
from detseg.data.preprocess import Preprocess
from detseg.engine.export import OnnxSpec
from detseg.errors import CheckpointError
from detseg.registry import OfficialFormat, register_model
from detseg.results import Instances

SCALE_CLAMP = math.log(1000.0 / 16)
PIXEL_MEAN_BGR = (103.53, 116.28, 123.675)
# The model subtracts PIXEL_MEAN itself; the pipeline only reorders to BGR, in 0..255.
D2_PREPROCESS = {
    "channel_order": "BGR",
    "mean": (0.0, 0.0, 0.0),
    "std": (1.0, 1.0, 1.0),
    "post_scale": 1.0,
}


# -------------------------------------------------------------------------------- box utilities
def apply_deltas(
    deltas: Tensor, boxes: Tensor, weights: Sequence[float], scale_clamp: float = SCALE_CLAMP
) -> Tensor:
    """Decode ``deltas`` (R, 4k) of (dx, dy, dw, dh) against ``boxes`` (R, 4) xyxy -> (R, 4k) xyxy."""
    deltas = deltas.float()
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=scale_clamp)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=scale_clamp)
    cx = dx * widths[:, None] + ctr_x[:, None]
    cy = dy * heights[:, None] + ctr_y[:, None]
    w = torch.exp(dw) * widths[:, None]
    h = torch.exp(dh) * heights[:, None]
    out = torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
    return out.reshape(deltas.shape)


def clip_boxes(boxes: Tensor, height: int | Tensor, width: int | Tensor) -> Tensor:
    """Clamp ``boxes`` (..., 4) xyxy to x in [0, width], y in [0, height]."""
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def _pad_rows(t: Tensor, n: int, value: float) -> Tensor:
    """Pad (or cut) the first dimension of ``t`` to ``n`` rows filled with ``value``."""
    out = t.new_full((n, *t.shape[1:]), value)
    out[: min(n, len(t))] = t[:n]
    return out


# -------------------------------------------------------------------------------------- anchors
class AnchorGenerator(nn.Module):
    """detectron2 ``DefaultAnchorGenerator``: ``forward(*features) -> anchors per level (HWA, 4)``.

    Row ``(i * W + j) * A + a`` is map cell (i, j) and anchor a (sizes outer, ratios inner), centred
    at ``((j + offset) * stride, (i + offset) * stride)`` in input pixels.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,)),
        aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),),
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        n = len(strides)
        sizes = list(sizes) * n if len(sizes) == 1 else list(sizes)
        ratios = list(aspect_ratios) * n if len(aspect_ratios) == 1 else list(aspect_ratios)
        self.strides, self.offset = list(strides), offset
        self.cell_anchors = [self._cell(s, r) for s, r in zip(sizes, ratios, strict=True)]
        self.num_anchors = len(self.cell_anchors[0])

    @staticmethod
    def _cell(sizes: Sequence[float], ratios: Sequence[float]) -> Tensor:
        rows = []
        for size in sizes:
            for r in ratios:
                w = math.sqrt(size**2 / r)
                h = r * w
                rows.append((-w / 2.0, -h / 2.0, w / 2.0, h / 2.0))
        return torch.tensor(rows, dtype=torch.float32)

    def forward(self, *features: Tensor) -> tuple[Tensor, ...]:
        out = []
        for feat, stride, cell in zip(features, self.strides, self.cell_anchors, strict=True):
            h, w = feat.shape[-2:]
            kw = {"dtype": torch.float32, "device": feat.device}
            xs = torch.arange(self.offset * stride, w * stride, step=stride, **kw)
            ys = torch.arange(self.offset * stride, h * stride, step=stride, **kw)
            sy, sx = torch.meshgrid(ys, xs, indexing="ij")
            sx, sy = sx.reshape(-1), sy.reshape(-1)
            shifts = torch.stack((sx, sy, sx, sy), dim=1)
            out.append((shifts[:, None, :] + cell.to(feat.device)[None]).reshape(-1, 4))
        return tuple(out)


# ------------------------------------------------------------------------------------------ RPN
class RPNHead(nn.Module):
    """detectron2 ``StandardRPNHead``: ``forward(*features) -> (*objectness, *deltas)``.

    Objectness per level is (N, A, H, W); deltas (N, 4A, H, W) with channel ``4a + j``.
    """

    def __init__(
        self,
        in_channels: int = 256,
        num_anchors: int = 3,
        box_dim: int = 4,
        conv_dims: Sequence[int] = (-1,),
    ) -> None:
        super().__init__()
        if list(conv_dims) != [-1]:
            raise ValueError("only conv_dims [-1] (one conv of in_channels) is supported")
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * box_dim, 1)

    def forward(self, *features: Tensor) -> tuple[Tensor, ...]:
        hidden = [F.relu(self.conv(f)) for f in features]
        return tuple(self.objectness_logits(t) for t in hidden) + tuple(
            self.anchor_deltas(t) for t in hidden
        )


class RPNProposals(nn.Module):
    """detectron2 ``RPN.predict_proposals`` + ``find_top_rpn_proposals`` in eval mode.

    ``forward(*anchors (HWA, 4), *logits (N, A, H, W), *deltas (N, 4A, H, W), image_sizes (N, 2))``
    returns proposals (N, post_nms_topk, 4), their raw logits (N, post_nms_topk) and the real
    counts (N,), padded with zeros.
    """

    def __init__(
        self,
        pre_nms_topk: int = 1000,
        post_nms_topk: int = 1000,
        nms_thresh: float = 0.7,
        min_box_size: float = 0.0,
        bbox_reg_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        scale_clamp: float = SCALE_CLAMP,
        box_dim: int = 4,
    ) -> None:
        super().__init__()
        if box_dim != 4:
            raise ValueError("only axis-aligned boxes (box_dim 4) are supported")
        self.pre_nms_topk, self.post_nms_topk = pre_nms_topk, post_nms_topk
        self.nms_thresh, self.min_box_size = nms_thresh, min_box_size
        self.weights, self.scale_clamp = tuple(bbox_reg_weights), scale_clamp

    def select(
        self,
        anchors: Sequence[Tensor],
        logits: Sequence[Tensor],
        deltas: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image (boxes (P, 4), logits (P,)), best first; inputs as in ``forward``."""
        n = logits[0].shape[0]
        boxes_l, scores_l, levels_l = [], [], []
        for lvl, (anc, lg, dl) in enumerate(zip(anchors, logits, deltas, strict=True)):
            a = lg.shape[1]
            lg = lg.permute(0, 2, 3, 1).reshape(n, -1)
            dl = dl.view(n, a, 4, *dl.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
            k = min(self.pre_nms_topk, lg.shape[1])
            top, idx = lg.topk(k, dim=1)
            sel_deltas = torch.gather(dl, 1, idx[..., None].expand(-1, -1, 4))
            decoded = apply_deltas(
                sel_deltas.reshape(-1, 4), anc[idx.reshape(-1)], self.weights, self.scale_clamp
            )
            boxes_l.append(decoded.view(n, k, 4))
            scores_l.append(top)
            levels_l.append(torch.full((k,), lvl, dtype=torch.int64, device=lg.device))
        boxes, scores, levels = torch.cat(boxes_l, 1), torch.cat(scores_l, 1), torch.cat(levels_l)
        results = []
        for i, (h, w) in enumerate(image_sizes):
            b, s, lv = boxes[i], scores[i], levels
            valid = torch.isfinite(b).all(dim=1) & torch.isfinite(s)
            b, s, lv = b[valid], s[valid], lv[valid]
            b = clip_boxes(b, h, w)
            keep = ((b[:, 2] - b[:, 0]) > self.min_box_size) & (
                (b[:, 3] - b[:, 1]) > self.min_box_size
            )
            b, s, lv = b[keep], s[keep], lv[keep]
            keep = batched_nms(b, s, lv, self.nms_thresh)[: self.post_nms_topk]
            results.append((b[keep], s[keep]))
        return results

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n_lvl = (len(inputs) - 1) // 3
        anchors, logits = inputs[:n_lvl], inputs[n_lvl : 2 * n_lvl]
        deltas, sizes = inputs[2 * n_lvl : 3 * n_lvl], inputs[-1]
        per_image = self.select(
            anchors, logits, deltas, [(int(h), int(w)) for h, w in sizes.tolist()]
        )
        k = self.post_nms_topk
        props = torch.stack([_pad_rows(b, k, 0.0) for b, _ in per_image])
        scores = torch.stack([_pad_rows(s, k, 0.0) for _, s in per_image])
        counts = torch.tensor([float(len(b)) for b, _ in per_image], device=props.device)
        return props, scores, counts


class RPN(nn.Module):
    """The proposal generator: ``rpn_head`` + ``anchor_generator`` + proposal selection."""

    def __init__(
        self,
        in_channels: int = 256,
        pre_nms_topk: int = 1000,
        post_nms_topk: int = 1000,
        nms_thresh: float = 0.7,
    ) -> None:
        super().__init__()
        self.anchor_generator = AnchorGenerator()
        self.rpn_head = RPNHead(in_channels, self.anchor_generator.num_anchors)
        self.proposals = RPNProposals(pre_nms_topk, post_nms_topk, nms_thresh)

    def forward(
        self, features: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> list[tuple[Tensor, Tensor]]:
        """``features`` p2..p6 (N, C, H, W) -> per image (proposals (P, 4), logits (P,))."""
        out = self.rpn_head(*features)
        n = len(features)
        return self.proposals.select(
            self.anchor_generator(*features), out[:n], out[n:], image_sizes
        )


# ------------------------------------------------------------------------------------ RoIAlign
class MultiLevelRoIAlign(nn.Module):
    """detectron2 ``ROIPooler`` (ROIAlignV2): ``forward(*features, boxes (K, 5)) -> (K, C, S, S)``.

    ``boxes`` rows are ``[batch_index, x1, y1, x2, y2]`` in image pixels; ``features`` are the FPN
    levels whose strides are ``1 / scales``.
    """

    def __init__(
        self,
        output_size: int = 7,
        scales: Sequence[float] = (1 / 4, 1 / 8, 1 / 16, 1 / 32),
        sampling_ratio: int = 0,
        pooler_type: str = "ROIAlignV2",
        canonical_box_size: int = 224,
        canonical_level: int = 4,
    ) -> None:
        super().__init__()
        if pooler_type != "ROIAlignV2":
            raise ValueError("only pooler_type 'ROIAlignV2' (aligned RoIAlign) is supported")
        self.output_size, self.scales, self.sampling_ratio = (
            output_size,
            list(scales),
            sampling_ratio,
        )
        self.min_level = int(round(-math.log2(self.scales[0])))
        self.max_level = int(round(-math.log2(self.scales[-1])))
        self.canonical_box_size, self.canonical_level = canonical_box_size, canonical_level

    def levels(self, boxes: Tensor) -> Tensor:
        """Level index (0 = first feature) of every box (K, 4) xyxy."""
        size = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        lvl = torch.floor(self.canonical_level + torch.log2(size / self.canonical_box_size + 1e-8))
        return (lvl.clamp(self.min_level, self.max_level) - self.min_level).long()

    def forward(self, *inputs: Tensor) -> Tensor:
        *features, boxes = inputs
        levels = self.levels(boxes[:, 1:])
        c, s = features[0].shape[1], self.output_size
        out = features[0].new_zeros((len(boxes), c, s, s))
        for i, (feat, scale) in enumerate(zip(features, self.scales, strict=True)):
            idx = torch.nonzero(levels == i).squeeze(1)
            if len(idx):
                out[idx] = roi_align(
                    feat, boxes[idx].to(feat.dtype), s, scale, self.sampling_ratio, aligned=True
                )
        return out


def pooler_boxes(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image boxes (R_i, 4) -> (sum R_i, 5) rows ``[batch_index, x1, y1, x2, y2]``."""
    return torch.cat([torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)])


# ----------------------------------------------------------------------------------- box head
class FastRCNNConvFCHead(nn.Module):
    """``num_fc`` FC + ReLU layers over flattened pooled features (R, C, S, S) -> (R, fc_dim)."""

    def __init__(
        self,
        in_channels: int = 256,
        pooler_resolution: int = 7,
        num_fc: int = 2,
        fc_dim: int = 1024,
    ) -> None:
        super().__init__()
        dim = in_channels * pooler_resolution**2
        for k in range(num_fc):
            self.add_module(f"fc{k + 1}", nn.Linear(dim, fc_dim))
            dim = fc_dim
        self.num_fc = num_fc

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for k in range(self.num_fc):
            x = F.relu(getattr(self, f"fc{k + 1}")(x))
        return x


class FastRCNNOutputLayers(nn.Module):
    """``cls_score`` (K + 1 logits, background last) and class-specific ``bbox_pred`` (4K)."""

    def __init__(
        self, in_features: int = 1024, num_classes: int = 80, cls_agnostic_bbox_reg: bool = False
    ) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 * (1 if cls_agnostic_bbox_reg else num_classes))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


class BoxHead(nn.Module):
    """``box_head`` + ``box_predictor``: ``forward(pooled (R, C, 7, 7)) -> (scores, deltas)``."""

    def __init__(
        self,
        in_channels: int = 256,
        pooler_resolution: int = 7,
        num_conv: int = 0,
        conv_dim: int = 256,
        num_fc: int = 2,
        fc_dim: int = 1024,
        norm: str = "",
        num_classes: int = 80,
        cls_agnostic_bbox_reg: bool = False,
    ) -> None:
        super().__init__()
        if num_conv or norm:
            raise ValueError("only the FC box head (num_conv 0, no norm) is supported")
        self.box_head = FastRCNNConvFCHead(in_channels, pooler_resolution, num_fc, fc_dim)
        self.box_predictor = FastRCNNOutputLayers(fc_dim, num_classes, cls_agnostic_bbox_reg)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        return self.box_predictor(self.box_head(pooled))


class BoxInference(nn.Module):
    """detectron2 ``FastRCNNOutputLayers.inference`` + ``fast_rcnn_inference``.

    ``forward(proposals (N, R, 4), scores (N, R, K+1), deltas (N, R, 4K), image_sizes (N, 2))``
    returns boxes (N, D, 4), scores (N, D), classes (N, D), proposal indices (N, D) and counts
    (N,), padded to D = ``detections_per_image`` (0 for boxes and scores, -1 for the others).
    """

    def __init__(
        self,
        num_classes: int = 80,
        score_thresh_test: float = 0.05,
        nms_thresh_test: float = 0.5,
        detections_per_image: int = 100,
        bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        scale_clamp: float = SCALE_CLAMP,
        cls_agnostic_bbox_reg: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes, self.score_thresh = num_classes, score_thresh_test
        self.nms_thresh, self.topk = nms_thresh_test, detections_per_image
        self.weights, self.scale_clamp = tuple(bbox_reg_weights), scale_clamp

    def single(
        self, proposals: Tensor, scores: Tensor, deltas: Tensor, image_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One image: (boxes (D, 4), scores (D,), classes (D,) int64, proposal indices (D,))."""
        boxes = apply_deltas(deltas, proposals, self.weights, self.scale_clamp)
        probs = F.softmax(scores, dim=-1)
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
        rows = torch.nonzero(valid).squeeze(1)
        boxes, probs = boxes[valid], probs[valid, :-1]
        boxes = clip_boxes(boxes.reshape(-1, 4), *image_size).view(len(boxes), -1, 4)
        mask = probs > self.score_thresh
        inds = torch.nonzero(mask)
        boxes = boxes[inds[:, 0], 0] if boxes.shape[1] == 1 else boxes[mask]
        probs = probs[mask]
        keep = batched_nms(boxes, probs, inds[:, 1], self.nms_thresh)[: self.topk]
        return boxes[keep], probs[keep], inds[keep, 1], rows[inds[keep, 0]]

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        proposals, scores, deltas, sizes = inputs
        outs = [
            self.single(p, s, d, (int(h), int(w)))
            for p, s, d, (h, w) in zip(proposals, scores, deltas, sizes.tolist(), strict=True)
        ]
        k = self.topk
        boxes = torch.stack([_pad_rows(o[0], k, 0.0) for o in outs])
        probs = torch.stack([_pad_rows(o[1], k, 0.0) for o in outs])
        classes = torch.stack([_pad_rows(o[2].float(), k, -1.0) for o in outs])
        indices = torch.stack([_pad_rows(o[3].float(), k, -1.0) for o in outs])
        counts = torch.tensor([float(len(o[0])) for o in outs], device=boxes.device)
        return boxes, probs, classes, indices, counts


# ---------------------------------------------------------------------------------- mask head
class MaskHead(nn.Module):
    """detectron2 ``MaskRCNNConvUpsampleHead``: pooled (R, C, 14, 14) -> logits (R, K, 28, 28)."""

    def __init__(
        self,
        in_channels: int = 256,
        num_classes: int = 80,
        num_conv: int = 4,
        conv_dim: int = 256,
        norm: str = "",
        cls_agnostic_mask: bool = False,
    ) -> None:
        super().__init__()
        if norm:
            raise ValueError("only the mask head without norm is supported")
        self.num_conv = num_conv
        dim = in_channels
        for k in range(num_conv):
            self.add_module(f"mask_fcn{k + 1}", nn.Conv2d(dim, conv_dim, 3, padding=1))
            dim = conv_dim
        self.deconv = nn.ConvTranspose2d(dim, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, 1 if cls_agnostic_mask else num_classes, 1)

    def forward(self, pooled: Tensor) -> Tensor:
        x = pooled
        for k in range(self.num_conv):
            x = F.relu(getattr(self, f"mask_fcn{k + 1}")(x))
        return self.predictor(F.relu(self.deconv(x)))


def paste_masks(
    masks: Tensor, boxes: Tensor, height: int, width: int, threshold: float = 0.5
) -> Tensor:
    """Paste box-relative probabilities (R, M, M) into (R, height, width) bool masks.

    Pixel centres (index + 0.5) map to ``(p - x1) / (x2 - x1) * 2 - 1`` and are sampled with
    ``grid_sample`` (bilinear, zero padding, ``align_corners=False``); only pixels in the window
    ``[floor(x1) - 1, ceil(x2) + 1) x [floor(y1) - 1, ceil(y2) + 1)`` are evaluated, as in
    detectron2's CPU path. On where the value is >= ``threshold``.
    """
    r = len(masks)
    if r == 0:
        return masks.new_zeros((0, height, width), dtype=torch.bool)
    boxes = boxes.to(masks.dtype)
    x0, y0, x1, y1 = boxes.unbind(1)
    xs = torch.arange(width, device=masks.device, dtype=masks.dtype) + 0.5
    ys = torch.arange(height, device=masks.device, dtype=masks.dtype) + 0.5
    gx = (xs[None] - x0[:, None]) / (x1 - x0)[:, None] * 2 - 1
    gy = (ys[None] - y0[:, None]) / (y1 - y0)[:, None] * 2 - 1
    grid = torch.stack(
        (gx[:, None, :].expand(r, height, width), gy[:, :, None].expand(r, height, width)), dim=3
    )
    probs = F.grid_sample(masks[:, None], grid, align_corners=False)[:, 0]
    win_x = (xs[None] >= (torch.floor(x0) - 1)[:, None]) & (
        xs[None] < (torch.ceil(x1) + 1)[:, None]
    )
    win_y = (ys[None] >= (torch.floor(y0) - 1)[:, None]) & (
        ys[None] < (torch.ceil(y1) + 1)[:, None]
    )
    return (probs >= threshold) & win_y[:, :, None] & win_x[:, None, :]


class PasteMasks(nn.Module):
    """``forward(masks (R, M, M), boxes (R, 4), image_shape (2,) [h, w]) -> (R, h, w)`` 0/1 float."""

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, masks: Tensor, boxes: Tensor, image_shape: Tensor) -> Tensor:
        h, w = (int(v) for v in image_shape.tolist())
        return paste_masks(masks, boxes, h, w, self.threshold).to(masks.dtype)


# ---------------------------------------------------------------------------------- the model
class RoIHeads(nn.Module):
    """detectron2 ``StandardROIHeads`` at test time: box stage on proposals, mask stage on boxes."""

    def __init__(
        self,
        num_classes: int = 80,
        score_thresh_test: float = 0.05,
        nms_thresh_test: float = 0.5,
        detections_per_image: int = 100,
        in_channels: int = 256,
    ) -> None:
        super().__init__()
        self.box_pooler = MultiLevelRoIAlign(7)
        self.box_head = FastRCNNConvFCHead(in_channels, 7)
        self.box_predictor = FastRCNNOutputLayers(1024, num_classes)
        self.box_inference = BoxInference(
            num_classes, score_thresh_test, nms_thresh_test, detections_per_image
        )
        self.build_mask_stage(in_channels, num_classes)

    def build_mask_stage(self, in_channels: int, num_classes: int) -> None:
        """The mask pooler (14x14, multi-level) and head; PointRend replaces both."""
        self.mask_pooler = MultiLevelRoIAlign(14)
        self.mask_head = MaskHead(in_channels, num_classes)

    def forward(
        self,
        features: Sequence[Tensor],
        proposals: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """p2..p5 + per-image proposals (P_i, 4) -> per image (boxes, scores, classes, probs).

        ``probs`` (D, 28, 28) is the sigmoid of each detection's predicted-class mask logits.
        """
        pooled = self.box_pooler(*features, pooler_boxes(proposals))
        scores, deltas = self.box_predictor(self.box_head(pooled))
        splits = [len(p) for p in proposals]
        dets = [
            self.box_inference.single(p, s, d, size)
            for p, s, d, size in zip(
                proposals, scores.split(splits), deltas.split(splits), image_sizes, strict=True
            )
        ]
        boxes = [d[0] for d in dets]
        probs = self.mask_probs(features, boxes, torch.cat([d[2] for d in dets]))
        probs = probs.split([len(b) for b in boxes])
        return [(b, s, c, p) for (b, s, c, _), p in zip(dets, probs, strict=True)]

    def mask_probs(
        self, features: Sequence[Tensor], boxes: Sequence[Tensor], classes: Tensor
    ) -> Tensor:
        """Predicted-class mask probabilities (R, 28, 28) for per-image ``boxes`` and ``classes`` (R,)."""
        logits = self.mask_head(self.mask_pooler(*features, pooler_boxes(boxes)))
        if logits.shape[1] > 1:
            logits = logits[torch.arange(len(classes), device=logits.device), classes]
        else:
            logits = logits[:, 0]
        return logits.sigmoid()


class RPNRawOutputs(nn.Module):
    """The exportable first stage of ``MaskRCNN``: backbone + RPN head, before any selection.

    ``forward(images (N, 3, H, W) BGR 0..255, H and W multiples of 32)`` returns p2..p6
    (N, 256, H/s, W/s), the RPN objectness logits per level (N, A, H/s, W/s) and the anchor
    deltas per level (N, 4A, H/s, W/s). Proposal selection (top-k, NMS) and the RoI heads are
    data-dependent and stay outside (``RPNProposals``, ``RoIHeads``).
    """

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        feats = m.backbone((images - m.pixel_mean) / m.pixel_std)
        return (*feats, *m.proposal_generator.rpn_head(*feats))


class MaskRCNN(nn.Module):
    """Mask R-CNN R50-FPN (detectron2 ``mask_rcnn_R_50_FPN_1x``), inference on one image.

    ``forward(image (3, H, W) BGR 0..255, output_size (2,) [h, w])`` returns, padded to
    ``detections_per_image`` rows in score order: boxes (D, 4) in output pixels, scores (D,),
    classes (D,) (-1 padding), masks (D, h, w) 0/1 float and the count (1,), as detectron2's
    ``detector_postprocess`` gives them (boxes scaled, clipped, empty boxes dropped, masks pasted).
    The model normalises itself (``pixel_mean``, ``pixel_std``): feed BGR 0..255
    (``default_preprocess``).
    """

    roi_heads_class: type[RoIHeads] = RoIHeads

    def __init__(
        self,
        config: str = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
        num_classes: int = 80,
        pixel_mean: Sequence[float] = PIXEL_MEAN_BGR,
        pixel_std: Sequence[float] = (1.0, 1.0, 1.0),
        size_divisibility: int = 32,
        rpn_pre_nms_topk_test: int = 1000,
        rpn_post_nms_topk_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        score_thresh_test: float = 0.05,
        nms_thresh_test: float = 0.5,
        detections_per_image: int = 100,
        mask_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.config = config
        self.backbone = ResNetFPN()
        self.proposal_generator = RPN(
            256, rpn_pre_nms_topk_test, rpn_post_nms_topk_test, rpn_nms_thresh
        )
        self.roi_heads = self.roi_heads_class(
            num_classes, score_thresh_test, nms_thresh_test, detections_per_image
        )
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False
        )
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        self.size_divisibility, self.mask_threshold = size_divisibility, mask_threshold
        self.detections_per_image = detections_per_image
        self.default_preprocess = Preprocess(**D2_PREPROCESS)

    def features(self, image: Tensor) -> tuple[Tensor, ...]:
        """Normalise, zero-pad to ``size_divisibility`` and run the backbone: p2..p6 (1, 256, ., .)."""
        x = (image.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        d = self.size_divisibility
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % d, 0, -h % d))
        return self.backbone(x[None])

    def detect(
        self, image: Tensor, output_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Unpadded: boxes (D, 4) in output pixels, scores (D,), classes (D,) int64, masks (D, h, w) bool."""
        size = (int(image.shape[-2]), int(image.shape[-1]))
        feats = self.features(image)
        proposals = self.proposal_generator(feats, [size])
        boxes, scores, classes, probs = self.roi_heads(feats[:4], [proposals[0][0]], [size])[0]
        out_h, out_w = output_size
        boxes = boxes.clone()
        boxes[:, 0::2] *= out_w / size[1]
        boxes[:, 1::2] *= out_h / size[0]
        boxes = clip_boxes(boxes, out_h, out_w)
        keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
        boxes, scores, classes, probs = boxes[keep], scores[keep], classes[keep], probs[keep]
        masks = paste_masks(probs, boxes, out_h, out_w, self.mask_threshold)
        return boxes, scores, classes, masks

    @torch.no_grad()
    def predict(self, image: Tensor, output_size: tuple[int, int] | None = None) -> Instances:
        """One image (3, H, W), BGR 0..255 (``default_preprocess``) -> ``Instances`` at
        ``output_size`` (h, w; default the input size): labels 0..K-1, bool masks."""
        size = output_size or (int(image.shape[-2]), int(image.shape[-1]))
        boxes, scores, classes, masks = self.detect(image, size)
        return Instances(boxes=boxes, scores=scores, labels=classes, masks=masks)

    def onnx_spec(self) -> OnnxSpec:
        """What ``detseg export`` writes: ``RPNRawOutputs`` (backbone + RPN head raw outputs)."""
        levels = ("p2", "p3", "p4", "p5", "p6")
        return OnnxSpec(
            module=RPNRawOutputs(self),
            outputs=(
                *levels,
                *(f"rpn_logits_{p}" for p in levels),
                *(f"rpn_deltas_{p}" for p in levels),
            ),
            size_multiple=self.size_divisibility,
            runtime=False,
            example=lambda n, h, w: (torch.rand(n, 3, h, w) * 255,),
            note="backbone + RPN head raw outputs; proposals (NMS) and RoI heads stay in torch",
        )

    def forward(self, image: Tensor, output_size: Tensor) -> tuple[Tensor, ...]:
        out_h, out_w = (int(v) for v in output_size.tolist())
        boxes, scores, classes, masks = self.detect(image, (out_h, out_w))
        k = self.detections_per_image
        return (
            _pad_rows(boxes, k, 0.0),
            _pad_rows(scores, k, 0.0),
            _pad_rows(classes.float(), k, -1.0),
            _pad_rows(masks.to(boxes.dtype), k, 0.0),
            torch.tensor([float(len(boxes))], device=boxes.device),
        )


# ----------------------------------------------------------------- detectron2 model-zoo files
# detectron2 renamed PointRend's modules twice; old names -> current (module ``PointRendROIHeads``
# and ``ConvFCHead._load_from_state_dict`` do the same when loading).
_D2_RENAMES = (
    ("roi_heads.mask_coarse_head.", "roi_heads.mask_head.coarse_head."),
    ("roi_heads.mask_point_head.", "roi_heads.mask_head.point_head."),
    ("coarse_head.coarse_mask_fc", "coarse_head.fc"),
)


def convert_detectron2(
    state: dict[str, Tensor], required: str
) -> tuple[dict[str, object], dict[str, Tensor]]:
    """detectron2 ``model_final_*.pkl`` / ``.pth`` state -> (kwargs, state dict for our model).

    ``required`` is a key that only this model family has (tells Mask R-CNN from PointRend).
    """
    out = {}
    for key, value in state.items():
        if key in ("pixel_mean", "pixel_std"):
            continue
        for old, new in _D2_RENAMES:
            key = key.replace(old, new)
        out[key] = torch.as_tensor(value)
    cls_key = "roi_heads.box_predictor.cls_score.weight"
    if "backbone.bottom_up.stem.conv1.weight" not in out or cls_key not in out:
        raise CheckpointError(
            "not a detectron2 R-CNN checkpoint (no backbone.bottom_up / box predictor keys)."
        )
    if required not in out:
        raise CheckpointError(
            f"this detectron2 checkpoint has no {required!r}; it is another model family."
        )
    return {"num_classes": int(out[cls_key].shape[0]) - 1}, out


def d2_official(required: str, description: str) -> OfficialFormat:
    """The registry's official format for a detectron2 R-CNN family."""
    return OfficialFormat(
        description=description,
        convert=lambda state: convert_detectron2(dict(state), required),
        preprocess=lambda kwargs: dict(D2_PREPROCESS),
    )


def from_detectron2(path: str, model: MaskRCNN) -> MaskRCNN:
    """Load a detectron2 model-zoo file (``.pkl`` read by a numpy-only unpickler, or ``.pth``).

    ``model`` must be built with the checkpoint's ``num_classes``; raises ``CheckpointError``.
    """
    state, _ = read_state_dict(path)
    required = next(iter(model.roi_heads.mask_head.state_dict()))
    _, converted = convert_detectron2(state, f"roi_heads.mask_head.{required}")
    load_state_dict_strict(model, converted, str(path), type(model).__name__)
    return model


@register_model(
    "maskrcnn_r50_fpn",
    aliases=("maskrcnn_r50",),
    task="instance",
    official=d2_official(
        "roi_heads.mask_head.mask_fcn1.weight",
        "detectron2 model zoo Mask R-CNN R50-FPN (model_final_*.pkl, weights under 'model')",
    ),
)
def maskrcnn_r50_fpn(**kwargs: object) -> MaskRCNN:
    """Mask R-CNN R50-FPN, detectron2-exact (mask_rcnn_R_50_FPN_1x/3x)."""
    return MaskRCNN(**kwargs)

"""detectron2's RPN (``StandardRPNHead`` + ``DefaultAnchorGenerator`` + ``find_top_rpn_proposals``)
and the box-delta coder shared by the RPN and the box head.

Boxes are xyxy in absolute, continuous pixels (widths ``x2 - x1``, no +1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.ops import batched_nms, box_iou

from detseg.backbones.d2 import normal_fill

SCALE_CLAMP = math.log(1000.0 / 16)


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


def get_deltas(boxes: Tensor, targets: Tensor, weights: Sequence[float]) -> Tensor:
    """Encode ``targets`` (R, 4) against ``boxes`` (R, 4), both xyxy -> (R, 4) (dx, dy, dw, dh).

    detectron2 ``Box2BoxTransform.get_deltas``: ``dx = wx * (tx - bx) / bw``, ``dw = ww * log(tw / bw)``
    with centres ``x1 + 0.5 * w``; the inverse of ``apply_deltas``.
    """
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bx, by = boxes[:, 0] + 0.5 * bw, boxes[:, 1] + 0.5 * bh
    tw, th = targets[:, 2] - targets[:, 0], targets[:, 3] - targets[:, 1]
    tx, ty = targets[:, 0] + 0.5 * tw, targets[:, 1] + 0.5 * th
    wx, wy, ww, wh = weights
    return torch.stack(
        (
            wx * (tx - bx) / bw,
            wy * (ty - by) / bh,
            ww * torch.log(tw / bw),
            wh * torch.log(th / bh),
        ),
        dim=1,
    )


def clip_boxes(boxes: Tensor, height: int | Tensor, width: int | Tensor) -> Tensor:
    """Clamp ``boxes`` (..., 4) xyxy to x in [0, width], y in [0, height]."""
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def pad_rows(t: Tensor, n: int, value: float) -> Tensor:
    """Pad (or cut) the first dimension of ``t`` to ``n`` rows filled with ``value`` (``t``
    itself when it has ``n`` rows)."""
    if len(t) == n and not torch.jit.is_tracing():  # a trace must keep the padding step
        return t
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
        for layer in (self.conv, self.objectness_logits, self.anchor_deltas):
            normal_fill(layer, 0.01)

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
        topk: tuple[int, int] | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image (boxes (P, 4), logits (P,)), best first; inputs as in ``forward``.

        ``topk`` (pre-NMS per level, post-NMS per image) overrides the test-time values.
        """
        pre_nms_topk, post_nms_topk = topk or (self.pre_nms_topk, self.post_nms_topk)
        n = logits[0].shape[0]
        boxes_l, scores_l, levels_l = [], [], []
        for lvl, (anc, lg, dl) in enumerate(zip(anchors, logits, deltas, strict=True)):
            a = lg.shape[1]
            lg = lg.permute(0, 2, 3, 1).reshape(n, -1)
            dl = dl.view(n, a, 4, *dl.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
            k = min(pre_nms_topk, lg.shape[1])
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
            keep = batched_nms(b, s, lv, self.nms_thresh)[:post_nms_topk]
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
        props = torch.stack([pad_rows(b, k, 0.0) for b, _ in per_image])
        scores = torch.stack([pad_rows(s, k, 0.0) for _, s in per_image])
        counts = torch.tensor([float(len(b)) for b, _ in per_image], device=props.device)
        return props, scores, counts


class RPN(nn.Module):
    """The proposal generator: ``rpn_head`` + ``anchor_generator`` + proposal selection.

    Training (``losses``) follows detectron2's ``RPN.label_and_sample_anchors`` + ``losses``:
    IoU >= 0.7 positive, < 0.3 negative, every GT's best anchors (ties included) positive, all
    anchors kept (``BOUNDARY_THRESH = -1``); 256 anchors per image, at most half positive;
    ``loss_rpn_cls`` (BCE) and ``loss_rpn_loc`` (L1, i.e. smooth-L1 with beta 0) summed and
    divided by ``256 * num_images``. torchvision's ``Matcher`` (low-quality matches restored to
    their argmax GT, as detectron2 labels them) and ``BalancedPositiveNegativeSampler`` (the same
    two ``randperm`` draws as detectron2's ``subsample_labels``) compute exactly this.
    """

    def __init__(
        self,
        in_channels: int = 256,
        pre_nms_topk: int = 1000,
        post_nms_topk: int = 1000,
        nms_thresh: float = 0.7,
        pre_nms_topk_train: int = 2000,
        post_nms_topk_train: int = 1000,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        iou_thresholds: tuple[float, float] = (0.3, 0.7),
    ) -> None:
        super().__init__()
        self.anchor_generator = AnchorGenerator()
        self.rpn_head = RPNHead(in_channels, self.anchor_generator.num_anchors)
        self.proposals = RPNProposals(pre_nms_topk, post_nms_topk, nms_thresh)
        self.train_topk = (pre_nms_topk_train, post_nms_topk_train)
        self.matcher = Matcher(iou_thresholds[1], iou_thresholds[0], allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.batch_size_per_image = batch_size_per_image

    def forward(
        self, features: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> list[tuple[Tensor, Tensor]]:
        """``features`` p2..p6 (N, C, H, W) -> per image (proposals (P, 4), logits (P,))."""
        out = self.rpn_head(*features)
        n = len(features)
        return self.proposals.select(
            self.anchor_generator(*features), out[:n], out[n:], image_sizes
        )

    def label_anchors(self, anchors: Tensor, gt_boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Labels (A,) 1 / 0 / -1 (ignored) and matched GT boxes (A, 4) of ``anchors`` (A, 4)."""
        if len(gt_boxes) == 0:
            return anchors.new_zeros(len(anchors)), torch.zeros_like(anchors)
        matches = self.matcher(box_iou(gt_boxes, anchors))
        labels = (matches >= 0).to(anchors.dtype)
        labels[matches == Matcher.BETWEEN_THRESHOLDS] = -1
        return labels, gt_boxes[matches.clamp(min=0)]

    def losses(
        self,
        features: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        gt_boxes: Sequence[Tensor],
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Training: per-image proposals (P_i, 4) (no gradient, train top-k) and the two losses.

        ``gt_boxes`` per image (G_i, 4) xyxy in the (unpadded) image's pixels.
        """
        out = self.rpn_head(*features)
        n_lvl = len(features)
        anchors = self.anchor_generator(*features)
        with torch.no_grad():
            detached = [t.detach() for t in out]
            proposals = self.proposals.select(
                anchors, detached[:n_lvl], detached[n_lvl:], image_sizes, self.train_topk
            )
        n = out[0].shape[0]
        logits = torch.cat([lg.permute(0, 2, 3, 1).reshape(n, -1) for lg in out[:n_lvl]], 1)
        deltas = torch.cat(
            [
                dl.view(n, -1, 4, *dl.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
                for dl in out[n_lvl:]
            ],
            1,
        )
        all_anchors = torch.cat(anchors)
        labels, matched = zip(*(self.label_anchors(all_anchors, g) for g in gt_boxes), strict=True)
        pos, neg = self.sampler([lab.long() for lab in labels])
        pos, neg = torch.stack(pos).bool(), torch.stack(neg).bool()
        targets = torch.stack([get_deltas(all_anchors, m, (1.0, 1.0, 1.0, 1.0)) for m in matched])
        valid = pos | neg
        norm = float(self.batch_size_per_image * n)
        loss_cls = F.binary_cross_entropy_with_logits(
            logits[valid], pos[valid].to(logits.dtype), reduction="sum"
        )
        loss_loc = (deltas[pos] - targets[pos]).abs().sum()
        return [p for p, _ in proposals], {
            "loss_rpn_cls": loss_cls / norm,
            "loss_rpn_loc": loss_loc / norm,
        }

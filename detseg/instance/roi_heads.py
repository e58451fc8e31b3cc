"""detectron2's ``StandardROIHeads`` pieces for Mask R-CNN: multi-level RoIAlign, the box head and
its inference, the mask head and mask pasting.

- ``MultiLevelRoIAlign``: ``torchvision.ops.roi_align(aligned=True)`` (= detectron2's ROIAlignV2)
  with the level rule ``floor(4 + log2(sqrt(area)/224 + 1e-8))``. torchvision's
  ``MultiScaleRoIAlign`` is not used: it is not aligned and puts the epsilon outside the log.
- ``BoxHead`` + ``BoxInference``: 2 FC, class-specific deltas, background last, score > 0.05,
  per-class NMS 0.5, top 100.
- ``MaskHead`` + ``PasteMasks``: 4 conv + deconv to 28x28, pasted by grid sampling inside the box
  window (detectron2's CPU path), threshold >= 0.5.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.ops import batched_nms, box_iou, roi_align

from detseg.backbones.d2 import c2_msra_fill, c2_xavier_fill, normal_fill
from detseg.engine.memory import rows_per_kept_block
from detseg.instance.rpn import SCALE_CLAMP, apply_deltas, clip_boxes, get_deltas, pad_rows
from detseg.ops.linear import linear_by_conv
from detseg.ops.parallel import interleaved, parallel_map

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


# ------------------------------------------------------------------------------------ RoIAlign
class MultiLevelRoIAlign(nn.Module):
    """detectron2 ``ROIPooler`` (ROIAlignV2): ``forward(*features, boxes (K, 5)) -> (K, C, S, S)``.

    ``boxes`` rows are ``[batch_index, x1, y1, x2, y2]`` in image pixels; ``features`` are the FPN
    levels whose strides are ``1 / scales``.

    ``fast_inference`` (set by ``detseg.engine.fast``): on the CPU without autograd, each level's
    RoIs are pooled as interleaved pieces on all intra-op threads (``detseg.ops.parallel``:
    torchvision's CPU ``roi_align`` runs on one), the same values.
    """

    fast_inference = False

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
        out = features[0].new_empty((len(boxes), c, s, s))  # every box has one level: all set
        fast = self.fast_inference and not torch.is_grad_enabled() and boxes.device.type == "cpu"
        threads = torch.get_num_threads() if fast else 1
        jobs = []  # (level, RoI indices)
        for i in range(len(features)):
            jobs += [(i, piece) for piece in interleaved(torch.nonzero(levels == i)[:, 0], threads)]
        pooled = parallel_map(functools.partial(self._pool, features, boxes), jobs, threads)
        for (_, idx), values in zip(jobs, pooled, strict=True):
            out[idx] = values
        return out

    def _pool(self, features: Sequence[Tensor], boxes: Tensor, job: tuple[int, Tensor]) -> Tensor:
        """RoIAlign of the rows ``job[1]`` of ``boxes`` on level ``job[0]``."""
        level, idx = job
        feat = features[level]
        return roi_align(
            feat,
            boxes[idx].to(feat.dtype),
            self.output_size,
            self.scales[level],
            self.sampling_ratio,
            aligned=True,
        )


def pooler_boxes(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image boxes (R_i, 4) -> (sum R_i, 5) rows ``[batch_index, x1, y1, x2, y2]``."""
    return torch.cat([torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)])


# ----------------------------------------------------------------------------------- box head
class FastRCNNConvFCHead(nn.Module):
    """``num_fc`` FC + ReLU layers over flattened pooled features (R, C, S, S) -> (R, fc_dim).

    ``fast_inference`` (set by ``detseg.engine.fast``): in eval the layers run as
    ``linear_by_conv`` (oneDNN rather than MKL on the CPU: fc6 is 25.7 GFLOP for 1,000 RoIs).
    """

    fast_inference = False

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
            fc = nn.Linear(dim, fc_dim)
            c2_xavier_fill(fc)
            self.add_module(f"fc{k + 1}", fc)
            dim = fc_dim
        self.num_fc = num_fc

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        fast = self.fast_inference and not self.training
        for k in range(self.num_fc):
            fc = getattr(self, f"fc{k + 1}")
            x = F.relu(linear_by_conv(x, fc.weight, fc.bias) if fast else fc(x))
        return x


class FastRCNNOutputLayers(nn.Module):
    """``cls_score`` (K + 1 logits, background last) and class-specific ``bbox_pred`` (4K)."""

    def __init__(
        self, in_features: int = 1024, num_classes: int = 80, cls_agnostic_bbox_reg: bool = False
    ) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 * (1 if cls_agnostic_bbox_reg else num_classes))
        normal_fill(self.cls_score, 0.01)
        normal_fill(self.bbox_pred, 0.001)

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
        boxes = torch.stack([pad_rows(o[0], k, 0.0) for o in outs])
        probs = torch.stack([pad_rows(o[1], k, 0.0) for o in outs])
        classes = torch.stack([pad_rows(o[2].float(), k, -1.0) for o in outs])
        indices = torch.stack([pad_rows(o[3].float(), k, -1.0) for o in outs])
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
            conv = nn.Conv2d(dim, conv_dim, 3, padding=1)
            c2_msra_fill(conv)
            self.add_module(f"mask_fcn{k + 1}", conv)
            dim = conv_dim
        self.deconv = nn.ConvTranspose2d(dim, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, 1 if cls_agnostic_mask else num_classes, 1)
        c2_msra_fill(self.deconv)
        normal_fill(self.predictor, 0.001)

    def forward(self, pooled: Tensor) -> Tensor:
        x = pooled
        for k in range(self.num_conv):
            x = F.relu(getattr(self, f"mask_fcn{k + 1}")(x))
        return self.predictor(F.relu(self.deconv(x)))


def paste_masks(
    masks: Tensor,
    boxes: Tensor,
    height: int,
    width: int,
    threshold: float = 0.5,
    dtype: torch.dtype = torch.bool,
) -> Tensor:
    """Paste box-relative probabilities (R, M, M) into (R, height, width) 0/1 masks of ``dtype``.

    Pixel centres (index + 0.5) map to ``(p - x1) / (x2 - x1) * 2 - 1`` and are sampled with
    ``grid_sample`` (bilinear, zero padding, ``align_corners=False``); only pixels in the window
    ``[floor(x1) - 1, ceil(x2) + 1) x [floor(y1) - 1, ceil(y2) + 1)`` are evaluated, one mask at a
    time, as in detectron2's CPU path. On where the value is >= ``threshold``.
    """
    out = torch.zeros((len(masks), height, width), dtype=dtype, device=masks.device)
    boxes = boxes.to(masks.dtype)
    for k, (mask, box) in enumerate(zip(masks, boxes, strict=True)):
        x0, y0, x1, y1 = box.tolist()
        left, top = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
        right, bottom = min(math.ceil(x1) + 1, width), min(math.ceil(y1) + 1, height)
        if right <= left or bottom <= top:
            continue
        xs = torch.arange(left, right, device=masks.device, dtype=masks.dtype) + 0.5
        ys = torch.arange(top, bottom, device=masks.device, dtype=masks.dtype) + 0.5
        gx = (xs - box[0]) / (box[2] - box[0]) * 2 - 1
        gy = (ys - box[1]) / (box[3] - box[1]) * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=2)
        probs = F.grid_sample(mask[None, None], grid[None], align_corners=False)[0, 0]
        out[k, top:bottom, left:right] = probs >= threshold
    return out


class PasteMasks(nn.Module):
    """``forward(masks (R, M, M), boxes (R, 4), image_shape (2,) [h, w]) -> (R, h, w)`` 0/1 float."""

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, masks: Tensor, boxes: Tensor, image_shape: Tensor) -> Tensor:
        h, w = (int(v) for v in image_shape.tolist())
        return paste_masks(masks, boxes, h, w, self.threshold, masks.dtype)  # no bool copy


# ---------------------------------------------------------------------------------- the model
# ------------------------------------------------------------------------------------ training
def crop_masks(masks: Tensor, gt_index: Tensor, boxes: Tensor, side: int) -> Tensor:
    """detectron2 ``BitMasks.crop_and_resize``: GT ``masks`` (G, H, W) of one image, row
    ``gt_index[r]`` cropped to ``boxes[r]`` (R, 4) xyxy and resized to (R, side, side) by RoIAlign
    (aligned, adaptive sampling), then thresholded at 0.5; float 0/1."""
    rois = torch.cat([gt_index[:, None].to(boxes.dtype), boxes], dim=1)
    crops = roi_align(masks[:, None].to(boxes.dtype), rois, side, 1.0, 0, aligned=True)
    return (crops[:, 0] >= 0.5).to(boxes.dtype)


def mask_targets(
    gt_masks: Sequence[Tensor], gt_index: Sequence[Tensor], boxes: Sequence[Tensor], side: int
) -> Tensor:
    """``crop_masks`` of every image, concatenated: (sum R_i, side, side)."""
    crops = [crop_masks(m, i, b, side) for m, i, b in zip(gt_masks, gt_index, boxes, strict=True)]
    return torch.cat(crops) if crops else boxes[0].new_zeros((0, side, side))


def mask_rcnn_loss(logits: Tensor, classes: Tensor, targets: Tensor) -> Tensor:
    """detectron2 ``mask_rcnn_loss``: BCE-with-logits of the GT-class channel of ``logits``
    (R, K, M, M) (or the single class-agnostic one) against ``targets`` (R, M, M), mean."""
    if len(logits) == 0:
        return logits.sum() * 0
    chosen = logits[:, 0] if logits.shape[1] == 1 else logits[torch.arange(len(logits)), classes]
    return F.binary_cross_entropy_with_logits(chosen, targets, reduction="mean")


def fast_rcnn_losses(
    scores: Tensor, deltas: Tensor, proposals: Tensor, classes: Tensor, gt_boxes: Tensor
) -> dict[str, Tensor]:
    """detectron2 ``FastRCNNOutputLayers.losses``: ``loss_cls`` (CE, mean) and ``loss_box_reg``
    (L1 on the GT-class deltas of foreground RoIs, summed, divided by all sampled RoIs).

    ``scores`` (R, K+1), ``deltas`` (R, 4K) or (R, 4), ``classes`` (R,) with K = background.
    """
    k = scores.shape[1] - 1
    fg = torch.nonzero(classes < k).squeeze(1)
    pred = deltas.view(len(deltas), -1, 4)
    pred = pred[fg, 0] if pred.shape[1] == 1 else pred[fg, classes[fg]]
    target = get_deltas(proposals[fg], gt_boxes[fg], BOX_WEIGHTS)
    return {
        "loss_cls": F.cross_entropy(scores, classes, reduction="mean"),
        "loss_box_reg": (pred - target).abs().sum() / max(len(classes), 1),
    }


class RoIHeads(nn.Module):
    """detectron2 ``StandardROIHeads``: box stage on proposals, mask stage on boxes.

    Training (``losses``): the GT boxes are appended to the proposals; IoU >= 0.5 is foreground
    (torchvision ``Matcher(0.5, 0.5)`` without low-quality matches = detectron2's
    ``Matcher([0.5], [0, 1])``); 512 RoIs per image, at most 25% foreground (torchvision's
    ``BalancedPositiveNegativeSampler``: the same draws as detectron2's ``subsample_labels``);
    the mask head sees only the foreground RoIs, with 28x28 targets cropped from the GT bitmasks.
    ``train_on_pred_boxes`` (PointRend) feeds the mask stage the box head's regressed GT-class
    boxes instead of the proposals (no gradient).

    ``fast_inference`` (set by ``detseg.engine.fast``): in eval both stages run on pieces of RoIs
    (``_pieces``), the same values: 1,000 pooled 7x7 RoIs are 50 MB, the mask head's 28x28
    deconvolution of 100 detections 80 MB, and a temporary above the blocks glibc keeps is
    faulted in afresh on every call wherever ``engine.memory.heap_blocks`` does not hold
    (``rows_per_kept_block``).
    """

    fast_inference = False

    def __init__(
        self,
        num_classes: int = 80,
        score_thresh_test: float = 0.05,
        nms_thresh_test: float = 0.5,
        detections_per_image: int = 100,
        in_channels: int = 256,
        box_fc_dim: int = 1024,
        mask_conv_dim: int = 256,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        iou_threshold: float = 0.5,
        train_on_pred_boxes: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.box_pooler = MultiLevelRoIAlign(7)
        self.box_head = FastRCNNConvFCHead(in_channels, 7, 2, box_fc_dim)
        self.box_predictor = FastRCNNOutputLayers(box_fc_dim, num_classes)
        self.box_inference = BoxInference(
            num_classes, score_thresh_test, nms_thresh_test, detections_per_image
        )
        self.matcher = Matcher(iou_threshold, iou_threshold, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.train_on_pred_boxes = train_on_pred_boxes
        self.build_mask_stage(in_channels, num_classes, mask_conv_dim, box_fc_dim)

    def build_mask_stage(
        self, in_channels: int, num_classes: int, conv_dim: int, fc_dim: int
    ) -> None:
        """The mask pooler (14x14, multi-level) and head (``fc_dim`` unused); PointRend replaces
        both."""
        self.mask_pooler = MultiLevelRoIAlign(14)
        self.mask_head = MaskHead(in_channels, num_classes, conv_dim=conv_dim)

    def forward(
        self,
        features: Sequence[Tensor],
        proposals: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """p2..p5 + per-image proposals (P_i, 4) -> per image (boxes, scores, classes, probs).

        ``probs`` (D, 28, 28) is the sigmoid of each detection's predicted-class mask logits.
        """
        # NCHW once for both poolers (roi_align copies channels-last maps to NCHW on every call)
        pooler_features = [f.contiguous() for f in features]
        rows = pooler_boxes(proposals)
        c, s = features[0].shape[1], self.box_pooler.output_size
        parts = [
            self.box_predictor(self.box_head(self.box_pooler(*pooler_features, rows[piece])))
            for piece in self._pieces(len(rows), c * s * s * features[0].element_size())
        ]
        scores, deltas = (torch.cat(p) for p in zip(*parts, strict=True))
        splits = [len(p) for p in proposals]
        dets = [
            self.box_inference.single(p, s, d, size)
            for p, s, d, size in zip(
                proposals, scores.split(splits), deltas.split(splits), image_sizes, strict=True
            )
        ]
        boxes = [d[0] for d in dets]
        classes = torch.cat([d[2] for d in dets])
        probs = self.mask_probs(features, boxes, classes, pooler_features)
        probs = probs.split([len(b) for b in boxes])
        return [(b, s, c, p) for (b, s, c, _), p in zip(dets, probs, strict=True)]

    def mask_probs(
        self,
        features: Sequence[Tensor],
        boxes: Sequence[Tensor],
        classes: Tensor,
        pooler_features: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Predicted-class mask probabilities (R, 28, 28) for per-image ``boxes`` and ``classes``
        (R,); ``pooler_features``: ``features`` made NCHW for RoIAlign, when already at hand."""
        pooled_from = features if pooler_features is None else pooler_features
        rows = pooler_boxes(boxes)
        side = 2 * self.mask_pooler.output_size  # the deconvolution's output, the largest map
        row_bytes = self.mask_head.deconv.out_channels * side * side * features[0].element_size()
        return torch.cat(
            [
                self._class_probs(
                    self.mask_head(self.mask_pooler(*pooled_from, rows[piece])), classes[piece]
                )
                for piece in self._pieces(len(rows), row_bytes)
            ]
        )

    @staticmethod
    def _class_probs(logits: Tensor, classes: Tensor) -> Tensor:
        """Sigmoid of each RoI's ``classes`` channel of ``logits`` (R, K, M, M) -> (R, M, M)."""
        if logits.shape[1] > 1:
            return logits[torch.arange(len(classes), device=logits.device), classes].sigmoid()
        return logits[:, 0].sigmoid()

    def _pieces(self, rows: int, row_bytes: int) -> list[slice]:
        """The slices of ``rows`` RoIs computed together: all of them (the reference), or in the
        fast path pieces of ``rows_per_kept_block(row_bytes)`` (at least one slice, maybe empty)."""
        fast = self.fast_inference and not self.training
        step = rows_per_kept_block(row_bytes) if fast else max(rows, 1)
        return [slice(i, i + step) for i in range(0, max(rows, 1), step)]

    # -- training ----------------------------------------------------------------------------
    def label_and_sample(
        self, proposals: Tensor, gt_boxes: Tensor, gt_classes: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One image: sampled (boxes (S, 4), classes (S,) K = background, matched GT boxes
        (S, 4), matched GT index (S,)) from ``proposals`` (P, 4) plus the GT boxes (G, 4)."""
        boxes = torch.cat([proposals, gt_boxes.to(proposals.dtype)])
        if len(gt_boxes):
            matches = self.matcher(box_iou(gt_boxes, boxes))
            index = matches.clamp(min=0)
            classes = torch.where(matches >= 0, gt_classes[index], self.num_classes)
            matched = gt_boxes[index].to(boxes.dtype)
        else:
            index = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
            classes = torch.full_like(index, self.num_classes)
            matched = torch.zeros_like(boxes)
        pos, neg = self.sampler([(classes < self.num_classes).long()])
        keep = torch.nonzero(pos[0] | neg[0]).squeeze(1)
        return boxes[keep], classes[keep], matched[keep], index[keep]

    def losses(
        self,
        features: Sequence[Tensor],
        proposals: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Box and mask losses for p2..p5 ``features``, per-image ``proposals`` and ``targets``
        (``boxes`` (G, 4), ``labels`` (G,) 0..K-1, ``masks`` (G, H, W) at the image's size)."""
        sampled = [
            self.label_and_sample(p.detach(), t["boxes"], t["labels"])
            for p, t in zip(proposals, targets, strict=True)
        ]
        boxes = [s[0] for s in sampled]
        classes, matched = torch.cat([s[1] for s in sampled]), torch.cat([s[2] for s in sampled])
        pooled = self.box_pooler(*features, pooler_boxes(boxes))
        scores, deltas = self.box_predictor(self.box_head(pooled))
        losses = fast_rcnn_losses(scores, deltas, torch.cat(boxes), classes, matched)
        if self.train_on_pred_boxes:
            boxes = self._gt_class_boxes(deltas.detach(), boxes, classes)
        fg = [s[1] < self.num_classes for s in sampled]
        losses.update(
            self.mask_losses(
                features,
                [b[f] for b, f in zip(boxes, fg, strict=True)],
                torch.cat([s[1][f] for s, f in zip(sampled, fg, strict=True)]),
                [t["masks"] for t in targets],
                [s[3][f] for s, f in zip(sampled, fg, strict=True)],
            )
        )
        return losses

    def _gt_class_boxes(
        self, deltas: Tensor, boxes: Sequence[Tensor], classes: Tensor
    ) -> list[Tensor]:
        """detectron2 ``predict_boxes_for_gt_classes``: decoded (unclipped) GT-class boxes."""
        flat = torch.cat(list(boxes))
        decoded = apply_deltas(deltas, flat, BOX_WEIGHTS).view(len(flat), -1, 4)
        cls = classes.clamp(0, decoded.shape[1] - 1) if decoded.shape[1] > 1 else 0 * classes
        picked = decoded[torch.arange(len(flat), device=flat.device), cls].to(flat.dtype)
        return list(picked.split([len(b) for b in boxes]))

    def mask_losses(
        self,
        features: Sequence[Tensor],
        boxes: Sequence[Tensor],
        classes: Tensor,
        gt_masks: Sequence[Tensor],
        gt_index: Sequence[Tensor],
    ) -> dict[str, Tensor]:
        """``loss_mask`` on the foreground RoIs: per-image ``boxes`` (R_i, 4), their GT ``classes``
        (R,), the images' GT masks (G_i, H, W) and each RoI's GT row ``gt_index`` (R_i,)."""
        logits = self.mask_head(self.mask_pooler(*features, pooler_boxes(boxes)))
        targets = mask_targets(gt_masks, gt_index, boxes, logits.shape[-1])
        return {"loss_mask": mask_rcnn_loss(logits, classes, targets)}

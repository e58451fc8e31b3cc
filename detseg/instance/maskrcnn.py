"""Mask R-CNN as detectron2's ``Base-RCNN-FPN`` / ``mask_rcnn_R_50_FPN_1x`` computes it.

Module names are detectron2's (``backbone``, ``proposal_generator.rpn_head``,
``roi_heads.box_head``, ``roi_heads.box_predictor``, ``roi_heads.mask_head``), so model-zoo
``model_final_*.pkl`` state dicts load with ``strict=True``. The parts live in ``rpn.py``
(anchors, RPN head, proposals, RPN training) and ``roi_heads.py`` (RoIAlign, box and mask heads,
paste, RoI training); each is pinned by a ``d2_*`` parity fixture (``../shared/parity/README_d2.md``)
and re-exported here under the names the fixtures use.

``backbone="mobilenet_v2"`` swaps the R50 for a torchvision MobileNetV2 trunk under the same FPN
(``backbones.d2.TrunkFPN``), with narrower FPN / box / mask widths for CPU training from scratch.
Boxes are xyxy in absolute pixels throughout; classes are 0..K-1 (background is column K).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detseg.backbones.d2 import ResNetFPN, TrunkFPN
from detseg.checkpoint import load_state_dict_strict, read_state_dict
from detseg.data.preprocess import Preprocess
from detseg.engine.export import OnnxSpec
from detseg.errors import CheckpointError
from detseg.instance.roi_heads import (
    BoxHead,
    BoxInference,
    MaskHead,
    MultiLevelRoIAlign,
    PasteMasks,
    RoIHeads,
    paste_masks,
)
from detseg.instance.rpn import (
    RPN,
    AnchorGenerator,
    RPNHead,
    RPNProposals,
    apply_deltas,
    clip_boxes,
    pad_rows,
)
from detseg.registry import OfficialFormat, register_model
from detseg.results import Instances

# the parity fixtures and tests name these parts as ``detseg.instance.maskrcnn.<name>``
__all__ = [
    "AnchorGenerator",
    "BoxHead",
    "BoxInference",
    "MaskHead",
    "MaskRCNN",
    "MultiLevelRoIAlign",
    "PasteMasks",
    "RPNHead",
    "RPNProposals",
    "apply_deltas",
    "from_detectron2",
    "paste_masks",
]

PIXEL_MEAN_BGR = (103.53, 116.28, 123.675)
PIXEL_STD_BGR = (57.375, 57.12, 58.395)  # detectron2's torchvision-style std, for new trunks
# The model subtracts PIXEL_MEAN itself; the pipeline only reorders to BGR, in 0..255.
D2_PREPROCESS = {
    "channel_order": "BGR",
    "mean": (0.0, 0.0, 0.0),
    "std": (1.0, 1.0, 1.0),
    "post_scale": 1.0,
}
# backbone -> (FPN, box-head FC, mask-head conv widths) unless given
WIDTHS = {"resnet50": (256, 1024, 256), "mobilenet_v2": (64, 256, 64)}


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
    """Mask R-CNN (detectron2 ``mask_rcnn_R_50_FPN_1x``): inference on one image, losses on batches.

    ``forward(image (3, H, W) BGR 0..255, output_size (2,) [h, w])`` returns, padded to
    ``detections_per_image`` rows in score order: boxes (D, 4) in output pixels, scores (D,),
    classes (D,) (-1 padding), masks (D, h, w) 0/1 float and the count (1,), as detectron2's
    ``detector_postprocess`` gives them (boxes scaled, clipped, empty boxes dropped, masks pasted).
    The model normalises itself (``pixel_mean``, ``pixel_std``): feed BGR 0..255
    (``default_preprocess``). ``compute_loss`` gives the named training losses of a batch.

    Args:
        backbone: "resnet50" (detectron2 R50-FPN, FrozenBN, the model zoo's) or "mobilenet_v2"
            (torchvision MobileNetV2 trunk, trainable BN, for CPU training from scratch).
        fpn_channels, box_fc_dim, mask_conv_dim: widths (R50: 256, 1024, 256; MobileNetV2 default
            64, 256, 64). PointRend uses ``mask_conv_dim`` for its coarse conv and point MLP and
            ``box_fc_dim`` for its coarse FCs.
        pixel_std: default (1, 1, 1) for the R50 (caffe weights), detectron2's
            (57.375, 57.12, 58.395) for MobileNetV2.
        rpn_*_train, roi_batch_size_per_image, roi_positive_fraction: detectron2's training
            defaults (2000 / 1000 proposals, 512 RoIs, 25% foreground).
    """

    roi_heads_class: type[RoIHeads] = RoIHeads
    train_on_pred_boxes: bool = False

    def __init__(
        self,
        config: str = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
        num_classes: int = 80,
        backbone: str = "resnet50",
        fpn_channels: int | None = None,
        box_fc_dim: int | None = None,
        mask_conv_dim: int | None = None,
        pixel_mean: Sequence[float] = PIXEL_MEAN_BGR,
        pixel_std: Sequence[float] | None = None,
        size_divisibility: int = 32,
        rpn_pre_nms_topk_test: int = 1000,
        rpn_post_nms_topk_test: int = 1000,
        rpn_pre_nms_topk_train: int = 2000,
        rpn_post_nms_topk_train: int = 1000,
        rpn_nms_thresh: float = 0.7,
        roi_batch_size_per_image: int = 512,
        roi_positive_fraction: float = 0.25,
        score_thresh_test: float = 0.05,
        nms_thresh_test: float = 0.5,
        detections_per_image: int = 100,
        mask_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        if backbone not in WIDTHS:
            raise ValueError(f"backbone must be one of {sorted(WIDTHS)}, not {backbone!r}")
        defaults = WIDTHS[backbone]
        fpn = fpn_channels or defaults[0]
        self.config, self.num_classes = config, num_classes
        self.backbone: nn.Module = (
            ResNetFPN(fpn_out_channels=fpn) if backbone == "resnet50" else TrunkFPN(backbone, fpn)
        )
        self.proposal_generator = RPN(
            fpn,
            rpn_pre_nms_topk_test,
            rpn_post_nms_topk_test,
            rpn_nms_thresh,
            rpn_pre_nms_topk_train,
            rpn_post_nms_topk_train,
        )
        self.roi_heads = self.roi_heads_class(
            num_classes,
            score_thresh_test,
            nms_thresh_test,
            detections_per_image,
            in_channels=fpn,
            box_fc_dim=box_fc_dim or defaults[1],
            mask_conv_dim=mask_conv_dim or defaults[2],
            batch_size_per_image=roi_batch_size_per_image,
            positive_fraction=roi_positive_fraction,
            train_on_pred_boxes=self.train_on_pred_boxes,
        )
        if pixel_std is None:
            pixel_std = (1.0, 1.0, 1.0) if backbone == "resnet50" else PIXEL_STD_BGR
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

    def batch_features(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        """Batched ``features``: ``images`` (N, 3, H, W) BGR 0..255 zero-padded at the bottom/right
        (``collate_detection``), ``image_sizes`` (N, 2) (h, w); normalised first, then padded."""
        x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        rows = torch.arange(h, device=x.device)[None, :, None] < image_sizes[:, 0, None, None]
        cols = torch.arange(w, device=x.device)[None, None, :] < image_sizes[:, 1, None, None]
        x = x * (rows & cols)[:, None].to(x.dtype)
        d = self.size_divisibility
        return self.backbone(F.pad(x, (0, -w % d, 0, -h % d)))

    def compute_loss(
        self, images: Tensor, image_sizes: Tensor, targets: Sequence[dict[str, Any]]
    ) -> dict[str, Tensor]:
        """detectron2's training losses of a batch (call in train mode).

        ``targets`` per image: ``boxes`` (G, 4) xyxy pixels, ``labels`` (G,) 0..K-1, ``masks``
        (G, h, w) uint8 at the unpadded image size. Returns ``loss_rpn_cls``, ``loss_rpn_loc``,
        ``loss_cls``, ``loss_box_reg``, ``loss_mask`` (PointRend adds ``loss_mask_point``), each
        with weight 1 in detectron2's total.
        """
        feats = self.batch_features(images, image_sizes)
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        gt_boxes = [t["boxes"].to(feats[0].dtype) for t in targets]
        proposals, losses = self.proposal_generator.losses(feats, sizes, gt_boxes)
        heads_targets = [
            {"boxes": b, "labels": t["labels"], "masks": t["masks"]}
            for b, t in zip(gt_boxes, targets, strict=True)
        ]
        losses.update(self.roi_heads.losses(feats[:4], proposals, heads_targets))
        return losses

    def detect(
        self, image: Tensor, output_size: tuple[int, int], mask_dtype: torch.dtype = torch.bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Unpadded: boxes (D, 4) in output pixels, scores (D,), classes (D,) int64, masks
        (D, h, w) 0/1 of ``mask_dtype``."""
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
        masks = paste_masks(probs, boxes, out_h, out_w, self.mask_threshold, mask_dtype)
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
        # masks pasted as floats: no bool -> float copy of the (D, h, w) stack
        boxes, scores, classes, masks = self.detect(image, (out_h, out_w), image.dtype)
        k = self.detections_per_image
        return (
            pad_rows(boxes, k, 0.0),
            pad_rows(scores, k, 0.0),
            pad_rows(classes.float(), k, -1.0),
            pad_rows(masks, k, 0.0),
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

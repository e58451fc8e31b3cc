"""TensorMask (Chen, Girshick, He, Dollár, ICCV 2019): dense sliding-window instance segmentation.

A RetinaNet-like one-stage detector whose windows (detectron2's anchors: two square windows per
location of P2..P7) each carry an M×M mask. The released configuration is the tensor bipyramid:
the mask features of every level are upsampled to P2 resolution and fused with P2's, a 1×1 conv
predicts the *aligned* representation on the P2 grid, and SwapAlign2Nat (λ = 2^k) turns it into
the *natural* representation of level k (one (m·2^k)² mask per P_k location, 4 input pixels per
mask pixel at every level). Module and parameter names follow detectron2's
``projects/TensorMask/tensormask/arch.py`` so its checkpoints load with ``strict=True``.

Windows and box coding live in ``tensormask_windows``, targets and losses in
``tensormask_targets``, inference (memory-bounded masks) in ``tensormask_infer``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detseg.backbones.d2 import FPN, ResNetFPN
from detseg.checkpoint import load_state_dict_strict, read_state_dict
from detseg.detection.fcos import MobileNetV2Body
from detseg.engine.export import OnnxSpec
from detseg.errors import CheckpointError
from detseg.instance.tensormask_infer import (
    dense_detection_masks,
    postprocess,
    select_detections,
    sparse_detection_masks,
)
from detseg.instance.tensormask_targets import tensormask_losses
from detseg.instance.tensormask_windows import level_windows
from detseg.ops.swap_align2nat import DEFAULT_PAD, SwapAlign2Nat
from detseg.registry import OfficialFormat, register_model
from detseg.results import Instances


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

    def mask_towers(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Per level (N, mask_channels, H_k, W_k): the mask tower on each FPN level."""
        return [self.mask_subnet(f) for f in features]

    def fused_mask_features(self, towers: Sequence[Tensor], level: int) -> Tensor:
        """(N, mask_channels, H, W) features the mask predictors read for ``level`` (0 = P2).

        With the bipyramid: ReLU(conv3x3(up_{2^k}(tower_k) cropped to P2 + tower_2)) on the P2
        grid (bilinear, ``align_corners=False``); without it the level's own tower output.
        """
        if not self.bipyramid_on:
            return towers[level]
        high = towers[0]
        feat = towers[level]
        if level > 0:
            feat = F.interpolate(
                feat, scale_factor=float(2**level), mode="bilinear", align_corners=False
            )
        height, width = high.shape[-2:]
        return self.mask_fuse(feat[:, :, :height, :width] + high)

    def mask_predictor(self, size_index: int) -> nn.Conv2d:
        """The 1×1 conv predicting the m² mask channels of window size ``size_index``."""
        return getattr(self, f"mask_pred_{self.mask_sizes[size_index]:02d}")

    def aligned_masks(self, towers: Sequence[Tensor]) -> list[list[Tensor]]:
        """Dense: per level, per window size (N, m², H, W) mask logits before SwapAlign2Nat."""
        out = []
        for level in range(len(towers)):
            fused = self.fused_mask_features(towers, level)
            out.append([self.mask_predictor(a)(fused) for a in range(len(self.mask_sizes))])
        return out

    def natural_masks(self, towers: Sequence[Tensor]) -> list[list[Tensor]]:
        """Dense: per level, per window size (N, M², H_k, W_k) natural logits (channel v·M + u)."""
        out = []
        for level, per_size in enumerate(self.aligned_masks(towers)):
            swap = SwapAlign2Nat(self.level_lambda(level), DEFAULT_PAD)
            out.append([swap(m) for m in per_size] if self.aligned_on else per_size)
        return out

    def class_box_outputs(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level class logits (N, A·K, H_k, W_k) and box deltas (N, A·4, H_k, W_k)."""
        logits = [self.cls_score(self.cls_subnet(f)) for f in features]
        deltas = [self.bbox_pred(self.bbox_subnet(f)) for f in features]
        return logits, deltas

    def forward(self, *features: Tensor) -> tuple[Tensor, ...]:
        """P2.. levels, each (N, in_channels, H_k, W_k) -> flat tuple of raw outputs.

        Returns, in order: ``num_levels`` class logits (N, A·K, H_k, W_k) (channel a·K + class),
        ``num_levels`` box deltas (N, A·4, H_k, W_k) (channel a·4 + (dx, dy, dw, dh)), then for
        each level each window size a mask tensor: natural (N, M², H_k, W_k) (channel v·M + u,
        M = λ_k·m) when ``aligned_on and apply_swap_align2nat``, else as predicted
        ((N, m², H_2, W_2) aligned with the bipyramid).
        """
        logits, deltas = self.class_box_outputs(features)
        masks: list[Tensor] = []
        if self.mask_on:
            towers = self.mask_towers(features)
            dense = self.natural_masks if self.apply_swap_align2nat else self.aligned_masks
            for per_size in dense(towers):
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


class MobileNetV2Trunk(MobileNetV2Body):
    """torchvision MobileNetV2 ``features[0..17]`` as a detectron2 bottom-up:
    ``{"res2": (N, 24, H/4, W/4), "res3": 32 ch /8, "res4": 96 ch /16, "res5": 320 ch /32}``."""

    taps = (3, 6, 13, 17)
    channels = (24, 32, 96, 320)
    names = ("res2", "res3", "res4", "res5")


def build_backbone(backbone: str, fpn_channels: int) -> FPN:
    """TensorMask's P2..P7 FPN (average fusion, P6/P7 from C5) on ``"resnet50"`` (detectron2
    ``build_retinanet_resnet_fpn_backbone``) or ``"mobilenet_v2"`` (light, for CPU training)."""
    if backbone == "resnet50":
        return ResNetFPN(
            fpn_out_channels=fpn_channels, fpn_fuse_type="avg", top_block="LastLevelP6P7"
        )
    if backbone == "mobilenet_v2":
        trunk = MobileNetV2Trunk()
        return FPN(trunk, trunk.names, trunk.channels, fpn_channels, "avg", "LastLevelP6P7")
    raise ValueError(f"backbone must be 'resnet50' or 'mobilenet_v2', not {backbone!r}")


class TensorMask(nn.Module):
    """TensorMask: ``forward(images) -> raw head outputs`` (exportable, memory-bounded).

    ``images``: (N, 3, H, W) preprocessed (BGR 0..255 minus ``PIXEL_MEAN`` for the released
    weights), zero-padded to multiples of 32. The forward returns a flat tuple: 6 class logits
    (N, A·K, H_k, W_k), 6 box deltas (N, A·4, H_k, W_k) and 6 mask-tower features
    (N, mask_channels, H_k, W_k), P2..P7. No mask tensor is dense: the natural masks are formed
    only where needed, for the training positives (:meth:`compute_loss`, through the dense
    aligned masks) and for the kept detections (:meth:`postprocess`, sparse by default).

    Args:
        num_classes: K sigmoid classes (80 for COCO).
        backbone: "resnet50" (released, detectron2 names) or "mobilenet_v2" (torchvision names
            under ``backbone.bottom_up``); both FPN P2..P7 with average fusion.
        fpn_channels, num_convs, cls_channels, bbox_channels, mask_channels: widths (released
            256, 4, 256, 128, 128).
        score_thresh, topk_candidates, nms_thresh, max_detections: test settings (§9).
        mask_chunk_elements: the most aligned-logit elements one sparse mask step holds.
    """

    def __init__(
        self,
        num_classes: int = 80,
        backbone: str = "resnet50",
        fpn_channels: int = 256,
        num_convs: int = 4,
        cls_channels: int = 256,
        bbox_channels: int = 128,
        mask_channels: int = 128,
        score_thresh: float = 0.05,
        topk_candidates: int = 6000,
        nms_thresh: float = 0.5,
        max_detections: int = 100,
        mask_chunk_elements: int = 1 << 22,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.test_settings = (score_thresh, topk_candidates, nms_thresh, max_detections)
        self.mask_chunk_elements = mask_chunk_elements
        self.backbone = build_backbone(backbone, fpn_channels)
        self.head = TensorMaskHead(
            fpn_channels,
            num_classes,
            num_convs,
            cls_channels,
            bbox_channels,
            mask_channels,
            apply_swap_align2nat=False,
        )

    def onnx_spec(self) -> OnnxSpec:
        """What ``detseg export`` writes: class logits, box deltas and mask-tower features;
        window selection, NMS and SwapAlign2Nat of the kept windows are ``postprocess``."""
        return OnnxSpec(
            size_multiple=32,
            note="raw head outputs (mask-tower features); selection, NMS, per-window masks beside",
        )

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        features = self.backbone(images)
        logits, deltas = self.head.class_box_outputs(features)
        return (*logits, *deltas, *self.head.mask_towers(features))

    def _split(self, outputs: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        levels = self.head.num_levels
        return (
            list(outputs[:levels]),
            list(outputs[levels : 2 * levels]),
            list(outputs[2 * levels : 3 * levels]),
        )

    def compute_loss(self, outputs: Sequence[Tensor], targets: Sequence[dict]) -> dict[str, Tensor]:
        """Losses of a ``forward``; ``targets`` as in :func:`tensormask_losses`."""
        logits, deltas, towers = self._split(outputs)
        return tensormask_losses(
            logits,
            deltas,
            self.head.aligned_masks(towers),
            targets,
            self.head.mask_sizes,
            self.head.bipyramid_on,
        )

    @torch.no_grad()
    def postprocess(
        self,
        outputs: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]] | None = None,
        dense: bool = False,
    ) -> list[Instances]:
        """Eval outputs -> one ``Instances`` per image at ``original_sizes`` (default image_sizes).

        ``image_sizes``: the resized, unpadded (H, W) of each image in the batch. ``dense=True``
        takes the masks from the dense natural tensors (same values, memory ∝ image × mask area).
        """
        logits, deltas, towers = self._split(outputs)
        shapes = [x.shape[-2:] for x in logits]
        windows = level_windows(shapes, device=logits[0].device, dtype=logits[0].dtype)
        natural = self.head.natural_masks(towers) if dense else None
        results = []
        for n, size in enumerate(image_sizes):
            dets = select_detections(
                [x[n] for x in logits], [x[n] for x in deltas], windows, *self.test_settings
            )
            if natural is not None:
                masks = dense_detection_masks(natural, dets, n)
            else:
                image_towers = [t[n : n + 1] for t in towers]
                masks = sparse_detection_masks(
                    self.head, image_towers, dets, self.mask_chunk_elements
                )
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

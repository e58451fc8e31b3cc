"""PSPNet (Zhao et al., CVPR'17): dilated ResNet at OS 8, pyramid pooling, auxiliary head on layer3.

Training output is ``{"out": logits, "aux": aux_logits}`` (both at input size); the trainer's
``semantic_loss`` adds ``aux_weights["aux"] = 0.4`` times the auxiliary loss. Eval returns the
main logits only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detseg.backbones import build_backbone
from detseg.ops.adaptive_pool import AdaptiveAvgPool2d
from detseg.registry import register_model
from detseg.semantic.dilation import set_rates
from detseg.semantic.heads import conv_bn_relu, resize_output


def _kaiming(module: nn.Module) -> nn.Module:
    """Kaiming-normal convs (zero bias), BN weight 1 / bias 0 (spec P3)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def _upsample(x: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class PyramidPooling(nn.Module):
    """PPM: per bin b, AdaptiveAvgPool(b) -> 1x1 (no bias) -> BN -> ReLU -> bilinear back; concat.

    The pooling exports to ONNX at any input size (``detseg.ops.adaptive_pool``).

    ``forward``: (N, C, h, w) -> (N, C + len(bins) * branch_channels, h, w).
    """

    def __init__(
        self,
        in_ch: int,
        bins: Sequence[int] = (1, 2, 3, 6),
        branch_channels: int | None = None,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        mid = branch_channels or in_ch // len(bins)
        self.align_corners = align_corners
        self.branches = nn.ModuleList(
            nn.Sequential(AdaptiveAvgPool2d(b), conv_bn_relu(in_ch, mid, 1)) for b in bins
        )
        self.out_channels = in_ch + len(bins) * mid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat(
            [x, *(_upsample(b(x), size, self.align_corners) for b in self.branches)], 1
        )


def _head(in_ch: int, mid: int, num_classes: int, dropout: float) -> nn.Sequential:
    """conv3 (no bias) -> BN -> ReLU -> Dropout2d -> 1x1 classifier."""
    return nn.Sequential(
        conv_bn_relu(in_ch, mid), nn.Dropout2d(dropout), nn.Conv2d(mid, num_classes, 1)
    )


class PSPNet(nn.Module):
    """PSPNet on a dilated torchvision ResNet.

    Args:
        num_classes: output classes C.
        backbone: resnet18/34/50/101.
        bins: pyramid bin sizes (paper: 1, 2, 3, 6).
        aux: build the layer3 auxiliary head (used in ``train()`` only).
        aux_weight: its loss weight (paper: 0.4).
        dilation_style: "torchvision" (block 0 of a dilated stage keeps the previous rate) or
            "all" (every block of layer3 at 2, layer4 at 4, as the official semseg code).
        align_corners: bilinear mode of the PPM and final upsampling (official code: True with
            8k + 1 crops; detseg default False).
        dropout: Dropout2d before both classifiers (0.1).
        frozen_bn: freeze the trunk's BatchNorm.

    ``forward``: (N, 3, H, W) -> (N, C, H, W) logits in eval; ``{"out", "aux"}`` in train.
    """

    def __init__(
        self,
        num_classes: int = 21,
        backbone: str = "resnet50",
        bins: Sequence[int] = (1, 2, 3, 6),
        aux: bool = True,
        aux_weight: float = 0.4,
        dilation_style: str = "torchvision",
        align_corners: bool = False,
        dropout: float = 0.1,
        frozen_bn: bool = False,
    ) -> None:
        super().__init__()
        if dilation_style not in ("torchvision", "all"):
            raise ValueError("dilation_style must be 'torchvision' or 'all'")
        self.num_classes, self.align_corners = num_classes, align_corners
        self.aux_weights = {"aux": aux_weight}
        self.backbone = build_backbone(backbone, output_stride=8, frozen_bn=frozen_bn)
        if dilation_style == "all":
            set_rates(self.backbone.layer3, [2])
            set_rates(self.backbone.layer4, [4])
        c3, c4 = self.backbone.channels("layer3"), self.backbone.channels("layer4")
        self.ppm = _kaiming(PyramidPooling(c4, bins, align_corners=align_corners))
        self.cls = _kaiming(
            _head(self.ppm.out_channels, 512 if c4 >= 2048 else c4 // 4, num_classes, dropout)
        )
        self.aux = _kaiming(_head(c3, c3 // 4, num_classes, dropout)) if aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        size = x.shape[-2:]
        feats = self.backbone(x)
        out = resize_output(self.cls(self.ppm(feats["layer4"])), size, self.align_corners)
        if not self.training or self.aux is None:
            return out
        return {"out": out, "aux": _upsample(self.aux(feats["layer3"]), size, self.align_corners)}


@register_model("pspnet_resnet50", task="semantic", defaults={"backbone": "resnet50"})
@register_model("pspnet_resnet101", task="semantic", defaults={"backbone": "resnet101"})
def build_pspnet(**kwargs: object) -> PSPNet:
    """PSPNet: dilated ResNet (OS 8), pyramid pooling 1/2/3/6, aux head on layer3 (weight 0.4)."""
    return PSPNet(**kwargs)  # type: ignore[arg-type]

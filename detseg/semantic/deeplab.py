"""DeepLabV3+ (Chen et al. 2018): encoder at output stride 16, ASPP, low-level-feature decoder."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from detseg.backbones import build_backbone
from detseg.registry import register_model
from detseg.semantic.heads import conv_bn_relu, resize_output, resize_to

# (low-level level, high-level level) per backbone family
_LEVELS = {"resnet": ("layer1", "layer4"), "mobilenet_v2": ("s4", None)}


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ with a torchvision ResNet or MobileNetV2 encoder.

    Args:
        num_classes: output classes C.
        backbone: resnet18/34/50/101 or mobilenet_v2.
        output_stride: 16 (atrous rates 6/12/18) or 8 (rates doubled).
        aspp_channels: ASPP width (paper: 256); low_level_channels: projection of the s4 skip (48).
        frozen_bn: freeze the encoder's BatchNorm.

    ``forward``: (N, 3, H, W) float -> (N, C, H, W) logits.
    """

    def __init__(
        self,
        num_classes: int = 21,
        backbone: str = "resnet50",
        output_stride: int = 16,
        aspp_channels: int = 256,
        low_level_channels: int = 48,
        frozen_bn: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = build_backbone(backbone, output_stride=output_stride, frozen_bn=frozen_bn)
        family = "resnet" if backbone.startswith("resnet") else backbone
        self.low_name = _LEVELS[family][0]
        self.high_name = _LEVELS[family][1] or self.backbone.feature_info[-1].name
        rates = [6, 12, 18] if output_stride == 16 else [12, 24, 36]
        self.aspp = ASPP(self.backbone.channels(self.high_name), rates, aspp_channels)
        self.project = conv_bn_relu(self.backbone.channels(self.low_name), low_level_channels, 1)
        self.decoder = nn.Sequential(
            conv_bn_relu(aspp_channels + low_level_channels, aspp_channels),
            conv_bn_relu(aspp_channels, aspp_channels),
            nn.Conv2d(aspp_channels, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        low = self.project(feats[self.low_name])
        high = resize_to(self.aspp(feats[self.high_name]), low)
        return resize_output(self.decoder(torch.cat([high, low], dim=1)), x)


@register_model("deeplabv3plus_resnet50", task="semantic", defaults={"backbone": "resnet50"})
@register_model("deeplabv3plus_mobilenetv2", task="semantic", defaults={"backbone": "mobilenet_v2"})
def build_deeplabv3plus(**kwargs: object) -> DeepLabV3Plus:
    """DeepLabV3+ (ASPP + low-level decoder), output stride 16."""
    return DeepLabV3Plus(**kwargs)  # type: ignore[arg-type]

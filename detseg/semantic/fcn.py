"""FCN with a torchvision ResNet encoder (the torchvision ``fcn_resnet*`` head on a dilated trunk).

The chapter's VGG FCN-32s/16s/8s live in their own module; this is the ResNet form in practice.
"""

from __future__ import annotations

import torch
from torch import nn

from detseg.backbones import build_backbone
from detseg.registry import register_model
from detseg.semantic.heads import conv_bn_relu, resize_to


class FCN(nn.Module):
    """ResNet trunk at ``output_stride`` -> conv3x3-BN-ReLU -> dropout -> 1x1 -> bilinear upsample.

    Args:
        num_classes: output classes C.
        backbone: torchvision ResNet name (resnet18/34/50/101).
        output_stride: 8 (torchvision's dilated FCN), 16 or 32.
        head_channels: width of the conv3x3 (torchvision: in_channels // 4).
        dropout: dropout before the classifier (torchvision: 0.1).
        frozen_bn: freeze the trunk's BatchNorm.

    ``forward``: (N, 3, H, W) float -> (N, C, H, W) logits.
    """

    def __init__(self, num_classes: int = 21, backbone: str = "resnet50", output_stride: int = 8,
                 head_channels: int | None = None, dropout: float = 0.1,
                 frozen_bn: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = build_backbone(backbone, output_stride=output_stride, frozen_bn=frozen_bn)
        in_ch = self.backbone.channels("layer4")
        mid = head_channels or in_ch // 4
        self.head = nn.Sequential(conv_bn_relu(in_ch, mid), nn.Dropout(dropout),
                                  nn.Conv2d(mid, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_to(self.head(self.backbone(x)["layer4"]), x)


@register_model("fcn_resnet50", task="semantic", defaults={"backbone": "resnet50"})
@register_model("fcn_resnet18", task="semantic", defaults={"backbone": "resnet18"})
def build_fcn(**kwargs: object) -> FCN:
    """FCN with a dilated ResNet encoder (output stride 8)."""
    return FCN(**kwargs)  # type: ignore[arg-type]

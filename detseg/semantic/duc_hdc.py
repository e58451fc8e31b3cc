"""DUC and HDC, "Understanding Convolution for Semantic Segmentation" (Wang et al., WACV'18).

- Dense Upsampling Convolution: the OS-r feature predicts r*r*C channels, rearranged by
  ``PixelShuffle(r)`` (class-major: channel ``l*r*r + i*r + j`` -> pixel (y*r + i, x*r + j)) into
  full-resolution logits; no bilinear step. The input is padded bottom/right to a multiple of r
  and the logits cropped back.
- Hybrid Dilated Convolution: the dilated stages use sawtooth rates without a common factor
  (layer3 cycles 1, 2, 5, 9 with its first conv at 2; layer4 5, 9, 17) instead of constant 2 / 4.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detseg.backbones import build_backbone
from detseg.registry import register_model
from detseg.semantic.dilation import set_rates
from detseg.semantic.heads import resize_output

HDC_LAYER3 = (1, 2, 5, 9)
HDC_LAYER4 = (5, 9, 17)


def hdc_rates(n: int, cycle: Sequence[int] = HDC_LAYER3, first: int | None = 2) -> list[int]:
    """``n`` rates cycling ``cycle``, the first replaced by ``first`` (R50 layer3: 2,2,5,9,1,2)."""
    rates = [cycle[i % len(cycle)] for i in range(n)]
    if first is not None and rates:
        rates[0] = first
    return rates


def _num_3x3(stage: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in stage.modules())


class DUCHead(nn.Module):
    """DUC head on an OS-``output_stride`` feature -> (N, C, H', W') logits, H' = H / cell_width.

    ``head="single"``: one conv3 (C_in -> r*r*C, bias) -> PixelShuffle(r), r = output_stride.
    ``head="official"`` (TuSimple release): four parallel conv3 at dilations 6/12/18/24 summed,
    r = output_stride / cell_width; no BN or ReLU on the logits either way.
    """

    def __init__(
        self,
        in_ch: int,
        num_classes: int,
        output_stride: int = 8,
        head: str = "single",
        cell_width: int = 1,
    ) -> None:
        super().__init__()
        if head not in ("single", "official"):
            raise ValueError("head must be 'single' or 'official'")
        if output_stride % cell_width:
            raise ValueError("cell_width must divide the output stride")
        r = output_stride // cell_width
        rates = (1,) if head == "single" else (6, 12, 18, 24)
        self.convs = nn.ModuleList(
            nn.Conv2d(in_ch, r * r * num_classes, 3, padding=d, dilation=d) for d in rates
        )
        self.shuffle = nn.PixelShuffle(r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        return self.shuffle(out)


class DUC(nn.Module):
    """ResNet (OS 8) -> DUC head, optionally with HDC rates in layer3 / layer4.

    Args:
        num_classes: output classes C.
        backbone: resnet18/34/50/101/152.
        hdc: use the HDC schedule (else torchvision dilation 2 / 4).
        head, cell_width: see ``DUCHead``; with ``cell_width > 1`` the logits are bilinearly
            resized to the input (the official model predicts at H/2 with cell_width 2).
        frozen_bn: freeze the trunk's BatchNorm (the official recipe does).

    ``forward``: (N, 3, H, W) float -> (N, C, H, W) logits, any H, W.
    """

    output_stride = 8

    def __init__(
        self,
        num_classes: int = 21,
        backbone: str = "resnet101",
        hdc: bool = True,
        head: str = "single",
        cell_width: int = 1,
        frozen_bn: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes, self.cell_width = num_classes, cell_width
        self.backbone = build_backbone(backbone, output_stride=8, frozen_bn=frozen_bn)
        if hdc:
            layer3, layer4 = self.backbone.layer3, self.backbone.layer4
            set_rates(layer3, hdc_rates(_num_3x3(layer3)))
            set_rates(layer4, hdc_rates(_num_3x3(layer4), HDC_LAYER4, None))
        self.head = DUCHead(
            self.backbone.channels("layer4"), num_classes, self.output_stride, head, cell_width
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        r = self.output_stride
        x = F.pad(x, (0, (-w) % r, 0, (-h) % r))
        out = self.head(self.backbone(x)["layer4"])
        if self.cell_width > 1:
            out = resize_output(out, x)
        return out[..., :h, :w]


@register_model("duc_resnet101", task="semantic", defaults={"hdc": False})
@register_model("duc_hdc_resnet101", task="semantic", defaults={"hdc": True})
def build_duc(**kwargs: object) -> DUC:
    """DUC (PixelShuffle x8 logits) on a dilated ResNet-101, with or without HDC rates."""
    return DUC(**kwargs)  # type: ignore[arg-type]

"""SegNet (Badrinarayanan et al., TPAMI'17): VGG16-BN encoder, decoder upsampling by max-unpooling.

The encoder's five 2x2 pools keep their argmax indices; each decoder stage scatters its input back
to those positions (no features are copied across), then refines with conv3-BN-ReLU layers.
Pools round up (as Caffe's) and every unpooling restores the exact pre-pool size, so odd sizes
such as CamVid's 360 x 480 (enc4 45 x 60 -> 23 x 30) come back to the input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from detseg.backbones.trunks import Backbone, FeatureInfo
from detseg.registry import register_model

# vgg16_bn().features: encoder stages end just before the pools at 6, 13, 23, 33, 43
_STAGES = ((0, 6), (7, 13), (14, 23), (24, 33), (34, 43))
# decoder stages 5 .. 1: conv widths after each unpooling (spec G2, the SegNet-Tutorial conv*_D)
_DECODER = (
    (512, 512, 512, 512),
    (512, 512, 512, 256),
    (256, 256, 256, 128),
    (128, 128, 64),
    (64, 64),
)


class VGG16BNEncoder(Backbone):
    """torchvision ``vgg16_bn().features`` (keys ``features.N``) whose stages SegNet runs one by one."""

    classifier_prefixes = ("classifier.",)

    def __init__(self) -> None:
        super().__init__()
        self.features = torchvision.models.vgg16_bn(weights=None).features
        widths = (64, 128, 256, 512, 512)
        self.feature_info = [FeatureInfo(f"s{2**i}", c, 2**i) for i, c in enumerate(widths)]

    def stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``i`` (0..4) before its pool: (N, C_in, h, w) -> (N, widths[i], h, w)."""
        start, stop = _STAGES[i]
        return self.features[start:stop](x)


def _cbr(in_ch: int, out_ch: int) -> list[nn.Module]:
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return [conv, nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


def max_unpool(x: torch.Tensor, indices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Place (N, C, h, w) values at their flat per-channel ``indices`` in a zero (N, C, *size) map.

    Equals ``F.max_unpool2d(x, indices, 2, output_size=size)``, written as a scatter so that it
    exports to ONNX (ScatterElements).
    """
    n, c = x.shape[:2]
    out = x.new_zeros(n, c, size[0] * size[1])
    out = out.scatter(2, indices.flatten(2), x.flatten(2))
    return out.view(n, c, size[0], size[1])


class SegNet(nn.Module):
    """SegNet: VGG16-BN encoder with pooling indices, mirrored decoder, conv3 logits.

    Args:
        num_classes: output classes C (CamVid: 11).

    ``forward``: (N, 3, H, W) float -> (N, C, H, W) logits, any H, W.
    """

    def __init__(self, num_classes: int = 21) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.encoder = VGG16BNEncoder()
        stages = []
        for i, widths in enumerate(_DECODER):
            layers = [m for a, b in zip(widths[:-1], widths[1:], strict=True) for m in _cbr(a, b)]
            if i == len(_DECODER) - 1:
                logits = nn.Conv2d(widths[-1], num_classes, 3, padding=1)
                nn.init.kaiming_normal_(logits.weight)
                nn.init.zeros_(logits.bias)
                layers.append(logits)
            stages.append(nn.Sequential(*layers))
        self.decoder = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trail = []
        for i in range(len(_STAGES)):
            x = self.encoder.stage(i, x)
            size = (x.shape[-2], x.shape[-1])
            x, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
            trail.append((idx, size))
        for stage in self.decoder:
            idx, size = trail.pop()
            x = stage(max_unpool(x, idx, size))
        return x


@register_model("segnet", task="semantic")
def build_segnet(**kwargs: object) -> SegNet:
    """SegNet: VGG16-BN encoder, max-unpooling decoder with the encoder's pooling indices."""
    return SegNet(**kwargs)  # type: ignore[arg-type]

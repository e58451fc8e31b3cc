"""U-Net, "same" variant: padded 3x3 convs with BatchNorm, up-convolutions, skip concatenation.

The input is reflect-padded to a multiple of 2**depth and the logits cropped back, so any size works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detseg.registry import register_model
from detseg.semantic.heads import conv_bn_relu


def _double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(in_ch, out_ch), conv_bn_relu(out_ch, out_ch))


class UNet(nn.Module):
    """U-Net (Ronneberger et al.) with BN and 'same' padding.

    Args:
        num_classes: output classes C.
        in_channels: input channels.
        base_channels: width of the first level (paper: 64); doubles per level.
        depth: number of poolings (paper: 4).

    ``forward``: (N, in_channels, H, W) float -> (N, C, H, W) logits, any H, W.
    """

    def __init__(self, num_classes: int = 2, in_channels: int = 3, base_channels: int = 64,
                 depth: int = 4) -> None:
        super().__init__()
        self.num_classes, self.depth = num_classes, depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_double_conv(in_channels, widths[0])])
        self.down.extend(_double_conv(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.fuse = nn.ModuleList(_double_conv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**self.depth
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, fuse in zip(self.up, self.fuse, strict=True):
            x = fuse(torch.cat([up(x), skips.pop()], dim=1))
        return self.classifier(x)[..., :h, :w]


@register_model("unet", task="semantic")
def build_unet(**kwargs: object) -> UNet:
    """U-Net ('same' padding + BN), trained from scratch."""
    return UNet(**kwargs)  # type: ignore[arg-type]

"""U-Net (Ronneberger et al.): "same" variant (default) and the paper's "valid" variant.

- "same": padded 3x3 convs with BatchNorm; the input is reflect-padded to a multiple of 2**depth
  and the logits cropped back, so any size works.
- "valid": the paper's network: unpadded 3x3 convs without BN, dropout at the end of the
  contracting path, centre-cropped pre-pool skips; a 572 x 572 tile gives 388 x 388 logits
  (H - 184 at depth 4). ``predict_tiled`` mirror-pads any image (92 px at depth 4) to get H x W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detseg.errors import DetsegError
from detseg.registry import register_model
from detseg.semantic.heads import conv_bn_relu


def _valid_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    """Unpadded conv3x3 (bias) -> ReLU, Gaussian init with std sqrt(2 / (9 C_in)) (paper)."""
    conv = nn.Conv2d(in_ch, out_ch, 3)
    nn.init.normal_(conv.weight, std=(2.0 / (9 * in_ch)) ** 0.5)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.ReLU(inplace=True))


def _double_conv(in_ch: int, out_ch: int, valid: bool = False) -> nn.Sequential:
    block = _valid_conv if valid else conv_bn_relu
    return nn.Sequential(block(in_ch, out_ch), block(out_ch, out_ch))


def _mirror_pad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Reflect-pad (left, right, top, bottom), repeating the reflection for pads past the size."""
    if min(x.shape[-2:]) < 2:
        return F.pad(x, pad, mode="replicate")
    while any(pad):
        h, w = x.shape[-2:]
        step = (min(pad[0], w - 1), min(pad[1], w - 1), min(pad[2], h - 1), min(pad[3], h - 1))
        x = F.pad(x, step, mode="reflect")
        pad = tuple(p - s for p, s in zip(pad, step, strict=True))
    return x


def _centre_crop(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    dy, dx = (x.shape[-2] - like.shape[-2]) // 2, (x.shape[-1] - like.shape[-1]) // 2
    return x[..., dy : dy + like.shape[-2], dx : dx + like.shape[-1]]


class UNet(nn.Module):
    """U-Net (Ronneberger et al.), "same" (BN, padded) or "valid" (paper) variant.

    Args:
        num_classes: output classes C.
        in_channels: input channels.
        base_channels: width of the first level (paper: 64); doubles per level.
        depth: number of poolings (paper: 4).
        variant: "same" (default) or "valid" (paper: no padding, no BN, cropped skips).
        dropout: "valid" only: dropout at the end of the contracting path (paper: 0.5).

    ``forward``: (N, in_channels, H, W) float -> (N, C, H, W) logits, any H, W ("same"); for
    "valid", H and W must be valid sizes (``valid_size``) and the logits are (H - margin, W - margin)
    with ``margin = 2 * self.border``; use ``predict_tiled`` for full-size logits of any image.
    """

    def __init__(
        self,
        num_classes: int = 2,
        in_channels: int = 3,
        base_channels: int = 64,
        depth: int = 4,
        variant: str = "same",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if variant not in ("same", "valid"):
            raise ValueError("variant must be 'same' or 'valid'")
        self.num_classes, self.depth, self.variant = num_classes, depth, variant
        valid = variant == "valid"
        # two unpadded convs lose 2 px per side at stride 2**i: on levels 0..depth going down
        # and 0..depth-1 coming up (depth 4: 62 + 30 = 92 px, i.e. 572 -> 388)
        self.border = 2 * (2 ** (depth + 1) - 1) + 2 * (2**depth - 1) if valid else 0
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_double_conv(in_channels, widths[0], valid)])
        self.down.extend(_double_conv(widths[i], widths[i + 1], valid) for i in range(depth))
        self.drop = nn.Dropout2d(dropout) if valid else nn.Identity()
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in reversed(range(depth))
        )
        self.fuse = nn.ModuleList(
            _double_conv(2 * widths[i], widths[i], valid) for i in reversed(range(depth))
        )
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)

    def valid_size(self, n: int) -> bool:
        """Whether an input side of ``n`` px is even before every pool and positive at the output."""
        n = int(n)  # a traced size is a tensor: never update it in place
        skips = []
        for _ in range(self.depth):
            n -= 4
            if n <= 0 or n % 2:
                return False
            skips.append(n)
            n //= 2
        n -= 4
        for skip in reversed(skips):
            n = 2 * n - 4
            if n <= 0 or (skip - n - 4) % 2:
                return False
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "valid":
            return self._forward_valid(x)
        h, w = x.shape[-2:]
        m = 2**self.depth
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w or torch.onnx.is_in_onnx_export():  # export: pads of any size
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

    def _forward_valid(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if not (self.valid_size(h) and self.valid_size(w)):
            raise DetsegError(
                f"U-Net 'valid' got a {w}x{h} input; each side must be 16k + 124 px (k >= 4, "
                "e.g. 572) at depth 4: use predict_tiled() or the 'same' variant for other sizes."
            )
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = self.drop(skips.pop())
        for up, fuse in zip(self.up, self.fuse, strict=True):
            x = up(x)
            x = fuse(torch.cat([x, _centre_crop(skips.pop(), x)], dim=1))
        return self.classifier(x)

    def predict_tiled(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C, H, W) logits of the "valid" net: mirror-pad, run, crop.

        The image is reflected by ``border`` px on every side (overlap-tile) and further at the
        bottom/right up to the next valid size, so the logits cover exactly the input.
        """
        if self.variant == "same":
            return self(x)
        h, w = x.shape[-2:]
        pads = []
        for n in (w, h):
            total = n + 2 * self.border
            while not self.valid_size(total):
                total += 1
            pads.append(total - n - self.border)
        x = _mirror_pad(x, (self.border, pads[0], self.border, pads[1]))
        return self._forward_valid(x)[..., :h, :w]


@register_model("unet", task="semantic")
def build_unet(**kwargs: object) -> UNet:
    """U-Net ('same' padding + BN), trained from scratch."""
    return UNet(**kwargs)  # type: ignore[arg-type]

"""GCN, "Large Kernel Matters" (Peng et al., CVPR'17): global convolution + boundary refinement.

Each ResNet stage (strides 4..32) goes through a Global Convolution Module (k x 1 then 1 x k,
plus 1 x k then k x 1, summed; no BN, no ReLU) straight to C class scores, and a Boundary
Refinement residual block. Scores fuse top-down with x2 bilinear deconvolutions, then two more
x2 steps (each followed by BR) reach full resolution: nine BRs in all.
"""

from __future__ import annotations

import torch
from torch import nn

from detseg.backbones import build_backbone
from detseg.registry import register_model
from detseg.semantic.heads import resize_to
from detseg.semantic.upsample import BilinearUpsample


class GlobalConv(nn.Module):
    """GCM: ``conv_1xk(conv_kx1(x)) + conv_kx1(conv_1xk(x))``, C_in -> C; k odd.

    ``forward``: (N, C_in, h, w) -> (N, C, h, w).
    """

    def __init__(self, in_ch: int, out_ch: int, k: int = 15) -> None:
        super().__init__()
        if k % 2 != 1:
            raise ValueError("the GCN kernel size k must be odd")
        p = k // 2
        self.left = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, (k, 1), padding=(p, 0)),
            nn.Conv2d(out_ch, out_ch, (1, k), padding=(0, p)),
        )
        self.right = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, (1, k), padding=(0, p)),
            nn.Conv2d(out_ch, out_ch, (k, 1), padding=(p, 0)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x) + self.right(x)


class BoundaryRefine(nn.Module):
    """BR: ``s + conv3(relu(conv3(s)))``, C -> C, no BN. ``forward``: (N, C, h, w) -> same."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x).relu())


class GCN(nn.Module):
    """GCN on an undilated torchvision ResNet (taps layer1..layer4, the stem sets the 1/2 size).

    Args:
        num_classes: output classes C.
        backbone: resnet18/34/50/101/152.
        k: GCM kernel size (paper: 15; odd).
        learn_upsample: learn the x2 depthwise bilinear deconvolutions (default fixed).
        frozen_bn: freeze the trunk's BatchNorm.

    ``forward``: (N, 3, H, W) float -> (N, C, H, W) logits, any H, W.
    """

    _TAPS = ("layer1", "layer2", "layer3", "layer4")

    def __init__(
        self,
        num_classes: int = 21,
        backbone: str = "resnet50",
        k: int = 15,
        learn_upsample: bool = False,
        frozen_bn: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = build_backbone(backbone, frozen_bn=frozen_bn)
        self.gcm = nn.ModuleList(
            GlobalConv(self.backbone.channels(t), num_classes, k) for t in self._TAPS
        )
        self.br_score = nn.ModuleList(BoundaryRefine(num_classes) for _ in self._TAPS)
        self.br_fuse = nn.ModuleList(BoundaryRefine(num_classes) for _ in range(5))
        self.ups = nn.ModuleList(
            BilinearUpsample(num_classes, 2, padding=1, learnable=learn_upsample) for _ in range(5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        scores = [
            br(gcm(feats[t]))
            for t, gcm, br in zip(self._TAPS, self.gcm, self.br_score, strict=True)
        ]
        # top-down: fuse into the stride-16/8/4 scores, then up to stride 2 and to H x W; each x2
        # deconvolution is resized to the target's exact size (odd sizes)
        targets = [*reversed(scores[:-1]), feats["stem"], x]
        f = scores[-1]
        for i, (target, up, br) in enumerate(zip(targets, self.ups, self.br_fuse, strict=True)):
            f = resize_to(up(f), target)
            f = br(f + target if i < 3 else f)
        return f


@register_model("gcn_resnet18", task="semantic", defaults={"backbone": "resnet18"})
@register_model("gcn_resnet50", task="semantic", defaults={"backbone": "resnet50"})
@register_model("gcn_resnet101", task="semantic", defaults={"backbone": "resnet101"})
@register_model("gcn_resnet152", task="semantic", defaults={"backbone": "resnet152"})
def build_gcn(**kwargs: object) -> GCN:
    """GCN (k = 15): global convolution modules and boundary refinement on an OS-32 ResNet."""
    return GCN(**kwargs)  # type: ignore[arg-type]

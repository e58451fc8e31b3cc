"""detectron2-named ResNet + FPN, so detectron2 model-zoo checkpoints load with ``strict=True``.

Module names follow detectron2's ``build_resnet_fpn_backbone``: ``bottom_up.stem.conv1`` (with its
FrozenBN as ``conv1.norm``), ``bottom_up.res{2..5}.{i}.conv{1,2,3}`` and ``.shortcut``,
``fpn_lateral{2..5}`` and ``fpn_output{2..5}``. The layout is MSRA's (stride in the first 1x1 when
``stride_in_1x1``), FrozenBN with eps 1e-5, FPN with sum (or RetinaNet's average) fusion, nearest
x2 top-down and P6 = max_pool(P5, kernel 1, stride 2) (or RetinaNet's P6/P7 from C5). ``TrunkFPN``
puts the same FPN (same key names) on a light torchvision trunk (MobileNetV2) for CPU training
from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from detseg.backbones.trunks import build_backbone

DEPTH_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def c2_xavier_fill(module: nn.Module) -> None:
    """detectron2 ``c2_xavier_fill``: kaiming-uniform weights (a = 1), zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def c2_msra_fill(module: nn.Module) -> None:
    """detectron2 ``c2_msra_fill``: kaiming-normal weights (fan_out, ReLU), zero bias."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def normal_fill(module: nn.Module, std: float) -> None:
    """Normal(0, ``std``) weights and zero bias (detectron2's predictor layers)."""
    nn.init.normal_(module.weight, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class FrozenBN(FrozenBatchNorm2d):
    """FrozenBN evaluated as detectron2 does without gradients: ``F.batch_norm`` in eval mode.

    torchvision's folded ``x * scale + bias`` rounds differently; detectron2 checkpoints were
    validated with this form, and the deep R-50 amplifies the last-bit differences.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad:
            return super().forward(x)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class ConvNorm(nn.Conv2d):
    """``nn.Conv2d`` without bias followed by its FrozenBN, stored as ``.norm`` (detectron2 names)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1
    ) -> None:
        pad = dilation * (kernel - 1) // 2
        super().__init__(cin, cout, kernel, stride, pad, dilation=dilation, bias=False)
        self.norm = FrozenBN(cout, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(super().forward(x))


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck with projection shortcut when the shape changes."""

    def __init__(
        self, cin: int, cout: int, bottleneck: int, stride: int, stride_in_1x1: bool, dilation: int
    ) -> None:
        super().__init__()
        if cin != cout:
            self.shortcut = ConvNorm(cin, cout, 1, stride)
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvNorm(cin, bottleneck, 1, s1)
        self.conv2 = ConvNorm(bottleneck, bottleneck, 3, s3, dilation)
        self.conv3 = ConvNorm(bottleneck, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        short = self.shortcut(x) if hasattr(self, "shortcut") else x
        return F.relu_(out + short)


class BasicStem(nn.Module):
    """7x7/2 conv + FrozenBN + ReLU + 3x3/2 max pool (stride 4)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_channels, out_channels, 7, 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class ResNet(nn.Module):
    """detectron2 ResNet returning ``{"res2": (N,256,H/4,W/4), ..., "res5": (N,2048,H/32,W/32)}``."""

    def __init__(
        self,
        depth: int = 50,
        stride_in_1x1: bool = True,
        width_per_group: int = 64,
        stem_out_channels: int = 64,
        res2_out_channels: int = 256,
        res5_dilation: int = 1,
    ) -> None:
        super().__init__()
        self.stem = BasicStem(3, stem_out_channels)
        cin, cout, bottleneck = stem_out_channels, res2_out_channels, width_per_group
        for i, n in enumerate(DEPTH_BLOCKS[depth]):
            dilation = res5_dilation if i == 3 else 1
            first_stride = 1 if i == 0 or dilation > 1 else 2
            blocks = []
            for b in range(n):
                stride = first_stride if b == 0 else 1
                blocks.append(
                    BottleneckBlock(cin, cout, bottleneck, stride, stride_in_1x1, dilation)
                )
                cin = cout
            self.add_module(f"res{i + 2}", nn.Sequential(*blocks))
            cout, bottleneck = cout * 2, bottleneck * 2

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.stem(x)
        out = {}
        for i in range(2, 6):
            x = getattr(self, f"res{i}")(x)
            out[f"res{i}"] = x
        return out


class LastLevelP6P7(nn.Module):
    """detectron2 ``LastLevelP6P7``: P6 = conv3x3/2(C5), P7 = conv3x3/2(ReLU(P6)) (RetinaNet)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, c5: Tensor) -> tuple[Tensor, Tensor]:
        p6 = self.p6(c5)
        return p6, self.p7(F.relu(p6))


class FPN(nn.Module):
    """detectron2 ``FPN`` over any ``bottom_up`` returning ``{"res2": C2, ..., "res5": C5}``.

    ``forward(image (N, 3, H, W), H and W multiples of 32) -> (p2, ..., p5, p6[, p7])``: lateral
    1x1 convs, nearest x2 top-down (``fuse_type="avg"`` halves each sum, the halved map
    propagating), 3x3 output convs; ``top_block`` "LastLevelMaxPool" (P6 = max_pool(P5, 1, 2))
    or "LastLevelP6P7" (P6/P7 from C5, :class:`LastLevelP6P7`).

    Args:
        bottom_up: the trunk, stored as ``bottom_up``.
        in_channels: channels of each of ``in_features`` (C2..C5), in that order.
    """

    def __init__(
        self,
        bottom_up: nn.Module,
        in_features: Sequence[str],
        in_channels: Sequence[int],
        out_channels: int = 256,
        fuse_type: str = "sum",
        top_block: str = "LastLevelMaxPool",
    ) -> None:
        super().__init__()
        if fuse_type not in ("sum", "avg") or top_block not in TOP_BLOCKS:
            raise ValueError(f"unsupported detectron2 FPN setting {(fuse_type, top_block)}")
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        self.fuse_type = fuse_type
        for name, cin in zip(self.in_features, in_channels, strict=True):
            level = int(name[-1])
            lateral = nn.Conv2d(cin, out_channels, 1)
            output = nn.Conv2d(out_channels, out_channels, 3, padding=1)
            c2_xavier_fill(lateral)  # detectron2's FPN initialisation
            c2_xavier_fill(output)
            self.add_module(f"fpn_lateral{level}", lateral)
            self.add_module(f"fpn_output{level}", output)
        if top_block == "LastLevelP6P7":
            self.top_block = LastLevelP6P7(in_channels[-1], out_channels)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        return self.fuse(self.bottom_up(image))

    def fuse(self, feats: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """The pyramid from the bottom-up features ``{"res2": ..., ...}`` (finest first)."""
        levels = [int(n[-1]) for n in self.in_features]
        prev = getattr(self, f"fpn_lateral{levels[-1]}")(feats[self.in_features[-1]])
        outs = [getattr(self, f"fpn_output{levels[-1]}")(prev)]
        for name, level in zip(self.in_features[-2::-1], levels[-2::-1], strict=True):
            lateral = getattr(self, f"fpn_lateral{level}")(feats[name])
            prev = lateral + F.interpolate(prev, scale_factor=2.0, mode="nearest")
            if self.fuse_type == "avg":
                prev = prev / 2
            outs.insert(0, getattr(self, f"fpn_output{level}")(prev))
        if hasattr(self, "top_block"):
            return (*outs, *self.top_block(feats[self.in_features[-1]]))
        return (*outs, F.max_pool2d(outs[-1], kernel_size=1, stride=2))


TOP_BLOCKS = ("LastLevelMaxPool", "LastLevelP6P7")


class ResNetFPN(FPN):
    """detectron2 ``build_resnet_fpn_backbone`` (``top_block="LastLevelMaxPool"``, p2..p6) and
    ``build_retinanet_resnet_fpn_backbone`` (``fpn_fuse_type="avg"``-capable, ``"LastLevelP6P7"``
    from C5, p2..p7): ``forward(image (N,3,H,W)) -> (p2, ...)``.

    H and W must be multiples of 32 (detectron2 pads the batch to that). The keyword arguments are
    detectron2's config values; only the R-50/101 FrozenBN, no-FPN-norm setting exists.
    """

    def __init__(
        self,
        depth: int = 50,
        stride_in_1x1: bool = True,
        norm: str = "FrozenBN",
        num_groups: int = 1,
        width_per_group: int = 64,
        stem_out_channels: int = 64,
        res2_out_channels: int = 256,
        res5_dilation: int = 1,
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        fpn_in_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        fpn_out_channels: int = 256,
        fpn_norm: str = "",
        fpn_fuse_type: str = "sum",
        top_block: str = "LastLevelMaxPool",
    ) -> None:
        if (norm, num_groups, fpn_norm) != ("FrozenBN", 1, ""):
            raise ValueError(
                f"unsupported detectron2 backbone setting {(norm, num_groups, fpn_norm)}"
            )
        bottom_up = ResNet(
            depth,
            stride_in_1x1,
            width_per_group,
            stem_out_channels,
            res2_out_channels,
            res5_dilation,
        )
        channels = [res2_out_channels * 2 ** (int(n[-1]) - 2) for n in fpn_in_features]
        super().__init__(
            bottom_up, fpn_in_features, channels, fpn_out_channels, fpn_fuse_type, top_block
        )


class TrunkFPN(FPN):
    """The detectron2 FPN (same ``fpn_lateral{2..5}`` / ``fpn_output{2..5}`` names) on a torchvision
    trunk from ``detseg.backbones.trunks`` (``bottom_up``, torchvision key names, trainable BN).

    ``forward(image (N, 3, H, W), H, W multiples of 32) -> (p2, p3, p4, p5, p6)`` with
    ``out_channels`` channels at strides 4..64; the trunk's stride-4..32 taps feed the FPN.
    """

    def __init__(self, trunk: str = "mobilenet_v2", out_channels: int = 64) -> None:
        bottom_up = build_backbone(trunk)
        taps = {f"s{2**k}": f"res{k}" for k in range(2, 6)}
        info = [i for i in bottom_up.feature_info if i.name in taps]
        super().__init__(
            bottom_up, [taps[i.name] for i in info], [i.channels for i in info], out_channels
        )
        self.renames = {i.name: taps[i.name] for i in info}

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        feats = self.bottom_up(image)
        return self.fuse({self.renames[k]: v for k, v in feats.items() if k in self.renames})

"""detectron2-named ResNet + FPN, so detectron2 model-zoo checkpoints load with ``strict=True``.

Module names follow detectron2's ``build_resnet_fpn_backbone``: ``bottom_up.stem.conv1`` (with its
FrozenBN as ``conv1.norm``), ``bottom_up.res{2..5}.{i}.conv{1,2,3}`` and ``.shortcut``,
``fpn_lateral{2..5}`` and ``fpn_output{2..5}``. The layout is MSRA's (stride in the first 1x1 when
``stride_in_1x1``), FrozenBN with eps 1e-5, FPN with sum fusion, nearest x2 top-down and
P6 = max_pool(P5, kernel 1, stride 2). ``TrunkFPN`` puts the same FPN (same key names) on a light
torchvision trunk (MobileNetV2) for CPU training from scratch.
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


class ResNetFPN(nn.Module):
    """detectron2 ``build_resnet_fpn_backbone``: ``forward(image (N,3,H,W)) -> (p2, p3, p4, p5, p6)``.

    H and W must be multiples of 32 (detectron2 pads the batch to that). The keyword arguments are
    detectron2's config values; only the R-50/101 FrozenBN, sum-fusion, max-pool-P6 setting exists.
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
        super().__init__()
        supported = (norm, num_groups, fpn_norm, fpn_fuse_type, top_block)
        if supported != ("FrozenBN", 1, "", "sum", "LastLevelMaxPool"):
            raise ValueError(f"unsupported detectron2 backbone setting {supported}")
        self.bottom_up = ResNet(
            depth,
            stride_in_1x1,
            width_per_group,
            stem_out_channels,
            res2_out_channels,
            res5_dilation,
        )
        self.in_features = list(fpn_in_features)
        channels = [res2_out_channels * 2 ** (int(n[-1]) - 2) for n in self.in_features]
        add_fpn_layers(self, self.in_features, channels, fpn_out_channels)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        return fpn_forward(self, self.bottom_up(image), self.in_features)


def add_fpn_layers(
    module: nn.Module, in_features: Sequence[str], channels: Sequence[int], out_channels: int
) -> None:
    """Add ``fpn_lateral{k}`` (1x1) and ``fpn_output{k}`` (3x3) convs, xavier-filled, to ``module``."""
    for name, cin in zip(in_features, channels, strict=True):
        level = int(name[-1])
        lateral = nn.Conv2d(cin, out_channels, 1)
        output = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        c2_xavier_fill(lateral)
        c2_xavier_fill(output)
        module.add_module(f"fpn_lateral{level}", lateral)
        module.add_module(f"fpn_output{level}", output)


def fpn_forward(
    module: nn.Module, feats: dict[str, Tensor], in_features: Sequence[str]
) -> tuple[Tensor, ...]:
    """detectron2 FPN of ``module``'s layers on ``feats`` (``in_features`` finest first): sum
    fusion, nearest x2 top-down, P6 = max_pool(P5, 1, stride 2). Returns (p2, ..., p6)."""
    levels = [int(n[-1]) for n in in_features]
    prev = getattr(module, f"fpn_lateral{levels[-1]}")(feats[in_features[-1]])
    outs = [getattr(module, f"fpn_output{levels[-1]}")(prev)]
    for name, level in zip(in_features[-2::-1], levels[-2::-1], strict=True):
        lateral = getattr(module, f"fpn_lateral{level}")(feats[name])
        prev = lateral + F.interpolate(prev, scale_factor=2.0, mode="nearest")
        outs.insert(0, getattr(module, f"fpn_output{level}")(prev))
    outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
    return tuple(outs)


class TrunkFPN(nn.Module):
    """The detectron2 FPN (same ``fpn_lateral{2..5}`` / ``fpn_output{2..5}`` names) on a torchvision
    trunk from ``detseg.backbones.trunks`` (``bottom_up``, torchvision key names, trainable BN).

    ``forward(image (N, 3, H, W), H, W multiples of 32) -> (p2, p3, p4, p5, p6)`` with
    ``out_channels`` channels at strides 4..64; the trunk's stride-4..32 taps feed the FPN.
    """

    def __init__(self, trunk: str = "mobilenet_v2", out_channels: int = 64) -> None:
        super().__init__()
        self.bottom_up = build_backbone(trunk)
        taps = {f"s{2**k}": f"res{k}" for k in range(2, 6)}
        info = [i for i in self.bottom_up.feature_info if i.name in taps]
        self.renames = {i.name: taps[i.name] for i in info}
        self.in_features = [taps[i.name] for i in info]
        add_fpn_layers(self, self.in_features, [i.channels for i in info], out_channels)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        feats = {self.renames[k]: v for k, v in self.bottom_up(image).items() if k in self.renames}
        return fpn_forward(self, feats, self.in_features)

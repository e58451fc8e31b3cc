"""torchvision classification networks as multi-scale feature extractors.

The trunks keep torchvision's own module names (``conv1``, ``layer1``... for ResNets, ``features.N``
for the others), so a torchvision ImageNet file loads with ``load_imagenet`` strictly: every key is
used except the classifier's, which the backbone drops.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detseg.errors import CheckpointError


@dataclass(frozen=True)
class FeatureInfo:
    """One output level: its name in ``forward``'s dict, channel count and stride in pixels."""

    name: str
    channels: int
    stride: int


class Backbone(nn.Module):
    """Base class: ``forward(x (N, C, H, W)) -> OrderedDict[name, (N, C_i, H/s_i, W/s_i)]``.

    Levels come fine to coarse, as listed in ``feature_info``.
    """

    feature_info: list[FeatureInfo]
    classifier_prefixes: tuple[str, ...] = ()

    def channels(self, name: str) -> int:
        return next(f.channels for f in self.feature_info if f.name == name)

    def load_imagenet(self, path: str | Path) -> None:
        """Load a torchvision ImageNet checkpoint strictly, dropping only its classifier keys.

        With ``in_channels != 3`` the stem conv keeps its fresh initialisation, as BackgroundMattingV2
        does when it loads RGB weights into its 6-channel encoder.
        """
        from detseg.checkpoint import read_state_dict

        state, _ = read_state_dict(path)
        state = {k: v for k, v in state.items() if not k.startswith(self.classifier_prefixes)}
        own = self.state_dict()
        stem = next(iter(own))
        if own[stem].shape != state.get(stem, own[stem]).shape:
            state[stem] = own[stem]
        if isinstance(self, ResNetBackbone):
            state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: not a torchvision ImageNet file of this backbone "
                f"({len(missing)} missing keys, {len(unexpected)} unexpected keys)."
            )
        self.load_state_dict(state, strict=True)


def _freeze_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below ``module`` by torchvision's FrozenBatchNorm2d."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_bn(child)
    return module


def _dilate(module: nn.Module, dilation: int, strided: bool) -> None:
    """Dilate the 3x3 convs of a block in place (the CSAIL ``_nostride_dilate`` surgery).

    A strided block loses its stride and gets half the dilation; other blocks get ``dilation``.
    """
    for m in module.modules():
        if not isinstance(m, nn.Conv2d):
            continue
        if m.stride == (2, 2):
            m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                d = max(dilation // 2, 1)
                m.dilation, m.padding = (d, d), (d, d)
        elif m.kernel_size == (3, 3) and not strided:
            m.dilation, m.padding = (dilation, dilation), (dilation, dilation)


class ResNetBackbone(Backbone):
    """torchvision ResNet-18/34/50/101 trunk: levels ``stem`` (s2), ``layer1`` (s4) ... ``layer4``.

    Args:
        name: torchvision builder name, e.g. "resnet50".
        in_channels: input channels (6 for image + background); the stem conv is rebuilt if != 3.
        output_stride: 32, 16 or 8; layers past it are dilated instead of strided.
        frozen_bn: use FrozenBatchNorm2d (detectron2 / detection practice).
    """

    classifier_prefixes = ("fc.",)

    def __init__(
        self,
        name: str = "resnet50",
        in_channels: int = 3,
        output_stride: int = 32,
        frozen_bn: bool = False,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError("output_stride must be 8, 16 or 32")
        net = getattr(torchvision.models, name)(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        width = 4 if isinstance(net.layer1[0], torchvision.models.resnet.Bottleneck) else 1
        stride, dilation = 4, 1
        info = [FeatureInfo("stem", 64, 2), FeatureInfo("layer1", 64 * width, 4)]
        for i, layer in ((2, self.layer2), (3, self.layer3), (4, self.layer4)):
            if stride * 2 > output_stride:
                dilation *= 2
                for j, block in enumerate(layer):
                    _dilate(block, dilation, strided=j == 0)
            else:
                stride *= 2
            info.append(FeatureInfo(f"layer{i}", 64 * width * 2 ** (i - 1), stride))
        self.feature_info = info
        if frozen_bn:
            _freeze_bn(self)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        x = self.relu(self.bn1(self.conv1(x)))
        out["stem"] = x
        x = self.maxpool(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            out[name] = x
        return out


# name -> (torchvision builder, taps: child name in .features -> (level name, channels, stride))
_SEQUENTIAL: dict[str, dict[str, tuple[str, int, int]]] = {
    "mobilenet_v2": {
        "1": ("s2", 16, 2),
        "3": ("s4", 24, 4),
        "6": ("s8", 32, 8),
        "13": ("s16", 96, 16),
        "18": ("s32", 1280, 32),
    },
    "vgg16_bn": {
        "6": ("s2", 64, 2),
        "13": ("s4", 128, 4),
        "23": ("s8", 256, 8),
        "33": ("s16", 512, 16),
        "43": ("s32", 512, 32),
    },
    "densenet121": {
        "relu0": ("s2", 64, 2),
        "denseblock1": ("s4", 256, 4),
        "denseblock2": ("s8", 512, 8),
        "denseblock3": ("s16", 1024, 16),
        "norm5": ("s32", 1024, 32),
    },
}


class SequentialBackbone(Backbone):
    """``features`` of torchvision mobilenet_v2 / vgg16_bn / densenet121, tapped at strides 2..32.

    Levels are named ``s2`` ... ``s32``. ``output_stride`` (mobilenet_v2 only) dilates the late
    blocks instead of striding them. The MobileNetV2 stem conv is rebuilt for ``in_channels != 3``.
    """

    classifier_prefixes = ("classifier.",)

    def __init__(
        self,
        name: str = "mobilenet_v2",
        in_channels: int = 3,
        output_stride: int = 32,
        frozen_bn: bool = False,
    ) -> None:
        super().__init__()
        if name not in _SEQUENTIAL:
            raise ValueError(f"unknown sequential backbone {name!r}")
        self.features = getattr(torchvision.models, name)(weights=None).features
        first = next(m for m in self.features.modules() if isinstance(m, nn.Conv2d))
        if in_channels != 3:
            self._replace_stem(first, in_channels)
        self._taps = dict(_SEQUENTIAL[name])
        if output_stride != 32:
            if name != "mobilenet_v2" or output_stride not in (8, 16):
                raise ValueError(f"{name}: output_stride {output_stride} is not supported")
            self._dilate_mobilenet(output_stride)
        self._last = list(self._taps)[-1]
        self.feature_info = [FeatureInfo(*v) for v in self._taps.values()]
        if frozen_bn:
            _freeze_bn(self)

    def _replace_stem(self, first: nn.Conv2d, in_channels: int) -> None:
        new = nn.Conv2d(
            in_channels,
            first.out_channels,
            first.kernel_size,
            first.stride,
            first.padding,
            bias=first.bias is not None,
        )
        for parent in self.features.modules():
            for cname, child in parent.named_children():
                if child is first:
                    setattr(parent, cname, new)
                    return

    def _dilate_mobilenet(self, output_stride: int) -> None:
        first_dilated = 14 if output_stride == 16 else 7
        for idx in range(first_dilated, len(self.features)):
            d = 2 if idx < 14 or output_stride == 16 else 4
            strided = idx in (7, 14)
            _dilate(self.features[idx], d, strided)
        # Strides now stop at output_stride; the deepest tap at each stride names that level.
        taps: dict[str, tuple[str, int, int]] = {}
        for key, (_, channels, stride) in self._taps.items():
            s = min(stride, output_stride)
            taps = {k: v for k, v in taps.items() if v[2] != s}
            taps[key] = (f"s{s}", channels, s)
        self._taps = taps

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for cname, child in self.features.named_children():
            x = child(x)
            if cname in self._taps:
                out[self._taps[cname][0]] = x
            if cname == self._last:
                break
        return out


def build_backbone(
    name: str, in_channels: int = 3, output_stride: int = 32, frozen_bn: bool = False
) -> Backbone:
    """Backbone by torchvision name: resnet18/34/50/101, mobilenet_v2, vgg16_bn, densenet121."""
    if name.startswith("resnet"):
        return ResNetBackbone(name, in_channels, output_stride, frozen_bn)
    if name in _SEQUENTIAL:
        return SequentialBackbone(name, in_channels, output_stride, frozen_bn)
    raise ValueError(f"unknown backbone {name!r}")

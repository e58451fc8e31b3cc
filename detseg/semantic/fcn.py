"""Fully convolutional networks (Long et al.): the chapter's FCN-32s/16s/8s and their relatives.

- ``FCN``: the torchvision ``fcn_resnet*`` head on a dilated ResNet trunk (OS 8).
- ``FCNVGG``: FCN-32s/16s/8s on the paper's VGG16 (100-px pad, fc6/fc7 convs, crops, skips).
- ``FCN8s``: FCN-8s skip fusion on ResNet, DenseNet-121 or MobileNetV2 taps.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from detseg.backbones import build_backbone
from detseg.errors import CheckpointError
from detseg.registry import register_model
from detseg.semantic.heads import conv_bn_relu, resize_output, resize_to
from detseg.semantic.upsample import BilinearUpsample


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

    def __init__(
        self,
        num_classes: int = 21,
        backbone: str = "resnet50",
        output_stride: int = 8,
        head_channels: int | None = None,
        dropout: float = 0.1,
        frozen_bn: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = build_backbone(backbone, output_stride=output_stride, frozen_bn=frozen_bn)
        in_ch = self.backbone.channels("layer4")
        mid = head_channels or in_ch // 4
        self.head = nn.Sequential(
            conv_bn_relu(in_ch, mid), nn.Dropout(dropout), nn.Conv2d(mid, num_classes, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_output(self.head(self.backbone(x)["layer4"]), x)


@register_model("fcn_resnet50", task="semantic", defaults={"backbone": "resnet50"})
@register_model("fcn_resnet18", task="semantic", defaults={"backbone": "resnet18"})
def build_fcn(**kwargs: object) -> FCN:
    """FCN with a dilated ResNet encoder (output stride 8)."""
    return FCN(**kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# FCN-32s / 16s / 8s on the paper's VGG16 (spec F1-F4)

# Crop offsets of the 100-px-padded, ceil-mode VGG16 layout (spec F1): constants for every H, W.
_FINAL_CROP = {32: 19, 16: 27, 8: 31}
_POOL4_CROP, _POOL3_CROP = 5, 9


def _crop(x: torch.Tensor, offset: int, like: torch.Tensor | tuple[int, int]) -> torch.Tensor:
    """``x[..., offset : offset + h, offset : offset + w]`` with (h, w) taken from ``like``."""
    h, w = like.shape[-2:] if isinstance(like, torch.Tensor) else like
    return x[..., offset : offset + h, offset : offset + w]


class FCNVGG(nn.Module):
    """FCN-32s / 16s / 8s (Long et al.) on torchvision VGG16, laid out as the Caffe reference nets.

    conv1_1 pads 100 px, every pool rounds up, fc6/fc7 are 7x7 / 1x1 convolutions (ImageNet
    weights reshape into them exactly), scores fuse from pool4 (16s, 8s) and pool3 (8s) after
    cropping at the constant offsets 5 and 9, and the final deconvolution is cropped at 19 / 27 / 31.

    Args:
        num_classes: output classes C.
        stride: 32, 16 or 8 (FCN-32s, -16s, -8s).
        skip_scale: factors on pool4 and pool3 before their score convs: (1, 1) for the paper's
            staged training, (0.01, 1e-4) for the "at-once" net.
        learn_upsample: learn the (depthwise) deconvolutions; the reference keeps them fixed.
        dropout: dropout after fc6 and fc7.

    ``forward``: (N, 3, H, W) float -> (N, C, H, W) logits, any H, W >= 1.
    """

    def __init__(
        self,
        num_classes: int = 21,
        stride: int = 8,
        skip_scale: tuple[float, float] = (1.0, 1.0),
        learn_upsample: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if stride not in _FINAL_CROP:
            raise ValueError("stride must be 32, 16 or 8")
        self.num_classes, self.stride, self.skip_scale = num_classes, stride, tuple(skip_scale)
        self.features = torchvision.models.vgg16(weights=None).features
        self.features[0].padding = (100, 100)
        for m in self.features:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True
        self.fc6 = nn.Conv2d(512, 4096, 7)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.drop = nn.Dropout2d(dropout)
        self.score_fr = nn.Conv2d(4096, num_classes, 1)
        scores = [self.score_fr]
        if stride <= 16:
            self.score_pool4 = nn.Conv2d(512, num_classes, 1)
            self.upscore2 = BilinearUpsample(num_classes, 2, learnable=learn_upsample)
            scores.append(self.score_pool4)
        if stride == 8:
            self.score_pool3 = nn.Conv2d(256, num_classes, 1)
            self.upscore_pool4 = BilinearUpsample(num_classes, 2, learnable=learn_upsample)
            scores.append(self.score_pool3)
        self.upscore = BilinearUpsample(num_classes, stride, learnable=learn_upsample)
        for conv in scores:  # spec F3: new score layers start at zero
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool3 = self.features[:17](x)
        pool4 = self.features[17:24](pool3)
        h = self.features[24:](pool4)
        h = self.drop(F.relu(self.fc6(h)))
        h = self.drop(F.relu(self.fc7(h)))
        score = self.score_fr(h)
        if self.stride <= 16:
            score = self.upscore2(score)
            skip = self.score_pool4(pool4 * self.skip_scale[0])
            score = score + _crop(skip, _POOL4_CROP, score)
        if self.stride == 8:
            score = self.upscore_pool4(score)
            skip = self.score_pool3(pool3 * self.skip_scale[1])
            score = score + _crop(skip, _POOL3_CROP, score)
        return _crop(self.upscore(score), _FINAL_CROP[self.stride], x)

    def load_imagenet(self, path: str | Path) -> None:
        """Load torchvision ``vgg16`` ImageNet weights: conv layers, and fc6/fc7 from the classifier.

        The score layers keep their zero initialisation and the upsamplers their bilinear kernels.
        """
        from detseg.checkpoint import read_state_dict

        state, _ = read_state_dict(path)
        own = self.state_dict()
        mapped = {k: v for k, v in state.items() if k.startswith("features.")}
        for fc, idx in (("fc6", 0), ("fc7", 3)):
            for kind in ("weight", "bias"):
                value = state.get(f"classifier.{idx}.{kind}")
                if value is not None and value.numel() == own[f"{fc}.{kind}"].numel():
                    mapped[f"{fc}.{kind}"] = value.reshape(own[f"{fc}.{kind}"].shape)
        expected = {k for k in own if k.startswith(("features.", "fc6.", "fc7."))}
        wrong = expected.symmetric_difference(mapped) | {
            k for k in expected & set(mapped) if mapped[k].shape != own[k].shape
        }
        if wrong:
            raise CheckpointError(
                f"{path}: not a torchvision vgg16 ImageNet file ({len(wrong)} keys missing, "
                "unexpected or of another shape); use vgg16-397923af.pth."
            )
        self.load_state_dict({**self.state_dict(), **mapped}, strict=True)


@register_model("fcn32s_vgg16", task="semantic", defaults={"stride": 32})
@register_model("fcn16s_vgg16", task="semantic", defaults={"stride": 16})
@register_model("fcn8s_vgg16", task="semantic", defaults={"stride": 8})
def build_fcn_vgg(**kwargs: object) -> FCNVGG:
    """FCN-32s/16s/8s on VGG16: 100-px pad, fc6/fc7 convs, pool4/pool3 skips, bilinear upsampling."""
    return FCNVGG(**kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# FCN-8s on ResNet / DenseNet-121 / MobileNetV2 taps (spec F5)

# backbone family -> (OS-8, OS-16, OS-32) level names of build_backbone
_TAPS = {
    "resnet": ("layer2", "layer3", "layer4"),
    "densenet121": ("s8", "s16", "s32"),
    "mobilenet_v2": ("s8", "s16", "s32"),
}


def _score_head(in_ch: int, num_classes: int, norm: bool, relu: bool) -> nn.Sequential:
    """[BN] -> [ReLU] -> 1x1 score conv (Kaiming-normal weights, zero bias)."""
    conv = nn.Conv2d(in_ch, num_classes, 1)
    nn.init.kaiming_normal_(conv.weight)
    nn.init.zeros_(conv.bias)
    layers: list[nn.Module] = [nn.BatchNorm2d(in_ch)] if norm else []
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []), conv)


class FCN8s(nn.Module):
    """FCN-8s on a torchvision trunk: 1x1 scores at OS 32 / 16 / 8, fused coarse to fine.

    Each coarser score is resized (bilinear, ``align_corners=False``) to the finer tap's exact size
    and added; the sum is resized to H x W. No 100-px pad and no crops. DenseNet taps are
    un-normalised concatenations, so their heads are BN -> ReLU -> 1x1 (norm5 gets ReLU -> 1x1).

    Args:
        num_classes: output classes C.
        backbone: resnet18/34/50/101, densenet121 or mobilenet_v2.
        frozen_bn: freeze the trunk's BatchNorm.

    ``forward``: (N, 3, H, W) float -> (N, C, H, W) logits.
    """

    def __init__(
        self, num_classes: int = 21, backbone: str = "resnet50", frozen_bn: bool = False
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = build_backbone(backbone, frozen_bn=frozen_bn)
        family = "resnet" if backbone.startswith("resnet") else backbone
        if family not in _TAPS:
            raise ValueError(
                f"FCN8s: backbone must be a resnet, densenet121 or mobilenet_v2, not {backbone!r}"
            )
        self.taps = _TAPS[family]
        dense = family == "densenet121"
        self.scores = nn.ModuleList(
            _score_head(self.backbone.channels(t), num_classes, dense and i < 2, dense)
            for i, t in enumerate(self.taps)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        score = None
        for tap, head in zip(reversed(self.taps), reversed(self.scores), strict=True):
            s = head(feats[tap])
            score = s if score is None else resize_to(score, s) + s
        return resize_output(score, x)


@register_model("fcn8s_resnet18", task="semantic", defaults={"backbone": "resnet18"})
@register_model("fcn8s_resnet50", task="semantic", defaults={"backbone": "resnet50"})
@register_model("fcn8s_resnet101", task="semantic", defaults={"backbone": "resnet101"})
@register_model("fcn8s_densenet121", task="semantic", defaults={"backbone": "densenet121"})
def build_fcn8s(**kwargs: object) -> FCN8s:
    """FCN-8s on ResNet / DenseNet-121 taps (OS 8/16/32 score fusion, bilinear resizing)."""
    return FCN8s(**kwargs)  # type: ignore[arg-type]

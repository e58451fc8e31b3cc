"""ESPNet and ESPNet-C (Mehta et al., ECCV 2018), laid out so that the authors' weights load strictly.

Module names follow the authors' ``state_dict`` keys (``encoder.level2.0.d4.conv.weight``, ...), so
``espnet_p_2_q_8_camvid.pth`` / ``espnet_p_2_q_8.pth`` (Cityscapes) load with ``strict=True``.
Hyper-parameters the files do not store: BatchNorm ``eps=1e-3``, per-channel PReLU, no conv
biases, "same" padding ``(k - 1) // 2 * dilation``, image pyramids by ``AvgPool2d(3, 2, 1)``.

The two released decoder checkpoints differ in what the last decoder conv sees at 1/2 resolution:
``decoder_skip="b1"`` (CamVid file, the authors' ``train/Model.py``) concatenates the 19-channel
BN-PReLU output ``b1(cat[level1, image/2])``; ``decoder_skip="level1"`` (Cityscapes file,
``test/Model.py``) concatenates the raw 16-channel ``level1`` output.

Input sizes: the decoder's concatenations need H and W divisible by 8. Other sizes are padded on the
bottom/right by edge replication to the next multiple of 8 and the logits cropped back, so any
size works and multiples of 8 give exactly the authors' output.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detseg.checkpoint import load_state_dict_strict, read_state_dict
from detseg.data.preprocess import Preprocess
from detseg.errors import CheckpointError, DetsegError
from detseg.registry import OfficialFormat, register_model
from detseg.semantic.heads import resize_output

BN_EPS = 1e-3
# decoder_skip variant -> channels it adds to the input of the last decoder conv
DECODER_SKIPS = {"b1": 19, "level1": 16}

CAMVID_CLASS_NAMES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
    "Pedestrian", "Bicyclist", "Unlabelled",
)  # fmt: skip
CITYSCAPES_CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle", "void",
)  # fmt: skip

# The authors' input statistics: BGR, 0..255 units. CamVid: their train/loadData.py procedure on the
# 367 SegNet train images (mean of per-image means / stds); Cityscapes: test/VisualizeResults.py.
CAMVID_PREPROCESS = Preprocess(
    channel_order="BGR",
    mean=(110.3310546875, 108.40888977050781, 105.03321838378906),
    std=(72.12568664550781, 72.69076538085938, 69.90434265136719),
    post_scale=1.0 / 255.0,
)
# The authors also resize Cityscapes images to 1024x512 (cv2 bilinear, after normalising); a
# Preprocess has no resize, so feed 1024x512 images to reproduce their numbers.
CITYSCAPES_PREPROCESS = Preprocess(
    channel_order="BGR",
    mean=(72.3923111, 82.90893555, 73.15840149),
    std=(45.3192215, 46.15289307, 44.91483307),
    post_scale=1.0 / 255.0,
)


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Module:
    """A bias-free "same" conv wrapped as ``.conv`` (the authors' key layout ``<name>.conv.weight``)."""
    pad = (kernel - 1) // 2 * dilation
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, pad, dilation=dilation, bias=False)
    return nn.Sequential(OrderedDict(conv=conv))


def _bn_prelu(channels: int) -> nn.Sequential:
    """BatchNorm (eps 1e-3) + per-channel PReLU, keys ``bn.*`` and ``act.weight``."""
    return nn.Sequential(
        OrderedDict(bn=nn.BatchNorm2d(channels, eps=BN_EPS), act=nn.PReLU(channels))
    )


def _conv_bn_prelu(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv + BatchNorm + PReLU, keys ``conv.weight``, ``bn.*``, ``act.weight``."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, bias=False)
    return nn.Sequential(
        OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_ch, eps=BN_EPS), act=nn.PReLU(out_ch))
    )


def _upsample2x(channels: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(channels, channels, 2, stride=2, bias=False)


class _SpatialPyramid(nn.Module):
    """Reduce with ``c1``, then five parallel 3x3 convs dilated 1, 2, 4, 8, 16, fused hierarchically.

    Output channels are split as ``n1 + 4 * n`` with ``n = out // 5``; the fused output is
    ``cat[d1, d2, d2+d4, d2+d4+d8, d2+d4+d8+d16]`` (the sums remove gridding artefacts).
    """

    def __init__(self, in_ch: int, out_ch: int, reduce_kernel: int, stride: int) -> None:
        super().__init__()
        n = out_ch // 5
        self.c1 = _conv(in_ch, n, reduce_kernel, stride)
        self.d1 = _conv(n, out_ch - 4 * n, 3, dilation=1)
        self.d2 = _conv(n, n, 3, dilation=2)
        self.d4 = _conv(n, n, 3, dilation=4)
        self.d8 = _conv(n, n, 3, dilation=8)
        self.d16 = _conv(n, n, 3, dilation=16)

    def pyramid(self, x: Tensor) -> Tensor:
        """(N, in, H, W) -> (N, out, H / stride, W / stride), before normalisation."""
        reduced = self.c1(x)
        fused = [self.d1(reduced)]
        running = self.d2(reduced)
        fused.append(running)
        for branch in (self.d4, self.d8, self.d16):
            running = running + branch(reduced)
            fused.append(running)
        return torch.cat(fused, 1)


class ESPDownsample(_SpatialPyramid):
    """Strided ESP module (the authors' ``DownSamplerB``): 3x3/2 reduction, then BN + PReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(in_ch, out_ch, reduce_kernel=3, stride=2)
        self.bn = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.act = nn.PReLU(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in, H, W) -> (N, out, ceil(H/2), ceil(W/2))."""
        return self.act(self.bn(self.pyramid(x)))


class ESPBlock(_SpatialPyramid):
    """ESP module (``DilatedParllelResidualBlockB``): 1x1 reduction, optional identity residual
    added before the final BN + PReLU (``bn.bn``, ``bn.act``)."""

    def __init__(self, in_ch: int, out_ch: int, residual: bool = True) -> None:
        super().__init__(in_ch, out_ch, reduce_kernel=1, stride=1)
        if residual and in_ch != out_ch:
            raise ValueError("a residual ESP block needs in_ch == out_ch")
        self.residual = residual
        self.bn = _bn_prelu(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in, H, W) -> (N, out, H, W)."""
        y = self.pyramid(x)
        return self.bn(x + y if self.residual else y)


def _half(x: Tensor) -> Tensor:
    """The authors' image pyramid step: 3x3 average pool, stride 2, padding 1 (counts the padding)."""
    return F.avg_pool2d(x, 3, stride=2, padding=1)


class ESPNetC(nn.Module):
    """ESPNet-C: the ESPNet encoder with a 1x1 classifier at 1/8 resolution.

    ``forward`` returns logits upsampled bilinearly (``align_corners=False``) to the input size; the
    authors' test script did the same x8 upsampling (under PyTorch 0.3, whose bilinear resize
    behaved like ``align_corners=True``). Keys match the authors' ``pretrained/encoder/*.pth``.

    Args:
        num_classes: output channels of the classifier.
        p: ESP blocks at 1/4 resolution (``level2``).
        q: ESP blocks at 1/8 resolution (``level3``).
    """

    def __init__(self, num_classes: int = 20, p: int = 2, q: int = 8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.level1 = _conv_bn_prelu(3, 16, 3, stride=2)
        self.b1 = _bn_prelu(16 + 3)
        self.level2_0 = ESPDownsample(16 + 3, 64)
        self.level2 = nn.ModuleList(ESPBlock(64, 64) for _ in range(p))
        self.b2 = _bn_prelu(64 + 64 + 3)
        self.level3_0 = ESPDownsample(64 + 64 + 3, 128)
        self.level3 = nn.ModuleList(ESPBlock(128, 128) for _ in range(q))
        self.b3 = _bn_prelu(256)
        self.classifier = _conv(256, num_classes, 1)

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        """(N, 3, H, W) -> the features the ESPNet decoder taps.

        Returns:
            ``level1`` (N, 16, H/2, W/2), ``b1`` (N, 19, H/2, W/2), ``b2`` (N, 131, H/4, W/4),
            ``b3`` (N, 256, H/8, W/8) and ``logits`` (N, C, H/8, W/8) (sizes rounded up).
        """
        half = _half(x)
        out0 = self.level1(x)
        out0_cat = self.b1(torch.cat([out0, half], 1))
        out1_0 = self.level2_0(out0_cat)
        out1 = out1_0
        for block in self.level2:
            out1 = block(out1)
        out1_cat = self.b2(torch.cat([out1, out1_0, _half(half)], 1))
        out2_0 = self.level3_0(out1_cat)
        out2 = out2_0
        for block in self.level3:
            out2 = block(out2)
        out2_cat = self.b3(torch.cat([out2_0, out2], 1))
        return {
            "level1": out0,
            "b1": out0_cat,
            "b2": out1_cat,
            "b3": out2_cat,
            "logits": self.classifier(out2_cat),
        }

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) float -> (N, C, H, W) logits (no softmax)."""
        return resize_output(self.encode(x)["logits"], x)


class ESPNet(nn.Module):
    """ESPNet: the ESPNet-C encoder plus the authors' light decoder (reduce-upsample-merge).

    Args:
        num_classes: output channels (CamVid file: 12 incl. void; Cityscapes file: 20 incl. void).
        p: ESP blocks at 1/4 resolution.
        q: ESP blocks at 1/8 resolution.
        decoder_skip: full-resolution/2 feature fed to the last decoder conv: ``"b1"`` (19 ch,
            CamVid checkpoint, ``train/Model.py``) or ``"level1"`` (16 ch, Cityscapes checkpoint,
            ``test/Model.py``).
    """

    def __init__(
        self, num_classes: int = 20, p: int = 2, q: int = 8, decoder_skip: str = "b1"
    ) -> None:
        super().__init__()
        if decoder_skip not in DECODER_SKIPS:
            raise ValueError(f"decoder_skip must be one of {sorted(DECODER_SKIPS)}")
        if num_classes < 5:
            # the decoder's ESP block splits its num_classes output channels five ways
            raise DetsegError(
                f"ESPNet needs at least 5 classes, got {num_classes}; use another model "
                "(e.g. unet) for datasets with fewer classes."
            )
        self.num_classes = num_classes
        self.decoder_skip = decoder_skip
        self.encoder = ESPNetC(num_classes, p, q)
        self.level3_C = _conv(64 + 64 + 3, num_classes, 1)
        self.br = nn.BatchNorm2d(num_classes, eps=BN_EPS)
        self.conv = _conv_bn_prelu(DECODER_SKIPS[decoder_skip] + num_classes, num_classes, 3)
        self.up_l3 = nn.Sequential(_upsample2x(num_classes))
        self.combine_l2_l3 = nn.Sequential(
            _bn_prelu(2 * num_classes), ESPBlock(2 * num_classes, num_classes, residual=False)
        )
        self.up_l2 = nn.Sequential(_upsample2x(num_classes), _bn_prelu(num_classes))
        self.classifier = _upsample2x(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) float, preprocessed -> (N, C, H, W) logits (no softmax).

        H and W that are not multiples of 8 are edge-padded to the next multiple, then cropped.
        """
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % 8, -width % 8
        # padding by zero is a no-op; padding always keeps the amounts symbolic in ONNX traces
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        feats = self.encoder.encode(x)
        y = self.up_l3(self.br(feats["logits"]))  # 1/4
        y = self.up_l2(self.combine_l2_l3(torch.cat([self.level3_C(feats["b2"]), y], 1)))  # 1/2
        y = self.classifier(self.conv(torch.cat([y, feats[self.decoder_skip]], 1)))  # 1/1
        return y[..., :height, :width]

    @classmethod
    def from_official(cls, path: str | Path) -> ESPNet:
        """Load an authors' decoder checkpoint (variant and class count detected), in eval mode.

        Raises:
            CheckpointError: unreadable file, or not an ESPNet decoder checkpoint.
        """
        state, _ = read_state_dict(path)
        try:
            kwargs, state = convert_official(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        kwargs.pop("class_names", None)
        model = cls(**kwargs)
        load_state_dict_strict(model, state, str(path), "espnet")
        return model.eval()


# class count -> (class names, preprocessing) of the authors' releases
_RELEASES = {
    len(CAMVID_CLASS_NAMES): (CAMVID_CLASS_NAMES, CAMVID_PREPROCESS),
    len(CITYSCAPES_CLASS_NAMES): (CITYSCAPES_CLASS_NAMES, CITYSCAPES_PREPROCESS),
}


def _with_class_names(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Add ``class_names`` (popped by the loader before building) for a known release."""
    release = _RELEASES.get(kwargs["num_classes"])
    return {**kwargs, "class_names": list(release[0])} if release is not None else kwargs


def _strip_module_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix that ``nn.DataParallel`` adds to every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _count_blocks(state: Mapping[str, Tensor], prefix: str) -> int:
    """How many ``<prefix>N.`` blocks the state dict holds."""
    return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})


def convert_official_c(state: Mapping[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The authors' ESPNet-C (encoder) state dict -> (``ESPNetC`` kwargs (+ ``class_names`` for
    a 20-class Cityscapes file), state dict)."""
    state = _strip_module_prefix(state)
    if "classifier.conv.weight" not in state or "level3_0.c1.conv.weight" not in state:
        raise CheckpointError(
            "not an ESPNet-C checkpoint (no 'level3_0.c1.conv.weight' / 'classifier.conv.weight'); "
            "for a full ESPNet file use --model espnet."
        )
    kwargs = {
        "num_classes": int(state["classifier.conv.weight"].shape[0]),
        "p": _count_blocks(state, "level2."),
        "q": _count_blocks(state, "level3."),
    }
    return _with_class_names(kwargs), state


def convert_official(state: Mapping[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The authors' ESPNet decoder state dict -> (``ESPNet`` kwargs, state dict).

    ``num_classes`` and ``decoder_skip`` come from ``conv.conv.weight`` (C, C + 19 | C + 16, 3, 3),
    ``p`` and ``q`` from the number of ``encoder.level2.N`` / ``encoder.level3.N`` blocks;
    ``class_names`` is added for the CamVid (12) and Cityscapes (20) releases.
    """
    state = _strip_module_prefix(state)
    weight = state.get("conv.conv.weight")
    if weight is None or weight.ndim != 4 or "encoder.level3_0.c1.conv.weight" not in state:
        is_encoder = "level1.conv.weight" in state
        hint = " (it looks like ESPNet-C: use --model espnet_c)" if is_encoder else ""
        raise CheckpointError(
            f"not an ESPNet checkpoint: no 'conv.conv.weight' / 'encoder.level3_0...' keys{hint}."
        )
    num_classes, in_ch = int(weight.shape[0]), int(weight.shape[1])
    skips = {ch: name for name, ch in DECODER_SKIPS.items()}
    if in_ch - num_classes not in skips:
        raise CheckpointError(
            f"not a known ESPNet decoder layout: 'conv.conv.weight' has {in_ch} input channels "
            f"for {num_classes} classes (expected {num_classes} + 19 or {num_classes} + 16)."
        )
    kwargs = {
        "num_classes": num_classes,
        "p": _count_blocks(state, "encoder.level2."),
        "q": _count_blocks(state, "encoder.level3."),
        "decoder_skip": skips[in_ch - num_classes],
    }
    return _with_class_names(kwargs), state


def official_preprocess(kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The preprocessing of the authors' release with these kwargs (``Preprocess`` fields).

    12 classes -> CamVid statistics, 20 classes -> Cityscapes statistics (the authors additionally
    resized Cityscapes to 1024x512); anything else -> None (the model's default).
    """
    release = _RELEASES.get(int(kwargs.get("num_classes", 0)))
    return release[1].to_dict() if release is not None else None


@register_model(
    "espnet",
    task="semantic",
    official=OfficialFormat(
        description="sacmehta/ESPNet decoder .pth (CamVid 12 / Cityscapes 20 classes)",
        convert=convert_official,
        preprocess=official_preprocess,
    ),
)
def espnet(num_classes: int = 20, p: int = 2, q: int = 8, decoder_skip: str = "b1") -> ESPNet:
    """ESPNet (p=2, q=8): efficient spatial pyramid encoder + light decoder, 0.36M parameters."""
    return ESPNet(num_classes=num_classes, p=p, q=q, decoder_skip=decoder_skip)


@register_model(
    "espnet_c",
    task="semantic",
    official=OfficialFormat(
        description="sacmehta/ESPNet encoder .pth (ESPNet-C, Cityscapes 20 classes)",
        convert=convert_official_c,
        preprocess=official_preprocess,
    ),
)
def espnet_c(num_classes: int = 20, p: int = 2, q: int = 8) -> ESPNetC:
    """ESPNet-C: the ESPNet encoder alone, 1/8-resolution logits upsampled bilinearly."""
    return ESPNetC(num_classes=num_classes, p=p, q=q)

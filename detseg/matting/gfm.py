"""GFM: Glance and Focus Matting (Li et al., "Bridging Composite and Real", IJCV 2022).

One shared encoder, a glance decoder predicting a 3-class (TT) or 2-class (FT/BT) semantic map,
a focus decoder predicting alpha detail, and the collaborative merge of the two. The RIM variant
runs the three representations side by side and fuses them with a small SE-gated head.

Module and key names follow the official ``JizhiziLi/GFM`` ``core/gfm.py`` so its ``.pth`` files
load strictly: the torchvision trunk is stored whole as ``resnet``/``densenet`` and the
``encoder0..6`` stages are the *same* module objects registered a second time (the state dict lists
them twice; on loading the ``encoder*`` copy is written last and wins, as in the official model).

The network takes raw RGB values in [0, 255] (no mean/std normalisation) of a size that is a
multiple of 32. Test-time strategies (plain resize and the official hybrid multi-scale one) live
in ``detseg.matting.gfm_infer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import densenet121, resnet34, resnet101
from torchvision.models.resnet import BasicBlock

from detseg.engine.export import OnnxSpec
from detseg.errors import CheckpointError
from detseg.ops.adaptive_pool import AdaptiveAvgPool2d
from detseg.registry import OfficialFormat, register_model

BACKBONES = ("r34", "r34_2b", "d121", "r101")
ROSTAS = ("TT", "FT", "BT", "RIM")
GLANCE_CHANNELS = {"TT": 3, "FT": 2, "BT": 2}
# GFM sees raw RGB values in 0..255 (no mean/std), in training and at test time.
RAW_RGB = {
    "channel_order": "RGB",
    "mean": (0.0, 0.0, 0.0),
    "std": (1.0, 1.0, 1.0),
    "post_scale": 1.0,
}


def _conv_bn_relu(cin: int, cout: int, dilation: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


def conv_up_psp(cin: int, cout: int, scale: int) -> nn.Sequential:
    """conv3 - BN - ReLU - bilinear x``scale`` (lifts the PSP map to a decoder scale)."""
    return nn.Sequential(
        *_conv_bn_relu(cin, cout), nn.Upsample(scale_factor=scale, mode="bilinear")
    )


def bridge_block(cin: int, cmid: int, cout: int) -> nn.Sequential:
    """Three dilated (2) conv3 - BN - ReLU layers: cin -> cmid -> cout -> cout."""
    return nn.Sequential(
        *_conv_bn_relu(cin, cmid, 2), *_conv_bn_relu(cmid, cout, 2), *_conv_bn_relu(cout, cout, 2)
    )


def decoder_block(
    cin: int,
    m1: int,
    m2: int,
    cout: int,
    last_bnrelu: bool = True,
    upsample: bool = True,
    dilation: int = 1,
) -> nn.Sequential:
    """conv3-BN-ReLU, conv3-BN-ReLU, conv3 [-BN-ReLU] [- bilinear x2].

    ``dilation`` applies to the second and third convolutions (GFM-2020's ``decoder6``).
    """
    layers = [*_conv_bn_relu(cin, m1), *_conv_bn_relu(m1, m2, dilation)]
    layers.append(nn.Conv2d(m2, cout, 3, padding=dilation, dilation=dilation))
    if last_bnrelu:
        layers += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if upsample:
        layers.append(nn.Upsample(scale_factor=2, mode="bilinear"))
    return nn.Sequential(*layers)


class PSPModule(nn.Module):
    """Pyramid pooling: pooled 1x1 projections at ``sizes``, resized back, concat with input, 1x1."""

    def __init__(self, channels: int, out_channels: int, sizes: Sequence[int] = (1, 3, 5)) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(AdaptiveAvgPool2d((s, s)), nn.Conv2d(channels, channels, 1, bias=False))
            for s in sizes
        )
        self.bottleneck = nn.Conv2d(channels * (len(sizes) + 1), out_channels, 1)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, h, w) -> (N, out_channels, h, w)."""
        size = x.shape[-2:]
        # The official module resizes the pooled maps with align_corners=True.
        pyramid = [
            F.interpolate(stage(x), size=size, mode="bilinear", align_corners=True)
            for stage in self.stages
        ]
        return self.relu(self.bottleneck(torch.cat([*pyramid, x], 1)))


class SELayer(nn.Module):
    """Squeeze-and-excitation channel gate (no biases)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> same shape, each channel scaled by its gate in (0, 1)."""
        gate = self.fc(self.avg_pool(x).flatten(1))
        return x * gate[:, :, None, None]


def _unshare_trunk_entries(
    module: nn.Module, state: dict[str, Tensor], prefix: str, local_metadata: Any
) -> None:
    # The trunk and encoder* entries alias the same tensors; safetensors refuses shared memory,
    # so the trunk-named copies in a state dict are clones (equal values, loaded first).
    for key in state:
        if key.startswith((f"{prefix}resnet.", f"{prefix}densenet.")):
            state[key] = state[key].clone()


def collaborative_matting(rosta: str, glance: Tensor, focus: Tensor) -> Tensor:
    """Merge glance (N, gd, H, W) and focus (N, 1, H, W) into alpha (N, 1, H, W) in [0, 1].

    TT: background 0, foreground 1, transition -> focus. BT: class 1 = dilated region, alpha =
    class - focus (clamped at 0). FT: class 1 = eroded foreground, alpha = class + focus (clamped
    at 1). Not differentiable w.r.t. ``glance`` (channel argmax, ties to the lowest index).
    """
    index = glance.argmax(dim=1, keepdim=True).to(focus.dtype)
    if rosta == "TT":
        return focus * (index == 1).to(focus.dtype) + (index == 2).to(focus.dtype)
    if rosta == "BT":
        return (index - focus).clamp(min=0.0)
    return (index + focus).clamp(max=1.0)


@dataclass(frozen=True)
class _Layout:
    """Channel plan of one backbone: PSP side branches and decoder (in, m1, m2, out) widths."""

    top: int
    psp: tuple[tuple[int, int], ...]  # (out channels, upsampling factor), deepest first
    glance: tuple[tuple[int, int, int, int], ...]
    focus: tuple[tuple[int, int, int, int], ...]
    head_in: int


_R34_DEC = ((1024, 512, 512, 256), (512, 256, 256, 128), (256, 128, 128, 64), (128, 64, 64, 64))
_R101_DEC = (
    (4096, 2048, 1024, 1024),
    (2048, 1024, 512, 512),
    (1024, 512, 256, 256),
    (512, 256, 128, 64),
)
_R2B_DEC = ((1024, 512, 512, 512), (1024, 512, 512, 512), *_R34_DEC)
_LAYOUTS = {
    "r34": _Layout(512, ((256, 2), (128, 4), (64, 8), (64, 16)), _R34_DEC, _R34_DEC, 128),
    "d121": _Layout(
        512,
        ((256, 2), (128, 4), (64, 8), (64, 16)),
        _R34_DEC,
        ((1024, 512, 512, 256), (768, 256, 256, 128), (384, 128, 128, 64), (192, 64, 64, 64)),
        128,
    ),
    "r101": _Layout(2048, ((1024, 2), (512, 4), (256, 8), (64, 16)), _R101_DEC, _R101_DEC, 128),
    # psp1 is built but never used by the official r34_2b network.
    "r34_2b": _Layout(
        512, ((512, 2), (512, 4), (256, 8), (128, 16), (64, 32), (64, 32)), _R2B_DEC, _R2B_DEC, 64
    ),
}


def _resnet_stages(net: nn.Module) -> list[nn.Module]:
    return [
        nn.Sequential(net.conv1, net.bn1, nn.ReLU(inplace=True)),
        nn.Sequential(net.maxpool, net.layer1),
        net.layer2,
        net.layer3,
        net.layer4,
    ]


def _two_block_stages(net: nn.Module) -> list[nn.Module]:
    def extra() -> nn.Sequential:
        blocks = [BasicBlock(512, 512) for _ in range(3)]
        return nn.Sequential(nn.MaxPool2d(2, 2, ceil_mode=True), *blocks)

    stem = nn.Sequential(*_conv_bn_relu(3, 64))
    return [stem, net.layer1, net.layer2, net.layer3, net.layer4, extra(), extra()]


def _densenet_stages(net: nn.Module) -> list[nn.Module]:
    f = net.features
    top = nn.Sequential(
        f.denseblock4, *_conv_bn_relu(1024, 512), nn.MaxPool2d(2, 2, ceil_mode=True)
    )
    return [
        nn.Sequential(f.conv0, f.norm0, nn.ReLU(inplace=True)),
        nn.Sequential(f.denseblock1, f.transition1),
        nn.Sequential(f.denseblock2, f.transition2),
        nn.Sequential(f.denseblock3, f.transition3),
        top,
    ]


class GFM(nn.Module):
    """Glance and Focus Matting network.

    Args:
        backbone: shared encoder, one of ``"r34"`` (paper default), ``"r34_2b"`` (ResNet-34 plus
            two extra BasicBlock stages, full-resolution stem), ``"d121"``, ``"r101"``.
        rosta: representation of semantic and transition areas: ``"TT"`` (trimap glance),
            ``"FT"`` (eroded foreground + focus outside it), ``"BT"`` (dilated region - focus), or
            ``"RIM"`` (all three plus the integration module).
        decoder6_dilation: dilation of the 2nd/3rd convs of r34_2b's ``decoder6_{g,f}``: 1 in
            the current official code, 2 in the 2020 release (same keys, different maths).

    ``forward(x)``, x (N, 3, H, W) float raw RGB in [0, 255], H and W multiples of 32, returns
    ``(glance, focus, fusion)``: (N, gd, H, W) sigmoid maps (gd = 3 for TT, 2 for FT/BT),
    (N, 1, H, W) in (0, 1), (N, 1, H, W) in [0, 1]. RIM returns the flat tuple ``glance_tt,
    focus_tt, fusion_tt, glance_ft, focus_ft, fusion_ft, glance_bt, focus_bt, fusion_bt,
    fusion_rim`` where ``fusion_rim`` (N, 1, H, W) is unbounded (no sigmoid, as official).
    """

    def __init__(
        self, backbone: str = "r34", rosta: str = "TT", decoder6_dilation: int = 1
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES or rosta not in ROSTAS:
            raise ValueError(
                f"GFM backbone in {BACKBONES}, rosta in {ROSTAS}; got {backbone!r}, {rosta!r}"
            )
        self.backbone, self.rosta = backbone, rosta
        stages = self._build_encoder(backbone)
        self.register_state_dict_post_hook(_unshare_trunk_entries)
        for i, stage in enumerate(stages):
            self.add_module(f"encoder{i}", stage)
        self.num_stages = len(stages)
        layout = _LAYOUTS[backbone]
        top, two_block = layout.top, backbone == "r34_2b"
        self.psp_module = PSPModule(top, top, (1, 3, 5))
        for i, (cout, scale) in enumerate(layout.psp):
            self.add_module(f"psp{len(layout.psp) - i}", conv_up_psp(top, cout, scale))
        self._add_decoders("g", layout.glance, two_block, decoder6_dilation)
        self.bridge_block = bridge_block(top, top, top)
        self._add_decoders("f", layout.focus, two_block, decoder6_dilation)
        if rosta != "RIM":
            self.decoder0_g = self._head(layout.head_in, GLANCE_CHANNELS[rosta], two_block)
            self.decoder0_f = self._head(layout.head_in, 1, two_block)
            return
        for name in ("tt", "ft", "bt"):
            glance = self._head(layout.head_in, GLANCE_CHANNELS[name.upper()], two_block)
            self.add_module(f"decoder0_g_{name}", glance)
        for name in ("tt", "ft", "bt"):
            self.add_module(f"decoder0_f_{name}", self._head(layout.head_in, 1, two_block))
        self.rim = nn.Sequential(nn.Conv2d(3, 16, 1), SELayer(16), nn.Conv2d(16, 1, 1))

    def _add_decoders(
        self, branch: str, widths: Sequence[tuple[int, int, int, int]], two_block: bool, dil6: int
    ) -> None:
        """``decoder{L}_{branch}`` for L = len(widths)..1 (r34_2b: no upsampling at level 1)."""
        for i, (cin, m1, m2, cout) in enumerate(widths):
            level = len(widths) - i
            block = decoder_block(
                cin,
                m1,
                m2,
                cout,
                upsample=not (two_block and level == 1),
                dilation=dil6 if level == 6 else 1,
            )
            self.add_module(f"decoder{level}_{branch}", block)

    def _build_encoder(self, backbone: str) -> list[nn.Module]:
        # The official model keeps the whole torchvision trunk (its keys are part of the format).
        if backbone == "d121":
            self.densenet = densenet121(weights=None)
            return _densenet_stages(self.densenet)
        self.resnet = resnet101(weights=None) if backbone == "r101" else resnet34(weights=None)
        if backbone == "r34_2b":
            return _two_block_stages(self.resnet)
        return _resnet_stages(self.resnet)

    @staticmethod
    def _head(cin: int, cout: int, single_conv: bool) -> nn.Sequential:
        if single_conv:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1))
        return decoder_block(cin, 64, 64, cout, last_bnrelu=False)

    def _encode(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i in range(self.num_stages):
            x = getattr(self, f"encoder{i}")(x)
            feats.append(x)
        return feats

    def _glance_features(self, top: Tensor) -> Tensor:
        psp = self.psp_module(top)
        levels = self.num_stages - 1
        x = getattr(self, f"decoder{levels}_g")(torch.cat([psp, top], 1))
        for level in range(levels - 1, 0, -1):
            x = getattr(self, f"decoder{level}_g")(
                torch.cat([getattr(self, f"psp{level + 1}")(psp), x], 1)
            )
        if self.backbone == "r34_2b":
            return x
        return torch.cat([self.psp1(psp), x], 1)

    def _focus_features(self, feats: list[Tensor]) -> Tensor:
        levels = self.num_stages - 1
        x = self.bridge_block(feats[-1])
        for level in range(levels, 0, -1):
            x = getattr(self, f"decoder{level}_f")(torch.cat([x, feats[level]], 1))
        if self.backbone == "r34_2b":
            return x
        return torch.cat([x, feats[0]], 1)

    def onnx_spec(self) -> OnnxSpec:
        """The whole network; inputs are multiples of 32 (what the test-time resizing feeds)."""
        return OnnxSpec(
            size_multiple=32,
            note="whole network; test-time resizing and the hybrid merge beside",
        )

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """See the class docstring for shapes; returns tensors only (exportable)."""
        feats = self._encode(x)
        g_in = self._glance_features(feats[-1])
        f_in = self._focus_features(feats)
        if self.rosta != "RIM":
            glance = torch.sigmoid(self.decoder0_g(g_in))
            focus = torch.sigmoid(self.decoder0_f(f_in))
            return glance, focus, collaborative_matting(self.rosta, glance, focus)
        outputs: list[Tensor] = []
        for name in ("tt", "ft", "bt"):
            glance = torch.sigmoid(getattr(self, f"decoder0_g_{name}")(g_in))
            focus = torch.sigmoid(getattr(self, f"decoder0_f_{name}")(f_in))
            outputs += [glance, focus, collaborative_matting(name.upper(), glance, focus)]
        outputs.append(self.rim(torch.cat(outputs[2::3], 1)))
        return tuple(outputs)

    @classmethod
    def from_official(cls, path: str | Path, **kwargs: Any) -> GFM:
        """Build and strictly load an official GFM ``.pth`` (``backbone``/``rosta`` inferred)."""
        # Imported here: building the network needs no checkpoint I/O (safetensors) stack.
        from detseg.checkpoint import load_state_dict_strict, read_state_dict

        state, _ = read_state_dict(path)
        found, state = convert_official(state)
        found.update(kwargs)
        model = cls(**found)
        load_state_dict_strict(model, state, str(path), f"GFM({found})")
        return model


def _infer_kwargs(state: dict[str, Tensor]) -> dict[str, Any]:
    if "densenet.features.conv0.weight" in state:
        backbone = "d121"
    elif "encoder6.1.conv1.weight" in state:
        backbone = "r34_2b"
    elif "resnet.layer3.22.conv1.weight" in state:
        backbone = "r101"
    elif "resnet.layer1.0.conv1.weight" in state:
        backbone = "r34"
    else:
        raise CheckpointError("not a GFM checkpoint: no resnet.* / densenet.* backbone keys found.")
    if "rim.0.weight" in state:
        return {"backbone": backbone, "rosta": "RIM"}
    head = state.get("decoder0_g.6.weight", state.get("decoder0_g.0.weight"))
    if head is None:
        raise CheckpointError("not a GFM checkpoint: no glance head (decoder0_g.*) found.")
    # FT and BT share keys and shapes; FT is the default for a 2-channel glance head.
    return {"backbone": backbone, "rosta": "TT" if head.shape[0] == 3 else "FT"}


def convert_official(state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Official GFM state dict -> (GFM kwargs, detseg state dict, same key names).

    The official files are plain state dicts holding both the backbone-named and the ``encoder*``
    copy of every shared tensor, which is exactly our key set; only a ``module.`` prefix is
    stripped defensively. FT and BT checkpoints are indistinguishable by keys (FT is inferred):
    pass ``rosta="BT"`` explicitly.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    kwargs = _infer_kwargs(state)
    return kwargs, state


def _official(backbone: str, rosta: str) -> OfficialFormat:
    def convert(state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        kwargs, converted = convert_official(dict(state))
        if kwargs["rosta"] == "FT" and rosta in ("FT", "BT"):
            kwargs["rosta"] = rosta
        return kwargs, converted

    return OfficialFormat(
        f"JizhiziLi/GFM models/pretrained/gfm_{backbone}_{rosta.lower()}.pth (raw RGB 0..255 input)",
        convert,
        preprocess=lambda kwargs: dict(RAW_RGB),
    )


def _register(name: str, backbone: str, rosta: str, summary: str) -> None:
    def build(**kwargs: Any) -> GFM:
        return GFM(**{"backbone": backbone, "rosta": rosta, **kwargs})

    build.__doc__ = summary
    register_model(
        name,
        task="matting",
        summary=summary,
        defaults={"backbone": backbone, "rosta": rosta},
        official=_official(backbone, rosta),
    )(build)


for _backbone, _rosta in (
    ("r34", "TT"),
    ("r34", "FT"),
    ("r34", "BT"),
    ("r34_2b", "TT"),
    ("d121", "TT"),
    ("r101", "TT"),
    ("d121", "RIM"),
):
    _register(
        f"gfm_{_backbone}" + ("" if _rosta == "TT" else f"_{_rosta.lower()}"),
        _backbone,
        _rosta,
        f"GFM glance-and-focus matting, {_backbone} encoder, {_rosta} representation (trimap-free)",
    )

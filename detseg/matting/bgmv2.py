"""BackgroundMattingV2 (Lin et al., CVPR 2021): matting from a photo and a clean background plate.

``MattingBase`` is an encoder (ResNet-50/101 or MobileNetV2 on the 6-channel src+bgr input), an ASPP
and a decoder predicting alpha, a foreground residual, an error map and 32 hidden channels.
``MattingRefine`` runs that base on a downsampled pair and recomputes, at full resolution, only the
4x4 cells where the predicted error is high. Module and parameter names are those of the official
checkpoints (``backbone.conv1`` / ``backbone.features.N``, ``aspp.convs.N``, ``decoder.convN``,
``refiner.convN``) so their ``.pth`` state dicts load strictly. Behaviour follows
``shared/specs/bgmv2.md``; every resize is bilinear with ``align_corners=False`` as in the official
model, except the refiner's 2x upsamples, which are nearest.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import MobileNetV2
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.segmentation.deeplabv3 import ASPP

from detseg.checkpoint import load_state_dict_strict, read_state_dict
from detseg.errors import CheckpointError
from detseg.matting.bgmv2_windows import (
    ConvWindows,
    group_tiles,
    halve,
    nearest2x_beside,
    paste_cells_,
    resized_crop,
    shrink,
    tile_keys,
)
from detseg.registry import OfficialFormat, register_model

BACKBONES = ("resnet50", "resnet101", "mobilenetv2")
REFINE_MODES = ("full", "sampling", "thresholding")
_RESNET_BLOCKS = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}
_ASPP_RATES = (3, 6, 9)
_DECODER_CHANNELS = (256, 128, 64, 48, 37)
_SKIP_CHANNELS = {"resnet": (512, 256, 64, 6), "mobilenetv2": (32, 24, 16, 6)}


def _resize(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ResNetEncoder(ResNet):
    """torchvision ResNet (v1.5) with a 6-channel stem and a dilated layer4 (output stride 16).

    ``forward(x)`` with x (B, 6, H, W) returns ``(x4, x3, x2, x1, x0)``: 2048 ch at 1/16, 512 at
    1/8, 256 at 1/4, 64 at 1/2 and the input itself (sizes are ceil-halvings).
    """

    def __init__(self, variant: str, in_channels: int = 6) -> None:
        super().__init__(
            Bottleneck, _RESNET_BLOCKS[variant], replace_stride_with_dilation=[False, False, True]
        )
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        del self.avgpool
        del self.fc

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        x0 = x
        x1 = self.relu(self.bn1(self.conv1(x0)))
        x2 = self.layer1(self.maxpool(x1))
        x3 = self.layer2(x2)
        x4 = self.layer4(self.layer3(x3))
        return x4, x3, x2, x1, x0


class MobileNetV2Encoder(MobileNetV2):
    """torchvision MobileNetV2 ``features[0..17]`` with a 6-channel stem and output stride 16.

    ``features[14]``'s depthwise conv gets stride 1; those of ``features[15..17]`` dilation 2.
    ``forward(x)`` returns ``(x4, x3, x2, x1, x0)``: 320 ch at 1/16, 32 at 1/8, 24 at 1/4, 16 at
    1/2 and the input.
    """

    def __init__(self, in_channels: int = 6) -> None:
        super().__init__()
        self.features[0][0] = nn.Conv2d(in_channels, 32, 3, stride=2, padding=1, bias=False)
        del self.features[18]
        del self.classifier
        self.features[14].conv[1][0].stride = (1, 1)
        for i in (15, 16, 17):
            depthwise = self.features[i].conv[1][0]
            depthwise.dilation = (2, 2)
            depthwise.padding = (2, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        f = self.features
        x0 = x
        x1 = f[1](f[0](x0))
        x2 = f[3](f[2](x1))
        x3 = f[6](f[5](f[4](x2)))
        x4 = f[7:18](x3)
        return x4, x3, x2, x1, x0


class Decoder(nn.Module):
    """Four upsample-concat-conv stages from the ASPP output back to the input resolution.

    Each stage resizes to its skip's exact size and concatenates [upsampled, skip]; the last skip is
    the raw 6-channel input and its conv (with bias) outputs the 37 raw channels.

    ``fast_inference`` (set by ``detseg.engine.fast``): in eval, the last stage convolves the two
    parts separately and adds (the same sum, without concatenating two full-size maps).
    """

    fast_inference = False

    def __init__(
        self,
        channels: tuple[int, ...] = _DECODER_CHANNELS,
        feature_channels: tuple[int, ...] = _SKIP_CHANNELS["resnet"],
    ) -> None:
        super().__init__()
        c, f = channels, feature_channels
        self.conv1 = nn.Conv2d(c[0] + f[0], c[1], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[1])
        self.conv2 = nn.Conv2d(c[1] + f[1], c[2], 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c[2])
        self.conv3 = nn.Conv2d(c[2] + f[2], c[3], 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c[3])
        self.conv4 = nn.Conv2d(c[3] + f[3], c[4], 3, padding=1, bias=True)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x4: Tensor, x3: Tensor, x2: Tensor, x1: Tensor, x0: Tensor) -> Tensor:
        """x4 (B, 256, 1/16) and the encoder skips -> (B, 37, H, W) raw decoder output."""
        x = self.last_input(x4, x3, x2, x1)
        if self.fast_inference and not self.training:
            return self.last_conv(_resize(x, x0.shape[-2:]), x0, slice(None))
        return self.conv4(torch.cat([_resize(x, x0.shape[-2:]), x0], dim=1))

    def last_input(self, x4: Tensor, x3: Tensor, x2: Tensor, x1: Tensor) -> Tensor:
        """The first three stages: (B, 48, H/2, W/2), what the last stage upsamples."""
        x = x4
        for conv, bn, skip in (
            (self.conv1, self.bn1, x3),
            (self.conv2, self.bn2, x2),
            (self.conv3, self.bn3, x1),
        ):
            x = torch.cat([_resize(x, skip.shape[-2:]), skip], dim=1)
            x = self.relu(bn(conv(x)))
        return x

    def last_conv(self, x: Tensor, x0: Tensor, channels: slice) -> Tensor:
        """Output ``channels`` of ``conv4`` on ``cat([x, x0])``, as two convolutions summed."""
        weight, bias = self.conv4.weight[channels], self.conv4.bias[channels]
        out = F.conv2d(x, weight[:, : x.shape[1]], bias, padding=1)
        return out.add_(F.conv2d(x0, weight[:, x.shape[1] :], padding=1))


class MattingBase(nn.Module):
    """Encoder + ASPP (rates 3, 6, 9) + decoder on ``concat(src, bgr)``, at the input resolution.

    Args:
        backbone: ``"resnet50"``, ``"resnet101"`` or ``"mobilenetv2"``.

    ``forward(src, bgr)``, both (B, 3, H, W) RGB in [0, 1] (no normalisation, any H, W), returns
    ``(pha (B,1,H,W) in [0,1], fgr (B,3,H,W) in [0,1], err (B,1,H,W) in [0,1], hid (B,32,H,W) >= 0)``.
    """

    def __init__(self, backbone: str) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, not {backbone!r}")
        self.backbone_name = backbone
        if backbone == "mobilenetv2":
            self.backbone: nn.Module = MobileNetV2Encoder(in_channels=6)
            aspp_in, skips = 320, _SKIP_CHANNELS["mobilenetv2"]
        else:
            self.backbone = ResNetEncoder(backbone, in_channels=6)
            aspp_in, skips = 2048, _SKIP_CHANNELS["resnet"]
        self.aspp = ASPP(aspp_in, list(_ASPP_RATES))
        self.decoder = Decoder(_DECODER_CHANNELS, skips)

    def _decode(self, src: Tensor, bgr: Tensor) -> Tensor:
        """(B, 3, h, w) pair -> (B, 37, h, w) raw channels [alpha, fgr residual (3), err, hidden (32)]."""
        x4, x3, x2, x1, x0 = self._encode(src, bgr)
        return self.decoder(self.aspp(x4), x3, x2, x1, x0)

    def _encode(self, src: Tensor, bgr: Tensor) -> tuple[Tensor, ...]:
        """(B, 3, h, w) pair -> the backbone's ``(x4, x3, x2, x1, x0)``."""
        x = torch.cat([src, bgr], dim=1)
        if _channels_last_weights(self.backbone):  # the fast path's layout (``engine.fast``): the
            # decoder's last stage then reads channels-last maps, without a layout copy
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def forward(self, src: Tensor, bgr: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        d = self._decode(src, bgr)
        pha = d[:, 0:1].clamp(0.0, 1.0)
        fgr = (d[:, 1:4] + src).clamp(0.0, 1.0)
        err = d[:, 4:5].clamp(0.0, 1.0)
        hid = d[:, 5:].relu()
        return pha, fgr, err, hid

    def onnx_spec(self) -> Any:
        """What ``detseg export`` writes: see ``detseg.matting.bgmv2_export.bgmv2_spec``."""
        from detseg.matting.bgmv2_export import bgmv2_spec

        return bgmv2_spec(self)

    @classmethod
    def from_official(cls, path: str | Path, **kwargs: Any) -> MattingBase:
        """Load an official ``.pth`` state dict (MattingBase or MattingRefine; the refiner is ignored).

        The backbone is read from the file; ``kwargs`` are further constructor arguments.
        Raises ``CheckpointError`` when the file is not a BackgroundMattingV2 checkpoint.
        """
        state, _ = read_state_dict(path)
        config = official_config(state, str(path))
        state = {
            k: v for k, v in _strip_module_prefix(state).items() if not k.startswith("refiner.")
        }
        model = cls(config["backbone"], **kwargs)
        load_state_dict_strict(model, state, str(path), cls.__name__)
        return model


def _crop(x: Tensor, cells: Tensor, size: int, pad: int) -> Tensor:
    """Windows of ``x`` around cells: (B, C, h, w) -> (P, C, size + 2*pad, size + 2*pad).

    ``cells`` (P, 3) int64 rows (b, i, j): the window covers rows [i*size - pad, (i+1)*size + pad)
    and the matching columns, zeros outside the image: what cropping a zero-padded copy gives,
    without making the copy (indices are clamped, the outside masked).
    """
    h, w = x.shape[-2:]
    offsets = torch.arange(-pad, size + pad, device=x.device)
    rows = cells[:, 1:2] * size + offsets  # (P, win)
    cols = cells[:, 2:3] * size + offsets
    batch = cells[:, 0, None, None]
    patches = x.permute(0, 2, 3, 1)[
        batch, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]
    ]  # (P, win, win, C)
    if pad:
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        patches = patches * inside[..., None].to(patches.dtype)
    return patches.permute(0, 3, 1, 2)


def _paste(x: Tensor, cells: Tensor, patches: Tensor) -> Tensor:
    """Replace 4x4 blocks of ``x`` (B, C, H, W): block (b, i, j) of ``cells`` gets ``patches`` (P, C, 4, 4)."""
    b, c, h, w = x.shape
    blocks = x.reshape(b, c, h // 4, 4, w // 4, 4).permute(0, 2, 4, 1, 3, 5)  # (B, Hq, Wq, C, 4, 4)
    blocks = blocks.index_put((cells[:, 0], cells[:, 1], cells[:, 2]), patches)
    return blocks.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _channels_last_weights(module: nn.Module) -> bool:
    """Whether the first 4-D weight of ``module`` is stored channels-last (and not also NCHW)."""
    weight = next(p for p in module.parameters() if p.dim() == 4)
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


class Refiner(nn.Module):
    """Recomputes alpha and the foreground residual at full resolution, everywhere or in 4x4 cells.

    Args:
        mode: ``"full"`` (every pixel), ``"sampling"`` (the ``sample_pixels // 16`` cells of largest
            error per image) or ``"thresholding"`` (cells with error > ``threshold``).
        sample_pixels: sampling mode budget in full-resolution pixels.
        threshold: thresholding mode cut-off (strict ``>``).
        kernel_size: 1 or 3 (convolutions are unpadded; crops carry the context instead).
        prevent_oversampling: sampling mode: drop selected cells whose error is exactly 0.

    ``fast_inference`` (an attribute, False by default; ``detseg.engine.fast`` sets it): in eval,
    the sampling and thresholding modes run on square tiles of ``t`` x ``t`` selected cells
    (``t`` from ``tile_sizes``, whichever costs the convolutions least), resize only the windows
    around those tiles (``resized_crop``), about ``chunk`` cells' worth of windows at a time,
    and paste the selected cells in place: the same outputs up to float rounding, without the
    full-resolution temporaries.
    """

    fast_inference = False
    chunk = 2048
    tile_sizes: tuple[int, ...] = (1, 2, 4, 8)

    def __init__(
        self,
        mode: str,
        sample_pixels: int,
        threshold: float,
        kernel_size: int = 3,
        prevent_oversampling: bool = True,
    ) -> None:
        super().__init__()
        if mode not in REFINE_MODES:
            raise ValueError(f"refine_mode must be one of {REFINE_MODES}, not {mode!r}")
        if kernel_size not in (1, 3):
            raise ValueError(f"refine_kernel_size must be 1 or 3, not {kernel_size}")
        self.mode = mode
        self.sample_pixels = sample_pixels
        self.threshold = threshold
        self.kernel_size = kernel_size
        self.prevent_oversampling = prevent_oversampling
        k = kernel_size
        self.conv1 = nn.Conv2d(32 + 4 + 6, 24, k, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 16, k, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16 + 6, 12, k, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.conv4 = nn.Conv2d(12, 4, k, bias=True)
        self.relu = nn.ReLU(inplace=True)

    @property
    def on_windows(self) -> bool:
        """Whether ``forward`` takes the fast cell path (``_refine_fast``)."""
        return self.fast_inference and self.mode != "full" and not self.training

    @property
    def _pads(self) -> tuple[int, int]:
        """Context of the two stages' windows: 3 half-resolution, 2 full-resolution pixels for
        3x3 kernels (two unpadded convolutions each), none for 1x1."""
        return (3, 2) if self.kernel_size == 3 else (0, 0)

    def _stage1(self, x: Tensor) -> Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))

    def _stage2(self, x: Tensor) -> Tensor:
        return self.conv4(self.relu(self.bn3(self.conv3(x))))

    def select(self, err: Tensor) -> Tensor:
        """err (B, 1, Hq, Wq) -> (B, 1, Hq, Wq) 0/1 mask of the cells to refine (err's dtype).

        Sampling asks for at most Hq*Wq cells (the official code raises instead when
        ``sample_pixels // 16`` exceeds the cell count; selecting every cell is what it would mean).
        """
        if self.mode == "thresholding":
            return (err > self.threshold).to(err.dtype)
        b, _, hq, wq = err.shape
        flat = err.reshape(b, hq * wq)
        k = min(self.sample_pixels // 16, hq * wq)
        top = flat.topk(k, dim=1, sorted=False).indices
        ref = torch.zeros_like(flat).scatter(1, top, 1.0).reshape_as(err)
        if self.prevent_oversampling:
            ref = ref * (err > 0).to(err.dtype)
        return ref

    def forward(
        self,
        src: Tensor,
        bgr: Tensor,
        pha: Tensor,
        fgr: Tensor,
        err: Tensor,
        hid: Tensor | ConvWindows,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Refine a coarse prediction.

        Args:
            src, bgr: (B, 3, H, W) full resolution, H and W multiples of 4.
            pha, fgr, err, hid: coarse (B, 1|3|1|32, Hc, Wc) clamped alpha, *unclamped* foreground
                residual, clamped error and ReLU'd hidden features (in the fast path, from
                ``MattingRefine``, ``hid`` may be a ``ConvWindows``: computed on demand).

        Returns:
            (pha (B, 1, H, W) unclamped, fgr residual (B, 3, H, W), ref (B, 1, H/4, W/4) 0/1).
        """
        h, w = src.shape[-2:]
        half, quarter = (h // 2, w // 2), (h // 4, w // 4)
        if self.on_windows:
            # a resize to the same size is the identity (the HD setting's coarse map is H/4)
            ref = self.select(err if err.shape[-2:] == quarter else _resize(err, quarter))
            return (*self._refine_fast(src, bgr, pha, fgr, hid, ref), ref)
        src_bgr = torch.cat([src, bgr], dim=1)
        x = _resize(torch.cat([hid, pha, fgr], dim=1), half)
        y = _resize(src_bgr, half)
        if self.mode == "full":
            out = self._refine_full(x, y, src_bgr)
            ref = torch.ones((src.shape[0], 1, *quarter), dtype=src.dtype, device=src.device)
        else:
            ref = self.select(_resize(err, quarter))
            cells = torch.nonzero(ref.squeeze(1))  # (P, 3) rows (b, i, j), row-major
            out = _resize(torch.cat([pha, fgr], dim=1), (h, w))
            if not self.training or cells.shape[0] > 0:
                # In eval an empty selection runs through as empty tensors (a static graph for
                # export); training BatchNorm cannot take an empty batch.
                out = _paste(out, cells, self._refine_cells(x, y, src_bgr, cells))
        return out[:, 0:1], out[:, 1:4], ref

    def _refine_full(self, x: Tensor, y: Tensor, src_bgr: Tensor) -> Tensor:
        p, q = self._pads
        x = self._stage1(F.pad(torch.cat([x, y], dim=1), (p, p, p, p)))
        h, w = src_bgr.shape[-2:]
        x = F.interpolate(x, size=(h + 2 * q, w + 2 * q), mode="nearest")
        return self._stage2(torch.cat([x, F.pad(src_bgr, (q, q, q, q))], dim=1))

    def _refine_cells(self, x: Tensor, y: Tensor, src_bgr: Tensor, cells: Tensor) -> Tensor:
        """(P, 4, 4, 4) refined [alpha, fgr residual] for each cell (b, i, j) of ``cells``."""
        p, q = self._pads
        x = self._stage1(torch.cat([_crop(x, cells, 2, p), _crop(y, cells, 2, p)], dim=1))
        x = F.interpolate(x, size=(4 + 2 * q, 4 + 2 * q), mode="nearest")
        return self._stage2(torch.cat([x, _crop(src_bgr, cells, 4, q)], dim=1))

    def _refine_fast(
        self,
        src: Tensor,
        bgr: Tensor,
        pha: Tensor,
        fgr: Tensor,
        hid: Tensor | ConvWindows,
        ref: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """``forward``'s cell path on tiles, same arguments -> (pha, fgr residual) at (H, W).

        The selected cells are grouped into square tiles of ``t`` x ``t`` cells (``_tile_size``)
        and the refiner runs densely on each tile's window: a cell's output depends only on
        the window around it, so it is the same whichever tile computes it, while neighbouring
        cells share the overlap of their windows instead of each recomputing it (``t = 1`` is
        the per-cell computation of ``forward``). Only the selected cells are pasted.
        """
        h, w = src.shape[-2:]
        p, q = self._pads
        # NCHW photo and plate once, not per chunk (their windows are read from the planes;
        # callers may pass channels-last frames or a plate expanded over the batch)
        src, bgr = src.contiguous(), bgr.contiguous()
        coarse = (hid, pha, fgr)  # gathered window by window: never concatenated whole
        # the full-resolution maps NCHW (fastest) and float32: under bfloat16 autocast a
        # bfloat16 resize, foreground add and final cast of the 4K maps had cost more than the
        # refiner's convolutions gained (4K bf16 196-222 ms against 192-203 in float32; 146-164
        # with float32 maps)
        pha_out, fgr_out = (_resize(t.float().contiguous(), (h, w)) for t in (pha, fgr))
        cells = torch.nonzero(ref.squeeze(1))  # (P, 3) rows (b, i, j)
        t = self._tile_size(cells, ref.shape[-2:])
        tiles, cells, first = group_tiles(cells, ref.shape[-2:], t)
        if isinstance(hid, ConvWindows):  # a window's side on the coarse map, resize taps included
            side = -(-(2 * t + 2 * p) * hid.shape[-2] // (h // 2)) + 1
            coarse = (hid.dense_if_cheaper(tiles.shape[0], side), pha, fgr)
        per_chunk = max(1, self.chunk * (2 + 2 * p) ** 2 // (2 * t + 2 * p) ** 2)
        centre = slice(2 * p - q, 2 * p + q + 4 * t)
        for start in range(0, tiles.shape[0], per_chunk):
            stop = min(start + per_chunk, tiles.shape[0])
            chunk = tiles[start:stop]
            # one full-resolution crop of photo and plate gives both stages their windows: the
            # half-resolution one of stage 1 is its 2x2 mean (h and w are even, so the bilinear
            # 2x downsample weighs the two source pixels 1/2 each), the one of stage 2 its centre
            full = resized_crop((src, bgr), chunk, 4 * t, 2 * p, (h, w))  # (n, 6, R, R)
            x = resized_crop(coarse, chunk, 2 * t, p, (h // 2, w // 2))
            x = self._stage1(torch.cat([x, halve(full)], dim=1))
            out = self._stage2(nearest2x_beside(x, full[..., centre, centre]))  # (n, 4, 4t, 4t)
            mine = cells[first[start] : first[stop]]  # (m, 3), grouped by tile
            owner = torch.repeat_interleave(
                torch.arange(stop - start, device=src.device),
                first[start + 1 : stop + 1] - first[start:stop],
            )
            blocks = out.unflatten(2, (t, 4)).unflatten(4, (t, 4)).permute(0, 2, 4, 1, 3, 5)
            patches = blocks[owner, mine[:, 1] % t, mine[:, 2] % t]  # (m, 4, 4, 4)
            paste_cells_(pha_out, mine, patches[:, 0:1])
            paste_cells_(fgr_out, mine, patches[:, 1:4])
        return pha_out, fgr_out

    def _tile_size(self, cells: Tensor, grid: tuple[int, int]) -> int:
        """The tile side (in cells, one of ``tile_sizes``) whose tiles covering ``cells`` (P, 3)
        of a (Hq, Wq) ``grid`` should cost the refiner least: the convolutions' multiply-adds
        over those tiles, weighted by ``1 + 2 / t`` for the lower throughput of small windows
        (per multiply-add, a whole HD frame ran about 1.5x slower with t = 1 than with t = 2
        and 1.15-1.3x slower with t = 4 than with t = 8; ``bench/bgmv2_selection.py``'s cases)."""
        k = self.kernel_size
        p, q = self._pads
        convs = (self.conv1, self.conv2, self.conv3, self.conv4)

        def cost(t: int) -> float:
            sides = (2 * t + 2 * p - (k - 1), 2 * t + 2 * p - 2 * (k - 1), 4 * t + 2 * q - (k - 1))
            per_tile = sum(
                s * s * c.weight[0].numel() * c.out_channels
                for s, c in zip((*sides, 4 * t), convs, strict=True)
            )
            return torch.unique(tile_keys(cells, grid, t)).numel() * per_tile * (1 + 2 / t)

        return min(self.tile_sizes, key=cost)


class MattingRefine(MattingBase):
    """The base network at ``backbone_scale`` resolution, then the refiner at full resolution.

    Args:
        backbone: as ``MattingBase``.
        backbone_scale: resize factor for the base network (<= 1/2); the coarse size is
            (floor(H*s), floor(W*s)).
        refine_mode, refine_sample_pixels, refine_threshold, refine_kernel_size,
        refine_prevent_oversampling: see ``Refiner``.
        refine_patch_crop_method, refine_patch_replace_method: accepted for signature
            compatibility with the official constructor; every choice computes the same result here.

    ``forward(src, bgr)``, (B, 3, H, W) in [0, 1] with H, W multiples of 4, returns
    ``(pha (B,1,H,W), fgr (B,3,H,W), pha_sm (B,1,Hc,Wc), fgr_sm (B,3,Hc,Wc), err_sm (B,1,Hc,Wc),
    ref_sm (B,1,H/4,W/4))``, all in [0, 1]; ``ref_sm`` is 1 where a 4x4 cell was refined.
    """

    def __init__(
        self,
        backbone: str,
        backbone_scale: float = 1 / 4,
        refine_mode: str = "sampling",
        refine_sample_pixels: int = 80_000,
        refine_threshold: float = 0.1,
        refine_kernel_size: int = 3,
        refine_prevent_oversampling: bool = True,
        refine_patch_crop_method: str = "unfold",
        refine_patch_replace_method: str = "scatter_nd",
    ) -> None:
        if not backbone_scale <= 0.5:
            raise ValueError(f"backbone_scale must be <= 1/2, not {backbone_scale}")
        if refine_patch_crop_method not in ("unfold", "roi_align", "gather"):
            raise ValueError(f"unknown refine_patch_crop_method {refine_patch_crop_method!r}")
        if refine_patch_replace_method not in ("scatter_nd", "scatter_element"):
            raise ValueError(f"unknown refine_patch_replace_method {refine_patch_replace_method!r}")
        super().__init__(backbone)
        self.backbone_scale = backbone_scale
        self.refiner = Refiner(
            refine_mode,
            refine_sample_pixels,
            refine_threshold,
            refine_kernel_size,
            refine_prevent_oversampling,
        )

    def forward(self, src: Tensor, bgr: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        if src.shape != bgr.shape:
            raise ValueError(f"src {tuple(src.shape)} and bgr {tuple(bgr.shape)} differ in shape")
        h, w = src.shape[-2:]
        if h % 4 or w % 4:
            raise ValueError(f"MattingRefine needs H and W divisible by 4, got {h}x{w}")
        src_sm, bgr_sm = (self._downsample(t) for t in (src, bgr))
        if self.refiner.on_windows:
            # the 32 hidden channels feed only the refiner's windows: computed there, on demand
            x4, x3, x2, x1, x0 = self._encode(src_sm, bgr_sm)
            x = _resize(self.decoder.last_input(self.aspp(x4), x3, x2, x1), x0.shape[-2:])
            d = self.decoder.last_conv(x, x0, slice(0, 5))
            hid_sm: Tensor | ConvWindows = ConvWindows(self.decoder, (x, x0), slice(5, None))
        else:
            d = self._decode(src_sm, bgr_sm)
            hid_sm = d[:, 5:].relu()
        pha_sm = d[:, 0:1].clamp(0.0, 1.0)
        fgr_res_sm = d[:, 1:4]
        err_sm = d[:, 4:5].clamp(0.0, 1.0)
        pha, fgr_res, ref_sm = self.refiner(src, bgr, pha_sm, fgr_res_sm, err_sm, hid_sm)
        if self.refiner.fast_inference and not self.training:  # its outputs are fresh: in place
            pha, fgr = pha.clamp_(0.0, 1.0), fgr_res.add_(src).clamp_(0.0, 1.0)
        else:
            pha = pha.clamp(0.0, 1.0)
            fgr = (fgr_res + src).clamp(0.0, 1.0)
        fgr_sm = (src_sm + fgr_res_sm).clamp(0.0, 1.0)
        return pha, fgr, pha_sm, fgr_sm, err_sm, ref_sm

    def _downsample(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, floor(H*s), floor(W*s)), bilinear."""
        if self.refiner.fast_inference:  # the same resize by size, gathered: no layout copy
            h, w = x.shape[-2:]
            return shrink(x, (int(h * self.backbone_scale), int(w * self.backbone_scale)))
        # recompute_scale_factor=True: exactly a resize to (floor(H*s), floor(W*s)); unlike
        # math.floor on the shape, it also stays symbolic when traced for ONNX.
        return F.interpolate(
            x,
            scale_factor=self.backbone_scale,
            mode="bilinear",
            align_corners=False,
            recompute_scale_factor=True,
        )

    @classmethod
    def from_official(cls, path: str | Path, **kwargs: Any) -> MattingRefine:  # type: ignore[override]
        """Load an official MattingRefine ``.pth`` state dict; backbone and kernel size come from it.

        ``kwargs`` set the other constructor arguments (e.g. ``refine_mode``). Raises
        ``CheckpointError`` for files of other models, and for MattingBase-only checkpoints.
        """
        state, _ = read_state_dict(path)
        config = official_config(state, str(path))
        if "refine_kernel_size" not in config:
            raise CheckpointError(
                f"{path}: is a MattingBase checkpoint (no refiner.* weights); load it with "
                "MattingBase.from_official, or train the refiner first."
            )
        model = cls(**{**config, **kwargs})
        load_state_dict_strict(model, _strip_module_prefix(state), str(path), cls.__name__)
        return model


def _strip_module_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # DataParallel / DDP checkpoints prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def official_config(state: Mapping[str, Tensor], source: str) -> dict[str, Any]:
    """Constructor arguments read from an official state dict: ``backbone`` and, when it has a
    refiner, ``refine_kernel_size``. Raises ``CheckpointError`` for other models' files."""
    state = _strip_module_prefix(state)
    stem = state.get("backbone.conv1.weight", state.get("backbone.features.0.0.weight"))
    if stem is None or "decoder.conv4.weight" not in state or stem.ndim != 4 or stem.shape[1] != 6:
        raise CheckpointError(
            f"{source}: is not a BackgroundMattingV2 checkpoint (no 6-channel backbone stem and "
            "decoder.conv4); pass a MattingBase/MattingRefine .pth state dict."
        )
    if "backbone.features.0.0.weight" in state:
        backbone = "mobilenetv2"
    else:
        backbone = "resnet101" if "backbone.layer3.22.conv1.weight" in state else "resnet50"
    config: dict[str, Any] = {"backbone": backbone}
    if "refiner.conv1.weight" in state:
        config["refine_kernel_size"] = int(state["refiner.conv1.weight"].shape[-1])
    return config


def _official_format(backbone: str, refine: bool) -> OfficialFormat:
    """Official ``.pth`` state dicts for ``bgmv2_{backbone}`` (refine) or ``bgmv2_base_{backbone}``."""
    cls = "MattingRefine" if refine else "MattingBase"

    def convert(state: Mapping[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
        config = official_config(state, "checkpoint")
        if config["backbone"] != backbone:
            name = "bgmv2_" + ("" if refine else "base_") + config["backbone"]
            raise CheckpointError(
                f"the checkpoint is a BackgroundMattingV2 {config['backbone']}, not {backbone}; "
                f"use --model {name}."
            )
        state = _strip_module_prefix(state)
        if not refine:  # as the official scripts, a MattingRefine file also serves the base
            return {}, {k: v for k, v in state.items() if not k.startswith("refiner.")}
        if "refine_kernel_size" not in config:
            raise CheckpointError(
                "the checkpoint is a MattingBase (no refiner.* weights); use --model "
                f"bgmv2_base_{backbone}, or train the refine stage first."
            )
        return {"refine_kernel_size": config["refine_kernel_size"]}, state

    return OfficialFormat(
        description=f"BackgroundMattingV2 {cls}({backbone!r}) .pth state dict", convert=convert
    )


# Registered defaults are those of the official inference scripts (sampling, 80,000 px, 0.7).
_DEFAULTS = {
    "backbone_scale": 0.25,
    "refine_mode": "sampling",
    "refine_sample_pixels": 80_000,
    "refine_threshold": 0.7,
}
_NAMES = {"mobilenetv2": "MobileNetV2", "resnet50": "ResNet-50", "resnet101": "ResNet-101"}

for _backbone, _label in _NAMES.items():
    register_model(
        f"bgmv2_{_backbone}",
        task="matting",
        summary=f"BackgroundMattingV2 MattingRefine, {_label} (photo + plate -> alpha, foreground)",
        defaults=_DEFAULTS,
        official=_official_format(_backbone, refine=True),
    )(functools.partial(MattingRefine, _backbone))
    register_model(
        f"bgmv2_base_{_backbone}",
        task="matting",
        summary=f"BackgroundMattingV2 MattingBase, {_label} (stage-one network, input resolution)",
        official=_official_format(_backbone, refine=False),
    )(functools.partial(MattingBase, _backbone))

del _backbone, _label

"""ONNX export of BackgroundMattingV2 (MattingBase and MattingRefine, every refine mode).

The TorchScript-based exporter (``torch.onnx.export(dynamo=False)``) traces one forward pass;
batch, height and width stay dynamic. Per refine mode:

- ``full``: plain convolutions and resizes; any size (multiple of 4).
- ``thresholding``: ``NonZero`` + ``GatherND`` crops + ``ScatterND`` paste; any size, any number
  of refined cells (including none), any batch.
- ``sampling``: as thresholding plus ``TopK`` with k = ``refine_sample_pixels // 16`` fixed at
  export: the graph needs inputs with at least k 4x4 cells (H*W >= ``refine_sample_pixels``),
  so export and run it at the resolution it is meant for (HD 80,000 px, 4K 320,000 px).

``backbone_scale`` and the threshold are constants of the graph (the official TorchScript export
keeps them settable at run time; ONNX has no such attributes). Unlike the official pre-exported
files, crops and pastes index the batch correctly, so batches > 1 are exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from detseg.engine.export import OnnxSpec, compare_onnx, export_model
from detseg.errors import DetsegError
from detseg.matting.bgmv2 import MattingBase, MattingRefine

REFINE_OUTPUTS = ("pha", "fgr", "pha_sm", "fgr_sm", "err_sm", "ref_sm")
BASE_OUTPUTS = ("pha", "fgr", "err", "hid")


def export_size(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """The (h, w) to trace at: ``height`` x ``width`` rounded up to multiples of 4, enlarged for
    sampling until it has at least k cells."""
    h, w = -(-height // 4) * 4, -(-width // 4) * 4
    if isinstance(model, MattingRefine) and model.refiner.mode == "sampling":
        k = model.refiner.sample_pixels // 16
        while (h // 4) * (w // 4) < k:
            h, w = h * 2, w * 2
    return h, w


def bgmv2_spec(model: MattingBase) -> OnnxSpec:
    """The export spec of ``MattingBase`` / ``MattingRefine``: the whole forward, inputs ``src``
    and ``bgr`` (B, 3, H, W) float32 in [0, 1], outputs under their official names."""
    refine = isinstance(model, MattingRefine)
    sampling = refine and model.refiner.mode == "sampling"
    return OnnxSpec(
        inputs=("src", "bgr"),
        outputs=REFINE_OUTPUTS if refine else BASE_OUTPUTS,
        size_multiple=4 if refine else 1,
        min_pixels=model.refiner.sample_pixels if sampling else 0,
        fit_size=lambda h, w: export_size(model, h, w),
        note="whole network; refine mode, backbone scale and threshold fixed in the graph",
    )


def export_onnx(
    model: nn.Module,
    path: str | Path,
    height: int = 1080,
    width: int = 1920,
    opset: int = 17,
    check: bool = True,
) -> dict[str, float]:
    """Write ``model`` (``MattingRefine`` or ``MattingBase``) as an ONNX file with inputs ``src``,
    ``bgr`` (B, 3, H, W) float32 in [0, 1] and the model's outputs under their official names.

    Args:
        height, width: trace size (see ``export_size``); the graph accepts other sizes.
        opset: ONNX opset.
        check: run onnxruntime on a fresh random pair of another size and batch 2 and compare.

    Returns:
        output name -> max abs difference vs torch (empty when ``check`` is False).
    """
    return export_model(model, path, height, width, opset, check)["max_abs_diff"]


def check_onnx(model: nn.Module, path: str | Path, size: tuple[int, int]) -> dict[str, float]:
    """Max abs difference per output between onnxruntime on ``path`` and ``model`` (batch 2)."""
    return compare_onnx(model, path, (torch.rand(2, 3, *size), torch.rand(2, 3, *size)))


def export(
    model: str,
    path: str | Path,
    weights: str | Path | None = None,
    height: int = 1080,
    width: int = 1920,
    opset: int = 17,
    check: bool = True,
    **model_kwargs: Any,
) -> dict[str, Any]:
    """``detseg export --format onnx --model bgmv2_... [--weights W] -o PATH``.

    ``model_kwargs`` pick the graph's constants (``refine_mode``, ``backbone_scale``,
    ``refine_sample_pixels``, ``refine_threshold``). Returns ``detseg.api.export``'s summary
    (``path``, ``size``, ``max_abs_diff``, ...).
    """
    from detseg.api import export as export_any
    from detseg.registry import get_entry

    if not model.startswith("bgmv2") or get_entry(model).task != "matting":
        raise DetsegError(f"{model!r} is not a BackgroundMattingV2 model.")
    return export_any(
        model,
        path,
        weights=weights,
        height=height,
        width=width,
        opset=opset,
        check=check,
        **model_kwargs,
    )

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

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from detseg.errors import DetsegError
from detseg.fileio import atomic_output
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
    model = model.eval().float().cpu()
    names = REFINE_OUTPUTS if isinstance(model, MattingRefine) else BASE_OUTPUTS
    h, w = export_size(model, height, width)
    dummy = (torch.rand(1, 3, h, w), torch.rand(1, 3, h, w))
    axes = {n: {0: "batch", 2: "height", 3: "width"} for n in ("src", "bgr", *names)}
    with atomic_output(path) as tmp, warnings.catch_warnings():
        # The tracer warns about the Python-side checks (shape asserts, the training-only branch).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            dummy,
            str(tmp),
            input_names=["src", "bgr"],
            output_names=list(names),
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return check_onnx(model, path, (h, w + 4)) if check else {}


def check_onnx(model: nn.Module, path: str | Path, size: tuple[int, int]) -> dict[str, float]:
    """Max abs difference per output between onnxruntime on ``path`` and ``model`` (batch 2)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise DetsegError(
            "checking the export needs onnxruntime: pip install detseg[onnx]."
        ) from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    src, bgr = torch.rand(2, 3, *size), torch.rand(2, 3, *size)
    outputs = session.run(None, {"src": src.numpy(), "bgr": bgr.numpy()})
    with torch.no_grad():
        reference = model(src, bgr)
    names = [o.name for o in session.get_outputs()]
    return {
        n: float(np.abs(o - r.numpy()).max()) if o.shape == tuple(r.shape) else float("inf")
        for n, o, r in zip(names, outputs, reference, strict=True)
    }


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
    ``refine_sample_pixels``, ``refine_threshold``). Returns ``{"path", "size", "max_abs_diff"}``.
    """
    from detseg.api import load_model

    loaded = load_model(model, weights=weights, device="cpu", **model_kwargs)
    if not isinstance(loaded.model, MattingBase):
        raise DetsegError(f"{model!r} is not a BackgroundMattingV2 model.")
    diffs = export_onnx(loaded.model, path, height, width, opset, check)
    return {
        "path": str(path),
        "size": list(export_size(loaded.model, height, width)),
        "max_abs_diff": diffs,
    }

"""ONNX export of single-input networks (semantic models, detector heads): trace, write, verify."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from detseg.errors import DetsegError
from detseg.fileio import atomic_output


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, dict):
        return tuple(out.values())
    return tuple(out)


def export_single_input(
    model: nn.Module,
    path: str | Path,
    height: int = 512,
    width: int = 512,
    opset: int = 17,
    check: bool = True,
) -> dict[str, Any]:
    """Write ``model`` (input ``image`` (N, 3, H, W) float32, dynamic N/H/W) as ONNX at ``path``.

    Returns ``{"path", "outputs": [...], "max_abs_diff": {name: float}}``; the check runs
    onnxruntime on batch 2 at another size and compares with eager PyTorch.
    """
    model = model.eval().float().cpu()
    dummy = torch.rand(1, 3, height, width)
    with torch.no_grad():
        names = [f"output{i}" if i else "output" for i in range(len(_as_tuple(model(dummy))))]
    axes = {n: {0: "batch", 2: "height", 3: "width"} for n in ("image", *names)}
    with atomic_output(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape arithmetic
        torch.onnx.export(
            model,
            (dummy,),
            str(tmp),
            input_names=["image"],
            output_names=names,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    result: dict[str, Any] = {"path": str(path), "outputs": names, "max_abs_diff": {}}
    if check:
        result["max_abs_diff"] = check_single_input(model, path, (height + 32, width + 64))
    return result


def check_single_input(
    model: nn.Module, path: str | Path, size: tuple[int, int]
) -> dict[str, float]:
    """Max abs difference per output between onnxruntime on ``path`` and ``model`` (batch 2)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise DetsegError(
            "checking the export needs onnxruntime: pip install detseg[onnx]."
        ) from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, *size)
    got = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        want = _as_tuple(model(x))
    return {
        o.name: float(np.abs(g - w.numpy()).max()) if g.shape == tuple(w.shape) else float("inf")
        for o, g, w in zip(session.get_outputs(), got, want, strict=True)
    }

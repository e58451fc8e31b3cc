"""ONNX export of networks (semantic models, detector heads): trace, write, verify.

``export_single_input`` serves image-in models; ``export_with_inputs`` any named inputs.
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


def _session(path: str | Path) -> Any:
    """An onnxruntime CPU session on ``path`` (``DetsegError`` without onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise DetsegError(
            "checking the export needs onnxruntime: pip install detseg[onnx]."
        ) from exc
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_single_input(
    model: nn.Module, path: str | Path, size: tuple[int, int]
) -> dict[str, float]:
    """Max abs difference per output between onnxruntime on ``path`` and ``model`` (batch 2)."""
    session = _session(path)
    x = torch.rand(2, 3, *size)
    got = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        want = _as_tuple(model(x))
    return {
        o.name: float(np.abs(g - w.numpy()).max()) if g.shape == tuple(w.shape) else float("inf")
        for o, g, w in zip(session.get_outputs(), got, want, strict=True)
    }


def export_with_inputs(
    model: nn.Module,
    path: str | Path,
    inputs: dict[str, torch.Tensor],
    dynamic_axes: dict[str, dict[int, str]],
    check_inputs: dict[str, torch.Tensor] | None = None,
    opset: int = 17,
) -> dict[str, Any]:
    """Write ``model(*inputs.values())`` as ONNX at ``path`` with named inputs and dynamic axes.

    Returns ``{"path", "outputs", "max_abs_diff"}``; with ``check_inputs`` (other shapes allowed
    by ``dynamic_axes``) onnxruntime runs on them and each output is compared with eager PyTorch.
    """
    model = model.eval().float().cpu()
    args = tuple(inputs.values())
    with torch.no_grad():
        names = [f"output{i}" for i in range(len(_as_tuple(model(*args))))]
    with atomic_output(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(tmp),
            input_names=list(inputs),
            output_names=names,
            dynamic_axes={**dynamic_axes, **{n: {0: "rows"} for n in names}},
            opset_version=opset,
            dynamo=False,
        )
    result: dict[str, Any] = {"path": str(path), "outputs": names, "max_abs_diff": {}}
    if check_inputs is not None:
        session = _session(path)
        got = session.run(None, {k: v.numpy() for k, v in check_inputs.items()})
        with torch.no_grad():
            want = _as_tuple(model(*check_inputs.values()))
        result["max_abs_diff"] = {
            n: float(np.abs(g - w.numpy()).max()) if g.shape == tuple(w.shape) else float("inf")
            for n, g, w in zip(names, got, want, strict=True)
        }
    return result

"""ONNX export of any registered network: trace what the model's export spec names, write, verify.

Each model says what is exported through an ``onnx_spec()`` method returning an ``OnnxSpec``
(models without one get ``OnnxSpec()``: one ``image`` input, the whole ``forward``). Where
post-processing is data-dependent (NMS, top-k decoding, mask pasting) the forward stops at the
raw head outputs and the post-processing runs beside the graph (``detseg.engine.onnx_runtime``).
A model whose ``onnx_spec`` raises ``NotExportable`` has no graph (e.g. HOG + SVM is no network).

The file carries the model's name, constructor arguments, input normalisation and class names as
ONNX metadata (``detseg.*`` keys), so ``detseg predict --runtime onnx`` needs nothing else.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from detseg.errors import DetsegError
from detseg.fileio import atomic_output

if TYPE_CHECKING:
    from detseg.api import LoadedModel

Inputs = tuple[Tensor, ...]


class NotExportable(DetsegError):
    """The model (or this configuration of it) has no ONNX graph; the message says why."""


def _random_images(count: int) -> Callable[[int, int, int], Inputs]:
    return lambda n, h, w: tuple(torch.rand(n, 3, h, w) for _ in range(count))


@dataclass(frozen=True)
class OnnxSpec:
    """What ``detseg export`` traces for one model.

    Attributes:
        inputs: input names, each (N, 3, H, W) float32 unless ``example`` says otherwise.
        outputs: output names; None names them ``output``, ``output1``, ...
        module: the graph to trace (default: the model itself, i.e. its eval ``forward``).
        dynamic_size: H and W are dynamic; False when the graph only holds the traced size
            (e.g. adaptive pooling to fixed bins exports as a pooling of fixed kernel).
        size_multiple: trace and check sizes are rounded up to a multiple of it.
        min_pixels: the graph is only valid for inputs of at least this many pixels (a top-k
            of fixed k is traced); the trace size is doubled until it has them.
        fit_size: (h, w) -> the (h, w) to trace at (after rounding); default unchanged.
        runtime: True when the graph is the model's whole eval ``forward``, so that an
            onnxruntime session can stand in for it in every inference path.
        example: (batch, h, w) -> example inputs; default uniform [0, 1) images.
        note: what the graph holds and what runs beside it (shown in the export table).
    """

    inputs: tuple[str, ...] = ("image",)
    outputs: tuple[str, ...] | None = None
    module: nn.Module | None = None
    dynamic_size: bool = True
    size_multiple: int = 1
    min_pixels: int = 0
    fit_size: Callable[[int, int], tuple[int, int]] | None = None
    runtime: bool = True
    example: Callable[[int, int, int], Inputs] | None = None
    note: str = ""

    def size(self, height: int, width: int) -> tuple[int, int]:
        """The trace size for a requested ``height`` x ``width``."""
        m = self.size_multiple
        h, w = -(-height // m) * m, -(-width // m) * m
        while h * w < self.min_pixels:
            h, w = h * 2, w * 2
        return self.fit_size(h, w) if self.fit_size is not None else (h, w)

    def make_inputs(self, batch: int, height: int, width: int) -> Inputs:
        make = self.example or _random_images(len(self.inputs))
        return make(batch, height, width)


def onnx_spec(model: nn.Module) -> OnnxSpec:
    """The model's ``onnx_spec()``, or the default single-image spec; raises ``NotExportable``."""
    method = getattr(model, "onnx_spec", None)
    return method() if callable(method) else OnnxSpec()


def as_tuple(out: Any) -> tuple[Tensor, ...]:
    """A forward's result (tensor, dict or sequence of tensors) as a flat tuple."""
    if isinstance(out, Tensor):
        return (out,)
    if isinstance(out, Mapping):
        return tuple(out.values())
    return tuple(out)


def _output_names(spec: OnnxSpec, count: int) -> list[str]:
    if spec.outputs is not None:
        if len(spec.outputs) != count:
            raise ValueError(f"the spec names {len(spec.outputs)} outputs, the graph has {count}")
        return list(spec.outputs)
    return [f"output{i}" if i else "output" for i in range(count)]


def _write_metadata(path: Path, metadata: Mapping[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"detseg.{key}", json.dumps(value)
    onnx.save(proto, str(path))


def export_model(
    model: nn.Module,
    path: str | Path,
    height: int = 512,
    width: int = 512,
    opset: int = 17,
    check: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model``'s ONNX graph (see ``onnx_spec``) at ``path``, optionally verified.

    Args:
        height, width: trace size (rounded as the spec says); batch is always dynamic.
        check: run onnxruntime on fresh inputs (batch 2; another size when the graph's size is
            dynamic) and compare every output with eager PyTorch.
        metadata: extra ``detseg.*`` metadata (JSON values), e.g. the model name and kwargs.

    Returns:
        ``{"path", "inputs", "outputs", "size": [h, w], "dynamic_size", "runtime", "note",
        "max_abs_output": the largest |value| of the traced outputs (the scale of the diffs),
        "max_abs_diff": {output: float}}`` (``max_abs_diff`` empty without ``check``).
    """
    spec = onnx_spec(model)
    module = (spec.module if spec.module is not None else model).eval().float().cpu()
    h, w = spec.size(height, width)
    dummy = spec.make_inputs(1, h, w)
    with torch.no_grad():
        reference = module(*dummy)
    names = _output_names(spec, len(as_tuple(reference)))
    axes = {n: {0: "batch", 2: "height", 3: "width"} for n in spec.inputs}
    if not spec.dynamic_size:
        axes = {n: {0: "batch"} for n in spec.inputs}
    path = Path(path)
    with atomic_output(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape arithmetic
        torch.onnx.export(
            module,
            dummy,
            str(tmp),
            input_names=list(spec.inputs),
            output_names=names,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        _write_metadata(
            tmp,
            {
                **(metadata or {}),
                "inputs": list(spec.inputs),
                "output_kind": "tensor" if isinstance(reference, Tensor) else "tuple",
                "size": [h, w],
                "dynamic_size": spec.dynamic_size,
                "size_multiple": spec.size_multiple,
                "min_pixels": spec.min_pixels,
                "runtime": spec.runtime,
                "note": spec.note,
            },
        )
    result: dict[str, Any] = {
        "path": str(path),
        "inputs": list(spec.inputs),
        "outputs": names,
        "size": [h, w],
        "dynamic_size": spec.dynamic_size,
        "runtime": spec.runtime,
        "note": spec.note,
        "max_abs_output": max(float(t.abs().max()) for t in as_tuple(reference) if t.numel()),
        "max_abs_diff": {},
    }
    if check:
        # another, odd-offset size: Python-side shape arithmetic frozen by the trace shows up
        size = spec.size(h + 13, w + 27) if spec.dynamic_size else (h, w)
        result["max_abs_diff"] = compare_onnx(module, path, spec.make_inputs(2, *size))
    return result


def export_loaded(
    loaded: LoadedModel,
    path: str | Path,
    height: int = 512,
    width: int = 512,
    opset: int = 17,
    check: bool = True,
) -> dict[str, Any]:
    """``export_model`` of a loaded model, recording ``model_metadata`` in the file."""
    return export_model(loaded.model, path, height, width, opset, check, model_metadata(loaded))


def model_metadata(loaded: LoadedModel) -> dict[str, Any]:
    """What ``load_onnx`` needs to run a file: the registry name, constructor arguments, input
    normalisation and class names."""
    return {
        "model": loaded.name,
        "kwargs": loaded.kwargs,
        "preprocess": loaded.preprocess.to_dict(),
        "class_names": list(loaded.class_names),
    }


def ort_session(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """An onnxruntime ``InferenceSession`` of ``path`` (CUDA provider on a CUDA ``device`` when
    onnxruntime has it, else CPU), on as many intra-op threads as torch uses
    (``torch.get_num_threads()``), so that ``--threads`` sets both runtimes alike."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise DetsegError(
            "running ONNX files needs onnxruntime: pip install detseg[onnx]."
        ) from exc
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in (
        ort.get_available_providers()
    ):
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable files
        raise DetsegError(f"{path}: not a readable ONNX file ({exc}).") from exc


def compare_onnx(module: nn.Module, path: str | Path, inputs: Inputs) -> dict[str, float]:
    """Max abs difference per output between onnxruntime on ``path`` and ``module(*inputs)``
    (``inf`` where the shapes differ)."""
    session = ort_session(path)
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = as_tuple(module(*inputs))
    return {
        o.name: float(np.abs(g - r.numpy()).max(initial=0.0))
        if g.shape == tuple(r.shape)
        else float("inf")
        for o, g, r in zip(session.get_outputs(), got, want, strict=True)
    }


def export_with_inputs(
    module: nn.Module,
    path: str | Path,
    inputs: dict[str, Tensor],
    dynamic_axes: dict[str, dict[int, str]],
    check_inputs: dict[str, Tensor] | None = None,
    opset: int = 17,
) -> dict[str, Any]:
    """Write ``module(*inputs.values())`` as ONNX at ``path`` with named inputs and free-form
    dynamic axes (for graphs that are not image-in, e.g. RoI heads on (R, C, 7, 7) features).

    Returns ``{"path", "outputs", "max_abs_diff"}``; with ``check_inputs`` (other shapes allowed
    by ``dynamic_axes``) onnxruntime runs on them and each output is compared with eager PyTorch.
    """
    module = module.eval().float().cpu()
    args = tuple(inputs.values())
    with torch.no_grad():
        names = [f"output{i}" for i in range(len(as_tuple(module(*args))))]
    with atomic_output(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape arithmetic
        torch.onnx.export(
            module,
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
        result["max_abs_diff"] = compare_onnx(module, path, tuple(check_inputs.values()))
    return result

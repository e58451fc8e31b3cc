"""Run an exported ONNX file in place of the PyTorch forward, with the model's own post-processing.

``load_onnx(path)`` reads the ``detseg.*`` metadata that ``detseg export`` writes (model name,
constructor arguments, input normalisation, class names), builds the registry model from them
(its weights are never used) and replaces its ``forward`` by an onnxruntime session. Everything
around the forward — resizing, padding, decoding, NMS, mask pasting, sliding windows, the
``Predictor`` — is the model's own PyTorch/numpy code, so the torch and ONNX runtimes differ only
by the graph's float rounding.

Only graphs that are the model's whole eval forward (``OnnxSpec.runtime``) can stand in; files
holding a part (the backbone + RPN of Mask R-CNN) are refused with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from detseg.data.preprocess import Preprocess
from detseg.engine.device import resolve_device
from detseg.engine.export import ort_session
from detseg.errors import DetsegError

if TYPE_CHECKING:
    from detseg.api import LoadedModel


def read_metadata(session: Any) -> dict[str, Any]:
    """The ``detseg.*`` metadata of an onnxruntime session's model (prefix stripped, JSON decoded)."""
    props: Mapping[str, str] = session.get_modelmeta().custom_metadata_map
    return {
        k.removeprefix("detseg."): json.loads(v)
        for k, v in props.items()
        if k.startswith("detseg.")
    }


class OrtForward:
    """A callable with a model's eval-forward signature backed by an onnxruntime session.

    ``forward(*inputs)``: tensors (N, 3, H, W) on any device; returns what the torch forward
    returns (one tensor or a tuple), float32 on the inputs' device.
    """

    def __init__(self, session: Any, metadata: Mapping[str, Any]) -> None:
        self.session = session
        self.names = [i.name for i in session.get_inputs()]
        self.single = metadata.get("output_kind") == "tensor"
        self.size = (
            tuple(metadata.get("size", ())) if not metadata.get("dynamic_size", True) else None
        )
        self.multiple = int(metadata.get("size_multiple", 1))
        self.min_pixels = int(metadata.get("min_pixels", 0))

    def _check(self, x: Tensor) -> None:
        hw = tuple(x.shape[-2:])
        if self.size is not None and hw != self.size:
            raise DetsegError(
                f"this ONNX graph only runs at {self.size[0]}x{self.size[1]} (its size is fixed), "
                f"got {hw[0]}x{hw[1]}; export it again at the size you need (--height/--width)."
            )
        if any(v % self.multiple for v in hw):
            raise DetsegError(
                f"this ONNX graph needs sizes divisible by {self.multiple}, got {hw}."
            )
        if hw[0] * hw[1] < self.min_pixels:
            raise DetsegError(
                f"this ONNX graph needs inputs of at least {self.min_pixels} pixels, got "
                f"{hw[0]}x{hw[1]}; run it on larger images or use the PyTorch runtime."
            )

    def __call__(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        self._check(inputs[0])
        feeds = {
            name: x.detach().to("cpu", torch.float32).contiguous().numpy()
            for name, x in zip(self.names, inputs, strict=True)
        }
        device = inputs[0].device
        outputs = tuple(torch.from_numpy(o).to(device) for o in self.session.run(None, feeds))
        return outputs[0] if self.single else outputs


def load_onnx(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A ``LoadedModel`` whose forward is the ONNX file at ``path`` (see the module docstring).

    ``device`` ("auto", "cpu", "cuda") picks onnxruntime's CUDA provider when it has one; the
    code around the graph runs on the CPU.

    Raises:
        DetsegError: unreadable file, not written by ``detseg export``, or a partial graph.
    """
    from detseg.api import load_model

    path = Path(path)
    if not path.is_file():
        raise DetsegError(f"{path}: no such ONNX file; write one with `detseg export`.")
    session = ort_session(path, resolve_device(device))
    meta = read_metadata(session)
    if "model" not in meta:
        raise DetsegError(
            f"{path}: has no detseg metadata (not written by `detseg export`); export the model "
            "with `detseg export --model NAME -o FILE.onnx`."
        )
    if not meta.get("runtime", False):
        raise DetsegError(
            f"{path}: holds only part of {meta['model']!r} ({meta.get('note', 'raw outputs')}); "
            "it cannot replace the PyTorch model in `detseg predict`."
        )
    loaded = load_model(meta["model"], device="cpu", **meta.get("kwargs", {}))
    loaded.model.forward = OrtForward(session, meta)  # the instance's forward: the graph
    if meta.get("preprocess"):
        loaded.preprocess = Preprocess.from_dict(meta["preprocess"])
    loaded.class_names = tuple(meta.get("class_names", loaded.class_names))
    loaded.weights, loaded.runtime = str(path), "onnx"
    return loaded

"""onnxruntime for a loaded model without an export step: its graph, exported once and kept.

``detseg predict --runtime onnx`` without ``--onnx FILE`` (and ``onnx_model(loaded)`` here)
exports the model's graph on first use into the cache folder and runs it with onnxruntime, as
``--onnx FILE`` would; later runs of the same model, weights and arguments reuse the file. On the
2-core CPU of docs/performance.md#onnxruntime (``python -m bench.run --onnx``) onnxruntime ran at
0.71-1.12x the torch fast path in quiet minutes and lost less than it when another tenant took a
core; the torch fast path stays the default (it also serves bf16 and BGMv2's tiled refiner).

The file is named by a SHA-256 of everything the graph depends on: the model name, constructor
arguments, input normalisation, class names, every tensor of the state dict (names, dtypes,
shapes, bytes) and the torch and detseg versions. The folder is ``$DETSEG_CACHE/onnx``, else
``$XDG_CACHE_HOME/detseg/onnx``, else ``~/.cache/detseg/onnx``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from detseg.engine.export import export_loaded, model_metadata, onnx_spec
from detseg.engine.onnx_runtime import load_onnx
from detseg.errors import DetsegError

if TYPE_CHECKING:
    from detseg.api import LoadedModel


def cache_folder() -> Path:
    """Where exported graphs are kept (see the module docstring); not created here."""
    if os.environ.get("DETSEG_CACHE"):
        return Path(os.environ["DETSEG_CACHE"]) / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "detseg" / "onnx"


def graph_key(loaded: LoadedModel) -> str:
    """Hex SHA-256 of what ``loaded``'s exported graph depends on (module docstring)."""
    from detseg import __version__

    digest = hashlib.sha256()
    header = {"meta": model_metadata(loaded), "torch": torch.__version__, "detseg": __version__}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in loaded.model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_graph(loaded: LoadedModel, folder: Path | None = None) -> Path:
    """The path of ``loaded``'s graph in ``folder`` (default ``cache_folder()``), exported there
    first when absent (written atomically: an interrupted export leaves no file).

    Raises:
        DetsegError: the model has no graph, or its graph holds only a part of the forward
            (Mask R-CNN / PointRend: the first stage), so onnxruntime cannot run it alone.
    """
    spec = onnx_spec(loaded.model)  # raises NotExportable (a DetsegError) with the reason
    if not spec.runtime:
        raise DetsegError(
            f"{loaded.name}: its ONNX graph holds only part of the model ({spec.note}); run it "
            "with --runtime torch."
        )
    folder = cache_folder() if folder is None else folder
    path = folder / f"{loaded.name}-{graph_key(loaded)[:20]}.onnx"
    if not path.is_file():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DetsegError(
                f"cannot create the ONNX cache folder {folder} ({exc.strerror}); set "
                "DETSEG_CACHE to a writable folder."
            ) from exc
        if any(p.device.type != "cpu" for p in loaded.model.parameters()):
            # the exporter traces on the CPU and would move the caller's model there
            loaded = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).cpu())
        export_loaded(loaded, path, check=False)
    return path


def onnx_model(
    loaded: LoadedModel, device: str | torch.device = "cpu", folder: Path | None = None
) -> LoadedModel:
    """``loaded`` with its forward run by onnxruntime on its cached graph (``cached_graph``);
    everything around the forward stays the model's own code (``load_onnx``)."""
    result = load_onnx(cached_graph(loaded, folder), device)
    return dataclasses.replace(result, weights=loaded.weights, official=loaded.official)

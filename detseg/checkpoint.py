"""Checkpoints: our safetensors files, and safe reading of official ``.pth`` / ``.pkl`` files.

Our format is one ``.safetensors`` file whose header metadata holds a small JSON under the key
``"detseg"``: ``{"model": name, "kwargs": {...}, "preprocess": {...}|null, "class_names": [...]}``.
No path here ever unpickles arbitrary objects: ``.pth`` goes through ``torch.load(weights_only=True)``
and ``.pkl`` through a restricted unpickler that admits only numpy arrays and plain containers.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from detseg.errors import CheckpointError
from detseg.fileio import atomic_output

META_KEY = "detseg"
FORMAT_VERSION = 1


@dataclass
class CheckpointMeta:
    """What our checkpoints record beside the tensors."""

    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] | None = None
    class_names: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, **self.__dict__}, sort_keys=True)


def save_tensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Write ``tensors`` + JSON ``meta`` to a safetensors file, atomically."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_output(path) as tmp:
        save_file(flat, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file written by ``save_tensors``: (tensors, meta)."""
    path = Path(path)
    _require_file(path)
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}).") from exc
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: the detseg metadata is not valid JSON ({exc}).") from exc
    return tensors, meta


def save_checkpoint(path: str | Path, model: nn.Module, meta: CheckpointMeta) -> None:
    """Save ``model``'s state dict with ``meta`` as our safetensors checkpoint."""
    save_tensors(path, model.state_dict(), json.loads(meta.to_json()))


def _require_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the --weights path.")
    if not path.is_file():
        raise CheckpointError(f"{path}: is not a file; pass a checkpoint file to --weights.")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays, dtypes and plain containers: what detectron2-style ``.pkl`` hold."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "slice"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _to_tensor_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap ``{'state_dict': ...}`` / ``{'model': ...}`` containers into a flat name->tensor dict."""
    for key in ("state_dict", "model_state", "model", "params"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors.")
    out: dict[str, torch.Tensor] = {}
    for name, value in obj.items():
        if isinstance(value, torch.Tensor):
            out[str(name)] = value
        elif isinstance(value, np.ndarray):
            out[str(name)] = torch.from_numpy(np.ascontiguousarray(value))
    if not out:
        raise CheckpointError(f"{path}: contains no tensors; is it a model checkpoint?")
    return out


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta | None]:
    """Read any supported weights file safely: (state dict, our metadata or None for official files).

    Raises:
        CheckpointError: missing file, unknown or corrupt format, or a pickle holding anything
            other than tensors / arrays (refused, never executed).
    """
    path = Path(path)
    _require_file(path)
    with path.open("rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        tensors, meta = load_tensors(path)
        if not meta:
            return tensors, None
        fields = {
            k: meta[k]
            for k in ("model", "kwargs", "preprocess", "class_names", "extra")
            if k in meta
        }
        return tensors, CheckpointMeta(**fields)
    if path.suffix == ".pkl":
        try:
            obj = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{path}: refused to unpickle ({exc}); only arrays and plain containers are "
                "loaded. Convert the file to safetensors with a trusted tool."
            ) from exc
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable pickle ({exc}).") from exc
        return _to_tensor_dict(obj, path), None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: refused to load: it contains Python objects other than tensors "
            f"(possibly malicious; {first}). Only plain state dicts are loaded."
        ) from exc
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})."
        ) from exc
    return _to_tensor_dict(obj, path), None


def load_state_dict_strict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, model_name: str
) -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line ``CheckpointError`` on mismatch."""
    own = model.state_dict()
    # BatchNorm counters are absent from pre-1.0 checkpoints (ESPNet's); they never affect eval.
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        ):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise CheckpointError(
            f"{source}: does not fit model {model_name!r}: {', '.join(parts)}. "
            "Is it a checkpoint of another model or of other constructor arguments?"
        )
    model.load_state_dict(state, strict=True)

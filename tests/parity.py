"""Load the ../shared/parity fixtures: build the toolkit class, regenerate weights, run, compare."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from tests.conftest import need, shared_root


def parity_dir() -> Path:
    return shared_root() / "parity"


def fixture_names(prefix: str) -> list[str]:
    """Fixture names starting with ``prefix`` (empty when the shared folder is absent)."""
    d = parity_dir()
    return sorted(p.stem for p in d.glob(f"{prefix}*.json")) if d.is_dir() else []


def _regen():
    path = need(parity_dir() / "regen.py")
    spec = importlib.util.spec_from_file_location("detseg_parity_regen", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_fixture(name: str, prepare=None) -> dict[str, float]:
    """Run fixture ``name``; returns output name -> max abs difference (asserts strict loading).

    ``prepare(model) -> model`` (e.g. ``detseg.engine.fast.accelerate``) runs on the loaded model.
    """
    spec = json.loads(need(parity_dir() / f"{name}.json").read_text())
    arrays = np.load(need(parity_dir() / f"{name}.npz"))
    cls = getattr(importlib.import_module(spec["module"]), spec["class"])
    model = cls(**spec.get("kwargs", {}))
    model.load_state_dict(_regen().regen_state_dict(spec), strict=True)
    model.eval()
    if prepare is not None:
        model = prepare(model)
    inputs = [torch.from_numpy(arrays[f"in_{n}"]) for n in spec["inputs"]]
    with torch.no_grad():
        out = model(*inputs)
    outs = out if isinstance(out, (tuple, list)) else [out]
    diffs = {}
    for oname, value in zip(spec["outputs"], outs, strict=True):
        ref = torch.from_numpy(arrays[f"out_{oname}"])
        if tuple(value.shape) != tuple(ref.shape):
            diffs[oname] = float("inf")
        else:
            diffs[oname] = float((value.float() - ref.float()).abs().max()) if ref.numel() else 0.0
    return diffs

"""Device selection: ``auto`` picks CUDA when present, else CPU."""

from __future__ import annotations

import torch

from detseg.errors import DetsegError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto" | "cpu" | "cuda" | "cuda:N"`` -> a usable ``torch.device``."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DetsegError(f"--device {name}: CUDA is not available here; use --device cpu.")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise DetsegError(f"--device {name!r} is not a device; use cpu, cuda or auto.") from exc

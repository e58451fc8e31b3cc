"""Shared fixtures: the ``shared`` folder beside the repository, small random generators."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    return Path(os.environ.get("DETSEG_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared data folder; skips (or fails under DETSEG_REQUIRE_SHARED=1) when absent."""
    root = shared_root()
    if not root.is_dir():
        if os.environ.get("DETSEG_REQUIRE_SHARED") == "1":
            pytest.fail(f"shared folder {root} is missing and DETSEG_REQUIRE_SHARED=1")
        pytest.skip(f"shared folder {root} not found (set DETSEG_SHARED)")
    return root


def need(path: Path) -> Path:
    """``path`` if it exists; otherwise skip, or fail under DETSEG_REQUIRE_SHARED=1."""
    if not path.exists():
        if os.environ.get("DETSEG_REQUIRE_SHARED") == "1":
            pytest.fail(f"required shared file {path} is missing")
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

"""Fixtures: tiny random-weight predictors of every task, built once per session."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from detseg.api import load_model
from detseg.predictor import Predictor
from tests.serve.tiny import TINY, GatedPredictor


@pytest.fixture(scope="session")
def predictors() -> dict[str, Predictor]:
    """Route name -> a Predictor of a tiny random-weight model (detectors at 256 px)."""
    return {
        name: Predictor(load_model(name, device="cpu", **kwargs), score_threshold=0.0, max_size=256)
        for name, kwargs in TINY.items()
    }


@pytest.fixture()
def gated() -> Callable[..., GatedPredictor]:
    def make(gate: threading.Event, started: threading.Event | None = None) -> GatedPredictor:
        return GatedPredictor(load_model("unet", device="cpu", **TINY["unet"]), gate, started)

    return make

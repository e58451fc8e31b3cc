"""Start-up: load every model once, build the app, run uvicorn with a graceful shutdown."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detseg.errors import DetsegError
from detseg.predictor import Predictor
from detseg.serve.limits import ServeLimits


def pair_weights(
    models: Sequence[str], weights: Sequence[str | Path] | None
) -> list[tuple[str | None, str | None]]:
    """``--model``/``--weights`` lists -> (model, weights) pairs, matched by position.

    No weights: every model gets random weights (so does the word ``random`` in the list).
    Weights without models: each file is one of our checkpoints, which names its model.
    """
    files = [str(w) for w in weights or []]
    if not models:
        if not files:
            raise DetsegError("pass --model NAME (repeatable) and/or --weights CHECKPOINT.")
        return [(None, w) for w in files]
    if files and len(files) != len(models):
        raise DetsegError(
            f"{len(models)} --model but {len(files)} --weights; give one --weights per --model "
            "(in the same order; 'random' for random weights), or none at all."
        )
    paired = files or [None] * len(models)
    return [(m, None if w == "random" else w) for m, w in zip(models, paired, strict=True)]


def load_predictors(
    pairs: Sequence[tuple[str | None, str | None]], device: str = "auto", **options: Any
) -> dict[str, Predictor]:
    """Load each model once: route name (its registry name) -> ``Predictor(**options)``."""
    from detseg.api import load_model

    predictors: dict[str, Predictor] = {}
    for model, weights in pairs:
        loaded = load_model(model, weights, device)
        if loaded.name in predictors:
            raise DetsegError(f"model {loaded.name!r} is given twice; serve each model once.")
        predictors[loaded.name] = Predictor(loaded, **options)
    return predictors


def serve(
    predictors: dict[str, Predictor],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits | None = None,
    grace_s: float = 30.0,
    log_level: str = "info",
) -> None:
    """Serve until SIGINT/SIGTERM; then stop accepting, finish in-flight requests (up to
    ``grace_s`` seconds) and stop the model threads."""
    try:
        import uvicorn

        from detseg.serve.app import create_app
    except ImportError as exc:
        raise DetsegError(
            f"`detseg serve` needs the serve extra ({exc.name} is missing): "
            "pip install 'detseg[serve]'."
        ) from exc
    limits = limits or ServeLimits()
    app = create_app(predictors, limits)
    # connections beyond every model's slots (with room for /healthz and the page) get uvicorn's
    # own 503, so even a flood of clients holds a bounded number of request bodies
    capacity = sum(w.capacity for w in app.state.workers.values())
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        limit_concurrency=4 * capacity + 16,
        timeout_graceful_shutdown=grace_s,
    )

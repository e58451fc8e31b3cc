"""Model registry: ``@register_model`` fills it; names list themselves with ``list_models``.

Each entry knows its task, how to build the model from keyword arguments, and, where the authors
published weights, how to recognise and map their checkpoint format (``official``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from detseg.errors import UnknownModelError

TASKS = ("semantic", "detection", "instance", "matting")


@dataclass(frozen=True)
class OfficialFormat:
    """How an official (authors') checkpoint maps onto a detseg model.

    Attributes:
        description: human-readable name of the release format, shown by ``detseg models``.
        convert: official state dict -> (constructor kwargs, detseg state dict); raises
            ``CheckpointError`` when the file is not of this model.
        preprocess: input normalisation the official weights were trained with (kwargs of
            ``detseg.data.preprocess.Preprocess``), or ``None`` for the model's default.
    """

    description: str
    convert: Callable[[Mapping[str, torch.Tensor]], tuple[dict[str, Any], dict[str, torch.Tensor]]]
    preprocess: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: ``builder(**kwargs) -> nn.Module``."""

    name: str
    task: str
    builder: Callable[..., nn.Module]
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)
    official: OfficialFormat | None = None

    def build(self, **kwargs: Any) -> nn.Module:
        return self.builder(**{**self.defaults, **kwargs})


_REGISTRY: dict[str, ModelEntry] = {}
_ALIASES: dict[str, str] = {}


def register_model(
    name: str,
    *,
    task: str,
    summary: str = "",
    defaults: dict[str, Any] | None = None,
    official: OfficialFormat | None = None,
    aliases: tuple[str, ...] = (),
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``builder`` under ``name`` (the builder itself is returned unchanged).

    ``aliases`` are other names that resolve to the same entry (e.g. the short names an issue or a
    paper uses); ``detseg models`` lists the entry once, under ``name``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        doc_lines = (builder.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = ModelEntry(
            name=name,
            task=task,
            builder=builder,
            summary=summary or (doc_lines[0] if doc_lines else ""),
            defaults=dict(defaults or {}),
            official=official,
        )
        for alias in aliases:
            if alias in _REGISTRY or alias in _ALIASES:
                raise ValueError(f"alias {alias!r} registered twice")
            _ALIASES[alias] = name
        return builder

    return wrap


_TASK_PACKAGES = ("detseg.semantic", "detseg.detection", "detseg.instance", "detseg.matting")


def _ensure_loaded() -> None:
    # Importing the task packages runs their @register_model decorators.
    import importlib

    for package in _TASK_PACKAGES:
        importlib.import_module(package)


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; ``UnknownModelError`` with close matches otherwise."""
    _ensure_loaded()
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, [*_REGISTRY, *_ALIASES], n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} Run `detseg models` to list the registered models."
        )
    return _REGISTRY[name]


def list_models(task: str | None = None) -> list[ModelEntry]:
    """All registered entries (optionally of one task), sorted by name."""
    _ensure_loaded()
    return sorted(
        (e for e in _REGISTRY.values() if task is None or e.task == task), key=lambda e: e.name
    )

"""Rich progress bars for long work (training steps, images, frames, windows)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr_console = Console(stderr=True)


def _progress(*extra: TextColumn) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=stderr_console,
        transient=True,  # leaves stderr clean: an error after a bar is still one line
    )


@contextlib.contextmanager
def step_progress(
    total: int, start: int = 0, enabled: bool = True
) -> Iterator[Callable[[int, float], None]]:
    """Yield ``update(step, loss)`` driving a bar with the running loss and ETA."""
    if not enabled:
        yield lambda step, loss: None
        return
    with _progress(TextColumn("loss {task.fields[loss]:.4f}")) as bar:
        task = bar.add_task("train", total=total, completed=start, loss=float("nan"))
        yield lambda step, loss: bar.update(task, completed=step, loss=loss)


@contextlib.contextmanager
def count_progress(
    total: int, description: str, enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)`` driving a bar over ``total`` items (images, frames, windows)."""
    if not enabled:
        yield lambda n=1: None
        return
    with _progress() as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)

"""Overlapping input and output with inference: a bounded read-ahead thread and a writer thread.

Decoding (PIL, OpenCV, PyAV), encoding and torch's kernels release the GIL, so one thread reading the
next images and one writing the last results run beside the model's forward passes. Both queues
are bounded (``depth`` items): memory stays that of a few images whatever the input's length.
Errors raised in a thread are raised again in the caller, at the next item or at ``close``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` in a background thread, up to ``depth`` items ahead of the consumer.

    Yields the same items in the same order; an exception of ``items`` is raised here. Closing the
    generator early (``break``) stops the thread after at most one more item.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, not {depth}")
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failure(exc))
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="detseg-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


class BackgroundWriter:
    """Runs submitted calls (writing files, encoding frames) in order in one background thread.

    ``submit(fn, *args)`` blocks when ``depth`` calls are already waiting. Use as a context manager:
    leaving it waits for every call; the first error of a call is raised by ``submit`` or on exit.
    """

    def __init__(self, depth: int = 4) -> None:
        self._jobs: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="detseg-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _DONE:
                return
            if self._error is None:
                try:
                    job[0](*job[1])
                except BaseException as exc:  # raised in the caller's thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        """Queue ``fn(*args)``; raises the error of an earlier call, if one failed."""
        self._raise()
        self._jobs.put((fn, args))

    def close(self) -> None:
        """Wait for every queued call; raise the first error of one."""
        if self._thread.is_alive():
            self._jobs.put(_DONE)
            self._thread.join()
        self._raise()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        self._jobs.put(_DONE)  # an error in the caller: finish quietly, keep the caller's error
        self._thread.join()

"""Per-model inference workers: a thread pool off the event loop and a bounded queue.

Each served model owns ``workers`` threads. A request takes a slot before it is queued; there are
``workers + queue_size`` slots, so at most that many requests per model hold decoded images at
once and the next one is refused (``QueueFull`` -> 503) instead of piling up in memory. A slot is
given back only when its job has finished or was cancelled before it started, so a request that
timed out keeps its slot until its thread is free again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from detseg.errors import DetsegError
from detseg.predictor import Predictor

T = TypeVar("T")


class QueueFull(DetsegError):
    """Every slot of a model is taken; the client should retry later (503)."""


class RequestTimeout(DetsegError):
    """A request waited and ran longer than the server's timeout (504)."""


class BodyTimeout(DetsegError):
    """A request body that did not arrive within the server's timeout (408)."""


class ModelWorker:
    """One served model: its ``Predictor``, its threads and its slots.

    Args:
        name: the name the routes use; predictor: the served-defaults predictor.
        workers: inference threads; queue_size: requests that may wait beside the running ones.
    """

    def __init__(self, name: str, predictor: Predictor, workers: int = 1, queue_size: int = 8):
        self.name, self.predictor = name, predictor
        self.workers, self.queue_size = workers, queue_size
        self._busy = 0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"detseg-{name}")

    @property
    def capacity(self) -> int:
        """Requests this model holds at most: running plus waiting."""
        return self.workers + self.queue_size

    @property
    def busy(self) -> int:
        """Slots taken now (running or waiting)."""
        return self._busy

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/models`` says of this model."""
        loaded = self.predictor.loaded
        return {
            "name": self.name,
            "task": loaded.task,
            "classes": list(loaded.class_names),
            "needs_plate": self.predictor.needs_plate,
            "weights": "random" if loaded.weights is None else "file",
            "device": str(loaded.device),
            "workers": self.workers,
            "queue_size": self.queue_size,
            "busy": self.busy,
        }

    def is_full(self) -> bool:
        """True when a request now would be refused."""
        return self._busy >= self.capacity

    def _take_slot(self) -> None:
        with self._lock:
            if self._busy >= self.capacity:
                raise QueueFull(
                    f"model {self.name!r} is busy ({self.capacity} requests running or queued); "
                    "retry shortly."
                )
            self._busy += 1

    def _give_slot(self, _: Future | None = None) -> None:
        with self._lock:
            self._busy -= 1

    async def run(self, job: Callable[[], T], timeout_s: float) -> T:
        """``job()`` on one of this model's threads, awaited without blocking the event loop.

        Raises:
            QueueFull: no free slot. RequestTimeout: not done within ``timeout_s`` seconds (a job
                still waiting is cancelled; a running one finishes on its thread, unanswered).
        """
        self._take_slot()
        deadline = time.monotonic() + timeout_s
        try:
            future = self._executor.submit(_before(deadline, job))
        except RuntimeError as exc:  # the executor is shut down: the server is stopping
            self._give_slot()
            raise QueueFull(f"model {self.name!r} is shutting down.") from exc
        future.add_done_callback(self._give_slot)
        waiter = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except asyncio.TimeoutError as exc:
            future.cancel()
            waiter.add_done_callback(_retrieve)  # its late result or error is nobody's now
            raise RequestTimeout(
                f"model {self.name!r} did not answer within {timeout_s:g} s; "
                "send a smaller image or retry later."
            ) from exc

    def close(self) -> None:
        """Finish the jobs already submitted, then stop the threads."""
        self._executor.shutdown(wait=True)


def _before(deadline: float, job: Callable[[], T]) -> Callable[[], T]:
    """``job`` that is skipped when its request has already timed out while it waited."""

    def guarded() -> T:
        if time.monotonic() > deadline:
            raise RequestTimeout("the request timed out while it waited in the queue.")
        return job()

    return guarded


def _retrieve(waiter: asyncio.Future) -> None:
    if not waiter.cancelled():
        waiter.exception()

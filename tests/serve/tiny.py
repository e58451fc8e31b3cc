"""Tiny random-weight models of every task and helpers to encode test images."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import uvicorn
from PIL import Image

from detseg.predictor import Predictor

TINY = {
    "unet": {"num_classes": 3, "base_channels": 8},
    "fcos_mnv2_fpn": {"num_classes": 2, "score_thresh": 0.0},
    "polarmask_r50": {
        "num_classes": 2,
        "backbone": "mobilenet_v2",
        "out_channels": 32,
        "feat_channels": 32,
        "stacked_convs": 1,
    },
    "bgmv2_base_mobilenetv2": {},
}


def image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


class GatedPredictor(Predictor):
    """A real predictor that first waits for ``gate``: holds a request in flight on demand."""

    def __init__(self, loaded, gate: threading.Event, started: threading.Event | None = None):
        super().__init__(loaded)
        self.gate, self.started = gate, started or threading.Event()
        self.calls = 0

    def __call__(self, image, bgr=None):
        self.calls += 1
        self.started.set()
        if not self.gate.wait(20):
            raise RuntimeError("the test never opened the gate")
        return super().__call__(image, bgr)


@contextmanager
def live_server(app) -> Iterator[tuple[uvicorn.Server, threading.Thread, str]]:
    """``app`` under a real uvicorn on a free 127.0.0.1 port: (server, its thread, base URL)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield server, thread, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)

"""Load test of ``detseg serve``: requests/s and latency at 1, 4 and 16 clients, flat memory,
no failures under the queue limit and clean 503s above it.

The server runs as ``python -m detseg serve`` in a subprocess on 127.0.0.1 (a free port) with two
small models and seeded random weights, saved first as our checkpoints (so the real start-up path
loads them): a semantic U-Net (``unet``, ``base_channels=16``, 11 classes) and a detector
(``fcos_mnv2_fpn``: MobileNetV2-FPN FCOS, 80 classes, pre-NMS threshold 0 so every request pays
for NMS and answers 100 boxes; input longest side 320). The request image is one synthetic
320x240 PNG; each request asks for JSON (``label_map_png`` / boxes).

Phases, per model: 4 warm-up requests, then ``--requests`` per level at 1, 4 and 16 concurrent
clients (each client sends its next request when its previous answer arrives), then an overfill
phase of ``3 x capacity`` clients at once, where ``capacity = workers + queue_size`` per model;
there every answer must be 200 or a JSON 503 with ``Retry-After``. The levels stay at or below
the capacity (queue size 16 by default: capacity 17), where every answer must be 200. The server's
RSS is sampled every 50 ms; its start (after warm-up), peak and end are printed, and the server
is stopped with SIGTERM (graceful) at the end. A global ``--deadline`` stops everything.

Run from the repository root (nice, one torch thread in the server)::

    PYTHONPATH=$PWD nice -n 10 python bench/serve.py [--requests 48] [--out runs/serve_bench.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

MODELS = {  # route name: constructor kwargs of the random-weight checkpoint
    "unet": {"num_classes": 11, "base_channels": 16},
    "fcos_mnv2_fpn": {"num_classes": 80, "score_thresh": 0.0},
}
LEVELS = (1, 4, 16)


def save_checkpoints(folder: Path) -> list[Path]:
    """Seeded random-weight checkpoints of ``MODELS``."""
    import torch

    from detseg.api import load_model
    from detseg.checkpoint import save_checkpoint

    torch.manual_seed(0)
    paths = []
    for name, kwargs in MODELS.items():
        loaded = load_model(name, device="cpu", **kwargs)
        meta = loaded.checkpoint_meta()
        if loaded.task == "detection":
            meta.extra["max_size"] = 320  # what `detseg train` records; the server reads it
        paths.append(folder / f"{name}.safetensors")
        save_checkpoint(paths[-1], loaded.model, meta)
    return paths


def request_image() -> bytes:
    """A synthetic 320x240 RGB PNG: smooth gradients with a few bright rectangles."""
    y, x = np.mgrid[0:240, 0:320]
    img = np.stack([x * 255 // 319, y * 255 // 239, (x + y) * 255 // 558], axis=2).astype(np.uint8)
    for i in range(4):
        img[30 + 40 * i : 70 + 40 * i, 40 + 60 * i : 90 + 60 * i] = (250, 240 - 50 * i, 30 * i)
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` (MiB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


class RssSampler(threading.Thread):
    """Samples the server's RSS every ``period`` seconds; ``peak`` since the last ``reset``."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.period, self.peak, self.stop = pid, period, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.period):
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except (OSError, RuntimeError):
                return


async def _client(client: httpx.AsyncClient, url: str, body: bytes, n: int, out: list) -> None:
    for _ in range(n):
        start = time.perf_counter()
        reply = await client.post(url, content=body, headers={"content-type": "image/png"})
        out.append((reply.status_code, time.perf_counter() - start, reply))


async def phase(base: str, model: str, body: bytes, clients: int, total: int) -> dict[str, Any]:
    """``total`` requests from ``clients`` concurrent clients; counts and latency percentiles."""
    results: list[tuple[int, float, httpx.Response]] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    per_client = [total // clients + (i < total % clients) for i in range(clients)]
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:
        start = time.perf_counter()
        await asyncio.gather(
            *(_client(client, f"/v1/predict/{model}", body, n, results) for n in per_client)
        )
        wall = time.perf_counter() - start
    ok = [lat for status, lat, _ in results if status == 200]
    refused = [r for status, _, r in results if status == 503]
    clean = all(
        r.headers.get("retry-after") == "1" and r.json()["error"]["status"] == 503 for r in refused
    )
    return {
        "model": model,
        "clients": clients,
        "requests": len(results),
        "ok": len(ok),
        "503": len(refused),
        "clean_503": clean,
        "other": len(results) - len(ok) - len(refused),
        "req_s": len(ok) / wall,
        "p50_ms": 1000 * statistics.median(ok) if ok else float("nan"),
        "p99_ms": 1000 * float(np.percentile(ok, 99)) if ok else float("nan"),
    }


def start_server(
    files: list[Path], port: int, queue_size: int, workers: int, log: Path
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "detseg", "serve", "--port", str(port), "--device", "cpu"]
    cmd += ["--queue-size", str(queue_size), "--workers", str(workers), "--score-threshold", "0"]
    for f in files:
        cmd += ["--weights", str(f)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("wb") as stderr:  # a file, not a pipe: a full pipe would stall the server
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def wait_healthy(base: str, server: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become healthy")


async def run_all(base: str, body: bytes, args: argparse.Namespace, rss: RssSampler, pid: int):
    rows = []
    for model in MODELS:
        await phase(base, model, body, 1, 4)
    memory = {"start_mb": rss_mb(pid)}
    rss.peak = memory["start_mb"]
    capacity = args.workers + args.queue_size
    for model in MODELS:
        for clients in LEVELS:
            rows.append(await phase(base, model, body, clients, max(args.requests, clients)))
        over = 3 * capacity
        rows.append(await phase(base, model, body, over, 2 * over))
    memory.update(peak_mb=rss.peak, end_mb=rss_mb(pid))
    return rows, memory


def table(rows: list[dict[str, Any]], memory: dict[str, float], capacity: int) -> str:
    lines = [
        "| model | clients | requests | 200 | 503 | other | req/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = f"{r['clients']}" + (" (overfill)" if r["clients"] > capacity else "")
        lines.append(
            f"| {r['model']} | {label} | {r['requests']} | {r['ok']} | {r['503']} | {r['other']} "
            f"| {r['req_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |"
        )
    lines.append("")
    lines.append(
        f"server RSS: start {memory['start_mb']:.0f} MiB (after warm-up), "
        f"peak {memory['peak_mb']:.0f} MiB, end {memory['end_mb']:.0f} MiB"
    )
    return "\n".join(lines)


def check(rows: list[dict[str, Any]], capacity: int) -> list[str]:
    """The acceptance rules; returns the violations."""
    problems = []
    for r in rows:
        if r["other"]:
            problems.append(
                f"{r['model']} x{r['clients']}: {r['other']} answers neither 200 nor 503"
            )
        if r["clients"] <= capacity and r["ok"] != r["requests"]:
            problems.append(f"{r['model']} x{r['clients']}: failures below the queue limit")
        if r["clients"] > capacity and not (r["503"] and r["clean_503"]):
            problems.append(f"{r['model']} x{r['clients']}: no clean 503s above the queue limit")
    return problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--requests", type=int, default=48, help="Requests per level (at least clients)."
    )
    p.add_argument("--queue-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--deadline", type=float, default=900, help="Seconds before everything stops.")
    p.add_argument("--out", type=Path, default=None, help="Also write the rows as JSON here.")
    args = p.parse_args()
    capacity = args.workers + args.queue_size
    with tempfile.TemporaryDirectory() as tmp:
        files = save_checkpoints(Path(tmp))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "server.log"
        server = start_server(files, port, args.queue_size, args.workers, log)
        try:
            wait_healthy(base, server, log)
            rss = RssSampler(server.pid)
            rss.start()
            coro = run_all(base, request_image(), args, rss, server.pid)
            rows, memory = asyncio.run(asyncio.wait_for(coro, args.deadline))
            rss.stop.set()
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                code = server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                code = "killed"
        graceful = "Application shutdown complete" in log.read_text()
    print(table(rows, memory, capacity))
    # uvicorn re-raises the SIGTERM it caught once its graceful shutdown is done: exit -15
    print(f"server after SIGTERM: exit {code}, graceful shutdown logged: {graceful}")
    print(
        f"capacity per model: {capacity} ({args.workers} worker threads + queue {args.queue_size})"
    )
    problems = check(rows, capacity) + ([] if graceful else ["no graceful shutdown"])
    print("\n".join(problems) if problems else "all checks passed")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {"rows": rows, "memory": memory, "exit": code, "graceful": graceful}
        args.out.write_text(json.dumps(summary, indent=1))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()

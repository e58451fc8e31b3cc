"""Limits and faults: a bounded queue with 503s, timeouts (504) that keep their slot, inference off
the event loop, models loaded once, and a shutdown that finishes the requests in flight."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

import detseg.api
from detseg.checkpoint import save_checkpoint
from detseg.errors import DetsegError
from detseg.serve.app import create_app
from detseg.serve.limits import ServeLimits
from detseg.serve.run import load_predictors, pair_weights
from tests.serve.tiny import TINY, image, live_server, png

DATA = png(image())


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def _until(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never met"
        await asyncio.sleep(0.01)


def test_full_queue_answers_503_at_once_and_the_queued_requests_finish(gated) -> None:
    gate = threading.Event()
    app = create_app({"unet": gated(gate)}, ServeLimits(queue_size=2, workers=1))
    worker = app.state.workers["unet"]

    async def scenario() -> None:
        async with _client(app) as client:
            held = [
                asyncio.create_task(client.post("/v1/predict/unet", content=DATA)) for _ in range(3)
            ]
            await _until(lambda: worker.busy == 3)
            refused = [await client.post("/v1/predict/unet", content=DATA) for _ in range(2)]
            assert [r.status_code for r in refused] == [503, 503]
            assert refused[0].headers["retry-after"] == "1"
            assert "busy" in refused[0].json()["error"]["message"]
            assert worker.busy == 3  # the refused ones took no slot
            gate.set()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200, 200]
        assert worker.busy == 0

    asyncio.run(scenario())


def test_timeout_answers_504_keeps_the_slot_and_cancels_waiting_jobs(gated) -> None:
    gate = threading.Event()
    predictor = gated(gate)
    app = create_app({"unet": predictor}, ServeLimits(queue_size=1, workers=1, timeout_s=0.3))
    worker = app.state.workers["unet"]

    async def scenario() -> None:
        async with _client(app) as client:
            first, second = await asyncio.gather(
                client.post("/v1/predict/unet", content=DATA),
                client.post("/v1/predict/unet", content=DATA),
            )
            assert (first.status_code, second.status_code) == (504, 504)
            assert "within 0.3 s" in first.json()["error"]["message"]
            assert worker.busy == 1  # the running job still holds its thread; the waiting one left
            gate.set()
            await _until(lambda: worker.busy == 0)
            assert predictor.calls == 1  # the job that timed out while queued never ran
            assert (await client.post("/v1/predict/unet", content=DATA)).status_code == 200

    asyncio.run(scenario())


def test_a_body_that_does_not_arrive_answers_408(predictors) -> None:
    app = create_app({"unet": predictors["unet"]}, ServeLimits(timeout_s=0.3))

    async def trickle():
        yield DATA[:100]
        await asyncio.sleep(5)
        yield DATA[100:]

    async def scenario() -> None:
        async with _client(app) as client:
            reply = await client.post("/v1/predict/unet", content=trickle())
            assert reply.status_code == 408 and "did not arrive" in reply.json()["error"]["message"]

    asyncio.run(scenario())


def test_inference_runs_off_the_event_loop(gated) -> None:
    gate, started = threading.Event(), threading.Event()
    app = create_app({"unet": gated(gate, started)})

    async def scenario() -> None:
        async with _client(app) as client:
            held = asyncio.create_task(client.post("/v1/predict/unet", content=DATA))
            await _until(started.is_set)
            t0 = time.monotonic()
            assert (await client.get("/healthz")).status_code == 200
            assert time.monotonic() - t0 < 2.0 and not held.done()
            gate.set()
            assert (await held).status_code == 200

    asyncio.run(scenario())


def test_shutdown_finishes_requests_in_flight(gated) -> None:
    gate, started = threading.Event(), threading.Event()
    app = create_app({"unet": gated(gate, started)})
    replies: list[httpx.Response] = []
    with live_server(app) as (server, serving, url):
        request = threading.Thread(
            target=lambda: replies.append(
                httpx.post(f"{url}/v1/predict/unet", content=DATA, timeout=30)
            )
        )
        request.start()
        assert started.wait(20)
        server.should_exit = True  # what SIGTERM / Ctrl-C do
        time.sleep(0.5)
        assert serving.is_alive()  # waiting for the request in flight
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=2)  # no new connections
        gate.set()
        request.join(20)
        serving.join(20)
    assert replies and replies[0].status_code == 200 and replies[0].json()["task"] == "semantic"
    assert not serving.is_alive()
    assert app.state.workers["unet"]._executor._shutdown  # the model threads were stopped


def _tiny_checkpoint(folder, name: str) -> str:
    loaded = detseg.api.load_model(name, device="cpu", **TINY[name])
    path = folder / f"{name}.safetensors"
    save_checkpoint(path, loaded.model, loaded.checkpoint_meta())
    return str(path)


def test_models_are_loaded_once_at_start_up(monkeypatch, tmp_path) -> None:
    files = [_tiny_checkpoint(tmp_path, name) for name in ("unet", "fcos_mnv2_fpn")]
    loads = []
    real = detseg.api.load_model

    def counting(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(detseg.api, "load_model", counting)
    predictors = load_predictors(pair_weights([], files), "cpu")
    assert len(loads) == 2 and set(predictors) == {"unet", "fcos_mnv2_fpn"}
    with pytest.raises(DetsegError, match="given twice"):
        load_predictors([(None, files[0]), ("unet", files[0])], "cpu")

    async def scenario() -> None:
        async with _client(create_app(predictors)) as client:
            listed = (await client.get("/v1/models")).json()["models"]
            assert {m["weights"] for m in listed} == {"file"}
            for _ in range(3):
                assert (await client.post("/v1/predict/unet", content=DATA)).status_code == 200

    asyncio.run(scenario())
    assert len(loads) == 4  # the two above and the two of the duplicate check; none per request


def test_model_and_weights_lists_pair_by_position() -> None:
    assert pair_weights(["a", "b"], ["x", "y"]) == [("a", "x"), ("b", "y")]
    assert pair_weights(["a"], None) == [("a", None)]
    assert pair_weights(["a", "b"], ["random", "y"]) == [("a", None), ("b", "y")]
    assert pair_weights([], ["x.safetensors"]) == [(None, "x.safetensors")]
    with pytest.raises(DetsegError, match="one --weights per --model"):
        pair_weights(["a", "b"], ["x"])
    with pytest.raises(DetsegError, match="--model NAME"):
        pair_weights([], [])


def test_cli_reports_unpaired_weights_in_one_line() -> None:
    from typer.testing import CliRunner

    from detseg.cli import app

    result = CliRunner().invoke(
        app, ["serve", "--model", "unet", "--model", "fcn8s", "--weights", "x"]
    )
    assert result.exit_code == 2
    assert "detseg: error:" in result.output and "one --weights per --model" in result.output

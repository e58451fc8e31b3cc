"""The FastAPI application: routes, content negotiation and JSON errors.

``create_app({"unet": Predictor(...)}, ServeLimits())`` serves already-loaded models; ``run.py``
loads them once and hands the app to uvicorn. Every error, of every route, is
``{"error": {"status": ..., "message": ...}}`` with the matching status code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from detseg.data.images import decode_image
from detseg.errors import DetsegError, UnknownModelError
from detseg.predictor import Predictor
from detseg.serve.encoding import png_bytes, prediction_json
from detseg.serve.limits import BodyLimitMiddleware, ServeLimits, error_body
from detseg.serve.pool import BodyTimeout, ModelWorker, QueueFull, RequestTimeout
from detseg.serve.schemas import ErrorResponse, Health, ModelsResponse, PredictionResponse

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("detseg.serve")

_BINARY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image as a multipart file `image` (and `bgr`, the background plate "
        "of BGMv2 models), or the raw encoded image (PNG, JPEG, ...) as the whole body.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "bgr": {"type": "string", "format": "binary"},
                    },
                }
            },
            "application/octet-stream": _BINARY,
            "image/*": _BINARY,
        },
    }
}
ERRORS = {"model": ErrorResponse}
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON by default; with `Accept: image/png` the picture: the overlay "
        "(semantic, detection, instance) or the RGBA cut-out (matting).",
        "content": {"image/png": _BINARY},
    },
    404: {**ERRORS, "description": "No such model on this server."},
    408: {**ERRORS, "description": "The body did not arrive within the server's timeout."},
    413: {**ERRORS, "description": "The request body is over the size limit."},
    422: {**ERRORS, "description": "Not an image, too many pixels, or bad options."},
    503: {**ERRORS, "description": "The model's queue is full (Retry-After: 1)."},
    504: {**ERRORS, "description": "No answer within the server's timeout (after the body)."},
}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The JSON error body with ``status``."""
    body = error_body(status, " ".join(str(message).split()))
    return Response(body, status, headers=headers, media_type="application/json")


def predict_options(
    score_threshold: float | None = Query(
        None, ge=0, le=1, description="detection/instance: keep detections at or above it."
    ),
    slice: int | None = Query(None, ge=16, description="detection: sliced inference tile."),
    overlap: float | None = Query(None, ge=0, lt=1, description="detection: slice overlap."),
    merge: str | None = Query(None, pattern="^(nms|nmm)$", description="detection: nms or nmm."),
    match: str | None = Query(None, pattern="^(iou|ios)$", description="detection: iou or ios."),
    full_image: bool | None = Query(None, description="detection: add a whole-image pass."),
    max_size: int | None = Query(
        None, ge=32, le=8192, description="detection/instance: longest input side."
    ),
    sliding: bool | None = Query(None, description="semantic: sliding-window inference."),
    crop: int | None = Query(None, ge=16, le=4096, description="semantic: window size."),
    stride: int | None = Query(None, ge=1, description="semantic: window stride."),
    strategy: str | None = Query(
        None, pattern="^(hybrid|resize)$", description="GFM matting: test-time strategy."
    ),
) -> dict[str, Any]:
    """The ``Predictor`` options a request sets (the others keep the served defaults)."""
    given = dict(
        score_threshold=score_threshold,
        slice=slice,
        overlap=overlap,
        merge=merge,
        match=match,
        full_image=full_image,
        max_size=max_size,
        sliding=sliding,
        crop=crop,
        stride=stride,
        strategy=strategy,
    )
    return {k: v for k, v in given.items() if v is not None}


def wants_png(accept: str) -> bool:
    """True when ``Accept`` names image/png before application/json."""
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in ("image/png", "application/json"):
            return media == "image/png"
    return False


async def _read_inputs(request: Request, timeout_s: float) -> tuple[bytes, bytes | None]:
    """(image bytes, plate bytes or None) from a multipart form or a raw body.

    Raises:
        BodyTimeout: the body did not arrive within ``timeout_s``. DetsegError: a bad form.
    """
    try:
        return await asyncio.wait_for(_inputs(request), timeout_s)
    except asyncio.TimeoutError as exc:
        raise BodyTimeout(
            f"the request body did not arrive within {timeout_s:g} s; send it at once."
        ) from exc
    except HTTPException as exc:  # Starlette's multipart parser rejects a malformed form
        raise DetsegError(f"bad multipart body: {exc.detail}") from exc


async def _inputs(request: Request) -> tuple[bytes, bytes | None]:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await request.body(), None
    async with request.form(max_files=2, max_fields=16) as form:
        files = {key: value for key, value in form.items() if isinstance(value, UploadFile)}
        if "image" not in files:
            raise DetsegError("the multipart body needs a file field named 'image'.")
        plate = await files["bgr"].read() if "bgr" in files else None
        return await files["image"].read(), plate


def _job(
    worker: ModelWorker,
    options: dict[str, Any],
    data: bytes,
    plate: bytes | None,
    png: bool,
    max_pixels: int,
) -> Response:
    """Decode, predict and encode one request (runs on the model's thread)."""
    start = time.perf_counter()
    predictor = worker.predictor
    if options:
        predictor = predictor.with_options(**options)
    if plate is not None and not predictor.needs_plate:
        raise DetsegError(f"model {worker.name!r} takes no background plate; drop 'bgr'.")
    advice = "send a smaller image (or start the server with a larger --max-pixels)"
    image = decode_image(data, "image", max_pixels, advice)
    bgr = decode_image(plate, "bgr", max_pixels, advice) if plate is not None else None
    prediction = predictor(image, bgr)
    if png:
        return Response(png_bytes(prediction.render(image)), media_type="image/png")
    elapsed = (time.perf_counter() - start) * 1000.0
    return JSONResponse(prediction_json(prediction, worker.name, elapsed))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        parts = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        return error_response(422, "; ".join(parts) or "invalid request.")

    @app.exception_handler(QueueFull)
    async def full(_: Request, exc: QueueFull) -> Response:
        return error_response(503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(BodyTimeout)
    async def slow_body(_: Request, exc: BodyTimeout) -> Response:
        return error_response(408, str(exc))

    @app.exception_handler(RequestTimeout)
    async def timeout(_: Request, exc: RequestTimeout) -> Response:
        return error_response(504, str(exc))

    @app.exception_handler(UnknownModelError)
    async def unknown(_: Request, exc: UnknownModelError) -> Response:
        return error_response(404, str(exc))

    @app.exception_handler(DetsegError)
    async def user_error(_: Request, exc: DetsegError) -> Response:
        return error_response(422, str(exc))

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception) -> Response:
        log.exception("request failed", exc_info=exc)
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log.")


def create_app(predictors: Mapping[str, Predictor], limits: ServeLimits | None = None) -> FastAPI:
    """The server for already-loaded models.

    Args:
        predictors: route name -> ``Predictor`` (its options are the served defaults; a request's
            query options replace some of them).
        limits: body, pixel, queue and time limits.
    """
    limits = limits or ServeLimits()
    if not predictors:
        raise DetsegError("serve at least one model (--model NAME).")
    workers = {
        name: ModelWorker(name, p, limits.workers, limits.queue_size)
        for name, p in predictors.items()
    }

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for worker in workers.values():  # uvicorn has already let in-flight requests finish
            worker.close()

    app = FastAPI(
        title="detseg",
        summary="Detection, segmentation and matting models over HTTP.",
        version="1",
        lifespan=lifespan,
    )
    app.state.workers = workers
    app.state.limits = limits
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    _install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def worker_of(model: str) -> ModelWorker:
        if model not in workers:
            raise UnknownModelError(
                f"no model {model!r} on this server; it serves {', '.join(sorted(workers))}."
            )
        return workers[model]

    @app.get("/", response_class=HTMLResponse, summary="The web page.")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz", response_model=Health, summary="Liveness: the models are loaded.")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "models": len(workers)}

    @app.get("/v1/models", response_model=ModelsResponse, summary="The models served.")
    async def models() -> dict[str, Any]:
        return {"models": [w.info() for w in workers.values()]}

    @app.post(
        "/v1/predict/{model}",
        response_model=PredictionResponse,
        responses=PREDICT_RESPONSES,
        openapi_extra=PREDICT_BODY,
        summary="Predict one image.",
    )
    async def predict(
        model: str, request: Request, opts: dict[str, Any] = Depends(predict_options)
    ) -> Response:
        worker = worker_of(model)
        if worker.is_full():  # refuse before reading the body
            raise QueueFull(f"model {model!r} is busy; retry shortly.")
        data, plate = await _read_inputs(request, limits.timeout_s)
        png = wants_png(request.headers.get("accept", ""))
        return await worker.run(
            lambda: _job(worker, opts, data, plate, png, limits.max_pixels), limits.timeout_s
        )

    return app

"""The routes: JSON and PNG answers equal the in-memory predictor's, errors are JSON with the
right status, and the OpenAPI schema documents exactly what the server answers."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from fastapi.testclient import TestClient

from detseg.serve.app import create_app, wants_png
from detseg.serve.encoding import alpha_map
from detseg.serve.limits import ServeLimits
from detseg.serve.schemas import ErrorResponse, PredictionResponse
from tests.serve.tiny import decode_png, image, png


@pytest.fixture(scope="module")
def client(predictors):
    limits = ServeLimits(max_body_bytes=60_000, max_pixels=20_000)
    with TestClient(create_app(predictors, limits)) as c:
        yield c


def _error(response, status: int, text: str) -> None:
    assert response.status_code == status, response.text
    body = ErrorResponse.model_validate(response.json())
    assert body.error.status == status and text in body.error.message


def _predict(client, model: str, data: bytes, plate: bytes | None = None, **kw):
    files = {"image": ("a.png", data, "image/png")}
    if plate is not None:
        files["bgr"] = ("b.png", plate, "image/png")
    return client.post(f"/v1/predict/{model}", files=files, **kw)


def test_models_and_health(client, predictors) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "models": len(predictors)}
    listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(listed) == set(predictors)
    assert listed["bgmv2_base_mobilenetv2"]["needs_plate"] is True
    assert listed["unet"]["task"] == "semantic" and listed["unet"]["needs_plate"] is False


def test_json_answers_equal_the_predictor(client, predictors) -> None:
    img, plate = image(), image(seed=1)
    for name, predictor in predictors.items():
        expected = predictor(img, plate if predictor.needs_plate else None)
        reply = _predict(client, name, png(img), png(plate) if predictor.needs_plate else None)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        PredictionResponse.model_validate(body)
        summary = expected.to_json()
        for key in summary:
            assert body[key] == summary[key], (name, key)
        if expected.labels is not None:
            assert np.array_equal(
                decode_png(base64.b64decode(body["label_map_png"])), expected.labels
            )
        if expected.alpha is not None:
            got = decode_png(base64.b64decode(body["alpha_png"]))
            assert np.array_equal(got, alpha_map(expected.alpha))


def test_png_answer_is_the_rendered_picture(client, predictors) -> None:
    img, plate = image(), image(seed=1)
    semantic = _predict(client, "unet", png(img), headers={"accept": "image/png"})
    assert semantic.headers["content-type"] == "image/png"
    assert np.array_equal(decode_png(semantic.content), predictors["unet"](img).render(img))
    matte = _predict(
        client, "bgmv2_base_mobilenetv2", png(img), png(plate), headers={"accept": "image/png"}
    )
    assert decode_png(matte.content).shape == (*img.shape[:2], 4)


def test_raw_body_equals_multipart(client) -> None:
    data = png(image())
    raw = client.post("/v1/predict/unet", content=data, headers={"content-type": "image/png"})
    form = _predict(client, "unet", data)
    assert raw.status_code == form.status_code == 200
    assert raw.json()["label_map_png"] == form.json()["label_map_png"]


def test_query_options_reach_the_predictor(client) -> None:
    data = png(image())
    everything = client.post("/v1/predict/fcos_mnv2_fpn?score_threshold=0", content=data).json()
    nothing = client.post("/v1/predict/fcos_mnv2_fpn?score_threshold=1", content=data).json()
    assert len(everything["detections"]) > 0 and nothing["detections"] == []
    sliced = client.post("/v1/predict/fcos_mnv2_fpn?score_threshold=0&slice=32", content=data)
    assert sliced.status_code == 200 and sliced.json()["detections"] != everything["detections"]


def test_accept_negotiation() -> None:
    assert wants_png("image/png") and wants_png("image/png, application/json;q=0.5")
    assert not wants_png("application/json, image/png") and not wants_png("*/*")


def test_errors_are_json_with_the_right_status(client) -> None:
    data = png(image())
    _error(client.post("/v1/predict/nope", content=data), 404, "no model 'nope'")
    _error(client.post("/v1/predict/unet", content=b"not an image"), 422, "not a readable image")
    _error(client.post("/v1/predict/unet", content=b""), 422, "empty")
    _error(client.post("/v1/predict/unet?score_threshold=2", content=data), 422, "score_threshold")
    _error(client.post("/v1/predict/unet?slice=64", content=data), 422, "slicing")
    _error(client.post("/v1/predict/bgmv2_base_mobilenetv2", content=data), 422, "background plate")
    _error(_predict(client, "unet", data, data), 422, "takes no background plate")
    small = png(image(24, 32))
    _error(_predict(client, "bgmv2_base_mobilenetv2", data, small), 422, "differ in size")
    _error(client.post("/v1/predict/unet", files={"other": ("a", data)}), 422, "named 'image'")
    many = {f"f{i}": str(i) for i in range(20)}
    _error(
        client.post("/v1/predict/unet", data=many, files={"image": ("a", data)}), 422, "multipart"
    )
    _error(
        client.post("/v1/predict/unet", content=png(np.zeros((200, 120, 3), np.uint8))),
        422,
        "20,000",
    )
    _error(client.post("/v1/predict/unet", content=b"\0" * 70_000), 413, "60,000 bytes")
    chunks = (b"\0" * 10_000 for _ in range(7))  # no Content-Length: counted while streaming
    _error(client.post("/v1/predict/unet", content=chunks), 413, "60,000 bytes")
    _error(client.get("/v1/nothing"), 404, "Not Found")
    _error(client.get("/v1/predict/unet"), 405, "Method Not Allowed")


def test_openapi_schema_is_true(client) -> None:
    """Every documented route answers as documented; every route is documented."""
    schema = client.get("/openapi.json").json()
    models = {"PredictionResponse": PredictionResponse, "ErrorResponse": ErrorResponse}
    models |= {m.__name__: m for m in _documented_models()}
    calls = {
        ("get", "/"): lambda: client.get("/"),
        ("get", "/healthz"): lambda: client.get("/healthz"),
        ("get", "/v1/models"): lambda: client.get("/v1/models"),
        ("post", "/v1/predict/{model}"): lambda: _predict(client, "unet", png(image())),
    }
    documented = {(m, p) for p, ops in schema["paths"].items() for m in ops}
    assert documented == set(calls)
    served = {
        (m.lower(), r.path)
        for r in client.app.routes
        if getattr(r, "include_in_schema", False)
        for m in r.methods
    }
    assert served == documented
    for (method, path), call in calls.items():
        reply = call()
        spec = schema["paths"][path][method]["responses"][str(reply.status_code)]
        media = reply.headers["content-type"].split(";")[0]
        assert media in spec["content"], (path, media)
        ref = spec["content"][media]["schema"].get("$ref")
        if ref:
            models[ref.rsplit("/", 1)[1]].model_validate(reply.json())
    predict = schema["paths"]["/v1/predict/{model}"]["post"]
    assert {"multipart/form-data", "application/octet-stream"} <= set(
        predict["requestBody"]["content"]
    )
    assert {"200", "404", "408", "413", "422", "503", "504"} == set(predict["responses"])
    params = {p["name"] for p in predict["parameters"]}
    assert {"model", "score_threshold", "slice", "sliding", "max_size"} <= params


def _documented_models() -> list:
    from detseg.serve import schemas

    return [schemas.Health, schemas.ModelsResponse]

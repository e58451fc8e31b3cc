"""Response bodies as pydantic models: what the OpenAPI schema documents and the tests check."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    status: int = Field(description="The HTTP status code, repeated.")
    message: str = Field(description="What is wrong, and what to do.")


class ErrorResponse(BaseModel):
    """Every error of every route."""

    error: ErrorDetail


class ModelInfo(BaseModel):
    name: str
    task: str = Field(description="semantic, detection, instance or matting.")
    classes: list[str]
    needs_plate: bool = Field(description="True when the model needs the background plate `bgr`.")
    weights: str = Field(description="'file' (trained or official weights) or 'random'.")
    device: str
    workers: int
    queue_size: int
    busy: int = Field(description="Requests running or queued now.")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: str = Field(description="'ok'.")
    models: int


class DetectionRecord(BaseModel):
    label: int
    score: float
    box: list[float] = Field(description="[x1, y1, x2, y2] in input pixels.")
    class_: str = Field(alias="class")
    mask: dict[str, Any] | None = Field(
        None, description="instance models: COCO compressed RLE {size: [h, w], counts}."
    )
    area: int | None = Field(None, description="instance models: mask pixels.")


class PredictionResponse(BaseModel):
    """The JSON answer of ``POST /v1/predict/{model}``."""

    model: str
    task: str
    width: int
    height: int
    elapsed_ms: float = Field(description="Decoding, inference and encoding time on the server.")
    classes: dict[str, float] | None = Field(
        None, description="semantic: the fraction of pixels of each predicted class."
    )
    label_map_png: str | None = Field(
        None, description="semantic: base64 PNG of the (H, W) class ids (8-bit, 16-bit past 255)."
    )
    detections: list[DetectionRecord] | None = None
    foreground_fraction: float | None = Field(None, description="matting: mean alpha.")
    alpha_png: str | None = Field(None, description="matting: base64 8-bit PNG of the alpha matte.")

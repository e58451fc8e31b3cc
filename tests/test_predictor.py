"""The in-memory predictor: every task, the same results as the file commands, clear errors."""

import json

import numpy as np
import pytest

from detseg.api import load_model
from detseg.errors import DetsegError, InputFileError
from detseg.predictor import Predictor


def _image(h: int = 64, w: int = 80) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("unet", {"num_classes": 3, "base_channels": 8}),
        ("fcos_mnv2_fpn", {"num_classes": 2}),
        (
            "polarmask_r50",
            {
                "num_classes": 2,
                "backbone": "mobilenet_v2",
                "out_channels": 32,
                "feat_channels": 32,
                "stacked_convs": 1,
            },
        ),
        ("bgmv2_base_mobilenetv2", {}),
    ],
)
def test_every_task_predicts_renders_and_serialises(name: str, kwargs: dict) -> None:
    loaded = load_model(name, device="cpu", **kwargs)
    predictor = Predictor(loaded, score_threshold=0.0, max_size=256)
    image = _image()
    plate = _image() if predictor.needs_plate else None
    prediction = predictor(image, plate)
    assert (prediction.width, prediction.height) == (80, 64)
    picture = prediction.render(image)
    assert picture.dtype == np.uint8 and picture.shape[:2] == (64, 80)
    summary = json.loads(json.dumps(prediction.to_json()))
    assert summary["task"] == loaded.task
    if loaded.task == "semantic":
        assert abs(sum(summary["classes"].values()) - 1) < 1e-3
    if loaded.task == "matting":
        assert picture.shape[2] == 4


def test_semantic_labels_equal_the_file_pipeline() -> None:
    from detseg.semantic.pipeline import segment

    loaded = load_model("unet", device="cpu", num_classes=3, base_channels=8)
    image = _image()
    expected = segment(loaded.model, image, loaded.preprocess)
    assert np.array_equal(Predictor(loaded, exact=True)(image).labels, expected)


def test_fast_path_by_default_within_tolerance_of_the_exact_path() -> None:
    loaded = load_model("bgmv2_base_mobilenetv2", device="cpu")
    image, plate = _image(), _image(64, 80)[::-1].copy()
    fast, exact = Predictor(loaded), Predictor(loaded, exact=True)
    assert fast.loaded.model is not loaded.model and exact.loaded.model is loaded.model
    np.testing.assert_allclose(fast(image, plate).alpha, exact(image, plate).alpha, atol=1e-4)
    with pytest.raises(DetsegError, match="--exact"):
        Predictor(loaded, exact=True, precision="bf16")


def test_bad_inputs_are_clear_errors() -> None:
    loaded = load_model("bgmv2_base_mobilenetv2", device="cpu")
    predictor = Predictor(loaded)
    with pytest.raises(InputFileError, match="background plate"):
        predictor(_image())
    with pytest.raises(InputFileError, match="uint8 RGB"):
        predictor(np.zeros((4, 4), np.float32))
    with pytest.raises(DetsegError, match="slicing"):
        Predictor(load_model("unet", device="cpu", num_classes=2, base_channels=8), slice=64)


def test_with_options_replaces_only_the_given_options() -> None:
    loaded = load_model("fcos_mnv2_fpn", device="cpu", num_classes=2, score_thresh=0.0)
    base = Predictor(loaded, score_threshold=0.0, max_size=128)
    strict = base.with_options(score_threshold=1.0)
    assert strict.loaded is base.loaded and strict.options == {
        **base.options,
        "score_threshold": 1.0,
    }
    image = _image()
    assert len(base(image).detections.scores) > 0 and len(strict(image).detections.scores) == 0

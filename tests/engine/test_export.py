"""ONNX export of every model family (tiny configurations) checked with onnxruntime, and the
onnxruntime stand-in (``--runtime onnx``) against the PyTorch model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detseg.api import load_model
from detseg.engine.export import NotExportable, OnnxSpec, export_loaded, onnx_spec
from detseg.engine.onnx_runtime import load_onnx
from detseg.errors import DetsegError
from detseg.predictor import Predictor
from detseg.registry import list_models

pytest.importorskip("onnxruntime")

_POLAR = {"backbone": "mobilenet_v2", "out_channels": 32, "feat_channels": 64, "stacked_convs": 1}
# registry name -> (constructor overrides, trace size): one per family, small and fast
TINY = {
    "espnet": ({"num_classes": 6}, (48, 64)),
    "pspnet_resnet50": ({"num_classes": 3, "backbone": "resnet18"}, (48, 64)),
    "deeplabv3plus_pointrend": (
        {"num_classes": 3, "backbone": "resnet18", "subdivision_num_points": 64},
        (64, 96),
    ),
    "fcos_mnv2_fpn": ({"num_classes": 3}, (64, 96)),
    "polarmask_r50": ({"num_classes": 3, **_POLAR}, (64, 96)),
    "maskrcnn_r50_fpn": ({"num_classes": 3}, (64, 64)),
    "gfm_r34_2b": ({}, (64, 64)),
    "bgmv2_mobilenetv2": ({"refine_mode": "thresholding", "refine_threshold": 0.0}, (48, 64)),
}
# TensorMask (R50, 24 outputs) is checked in tests/instance/test_tensormask.py (slow).


def _loaded(name: str):
    torch.manual_seed(0)
    return load_model(name, device="cpu", **TINY[name][0])


@pytest.mark.parametrize("name", sorted(TINY))
def test_export_matches_pytorch(name: str, tmp_path) -> None:
    loaded = _loaded(name)
    result = export_loaded(loaded, tmp_path / "m.onnx", *TINY[name][1])
    diffs = result["max_abs_diff"]
    assert diffs and len(diffs) == len(result["outputs"])
    assert result["max_abs_output"] > 1e-3  # a non-trivial graph
    assert max(diffs.values()) <= 1e-4, diffs


def test_every_registered_model_has_a_spec() -> None:
    refused = []
    for entry in list_models():
        with torch.device("meta"):
            model = entry.build()
        try:
            assert isinstance(onnx_spec(model), OnnxSpec)
        except NotExportable:
            refused.append(entry.name)
    assert refused == ["hog_svm"]


def test_spec_sizes() -> None:
    spec = OnnxSpec(size_multiple=32, min_pixels=100_000)
    h, w = spec.size(100, 90)
    assert (h % 32, w % 32) == (0, 0) and h * w >= 100_000 and (h, w) == (512, 384)


def _image(h: int = 70, w: int = 90, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_onnx_runtime_semantic_gives_the_torch_labels(tmp_path) -> None:
    loaded = _loaded("espnet")
    export_loaded(loaded, tmp_path / "m.onnx", 48, 64, check=False)
    onnx = load_onnx(tmp_path / "m.onnx")
    assert onnx.name == "espnet" and onnx.kwargs == loaded.kwargs
    image = _image()  # 70 x 90: ESPNet pads to multiples of 8 inside the graph
    want = Predictor(loaded)(image).labels
    got = Predictor(onnx)(image).labels
    assert got.shape == want.shape == (70, 90)
    assert (got == want).mean() > 0.999  # ties of float rounding may flip a pixel


def test_onnx_runtime_detection_gives_the_torch_boxes(tmp_path) -> None:
    loaded = _loaded("fcos_mnv2_fpn")
    torch.nn.init.constant_(loaded.model.head.cls_logits.bias, 0.0)  # scores above threshold
    export_loaded(loaded, tmp_path / "m.onnx", 64, 96, check=False)
    onnx = load_onnx(tmp_path / "m.onnx")
    image = _image(96, 128)
    want = Predictor(loaded, score_threshold=0.0, max_size=128)(image).detections
    got = Predictor(onnx, score_threshold=0.0, max_size=128)(image).detections
    assert len(want) > 0 and len(got) == len(want)
    assert torch.allclose(got.scores, want.scores, atol=1e-4)
    assert torch.allclose(got.boxes, want.boxes, atol=1e-2)


def test_onnx_runtime_matting_with_plate(tmp_path) -> None:
    loaded = _loaded("bgmv2_mobilenetv2")
    export_loaded(loaded, tmp_path / "m.onnx", 48, 64, check=False)
    onnx = load_onnx(tmp_path / "m.onnx")
    src, plate = _image(48, 64, 1), _image(48, 64, 2)
    want = Predictor(loaded)(src, bgr=plate).alpha
    got = Predictor(onnx)(src, bgr=plate).alpha
    assert np.abs(got - want).max() <= 1e-4


def test_partial_graphs_and_other_files_are_refused(tmp_path) -> None:
    export_loaded(_loaded("maskrcnn_r50_fpn"), tmp_path / "rpn.onnx", 64, 64, check=False)
    with pytest.raises(DetsegError, match="only part"):
        load_onnx(tmp_path / "rpn.onnx")
    with pytest.raises(DetsegError, match="no such"):
        load_onnx(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(DetsegError, match="not a readable"):
        load_onnx(tmp_path / "bad.onnx")


def test_pointrend_graph_refuses_small_inputs(tmp_path) -> None:
    loaded = _loaded("deeplabv3plus_pointrend")
    export_loaded(loaded, tmp_path / "m.onnx", 64, 96, check=False)
    onnx = load_onnx(tmp_path / "m.onnx")
    with pytest.raises(DetsegError, match="at least 256 pixels"):
        onnx.model(torch.rand(1, 3, 8, 8))

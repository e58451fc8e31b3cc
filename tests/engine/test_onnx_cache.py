"""onnxruntime without an export step: graphs exported once into the cache folder and reused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detseg.api import load_model
from detseg.engine import onnx_cache
from detseg.engine.onnx_cache import cache_folder, cached_graph, graph_key, onnx_model
from detseg.errors import DetsegError
from detseg.predictor import Predictor

pytest.importorskip("onnxruntime")


def _espnet(seed: int = 0, num_classes: int = 6):
    torch.manual_seed(seed)
    return load_model("espnet", device="cpu", num_classes=num_classes)


def test_key_follows_weights_and_arguments() -> None:
    a, b = _espnet(), _espnet()
    assert graph_key(a) == graph_key(b)
    assert graph_key(_espnet(seed=1)) != graph_key(a)
    assert graph_key(_espnet(num_classes=5)) != graph_key(a)
    with torch.no_grad():
        b.model.state_dict()[next(iter(b.model.state_dict()))].flatten()[0] += 1e-3
    assert graph_key(b) != graph_key(a)


def test_graph_is_exported_once_and_gives_the_torch_labels(tmp_path, monkeypatch) -> None:
    exports = []
    export = onnx_cache.export_loaded
    monkeypatch.setattr(
        onnx_cache, "export_loaded", lambda *a, **k: exports.append(a[1]) or export(*a, **k)
    )
    loaded = _espnet()
    first = onnx_model(loaded, folder=tmp_path)
    again = onnx_model(_espnet(), folder=tmp_path)
    assert len(exports) == 1 and [p.name for p in tmp_path.iterdir()] == [exports[0].name]
    assert first.runtime == again.runtime == "onnx" and first.weights is None
    assert loaded.runtime == "torch"  # the caller's model is left as it was
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    want = Predictor(loaded)(image).labels
    got = Predictor(again)(image).labels
    assert got.shape == want.shape == (70, 90) and (got == want).mean() > 0.999


def test_partial_graphs_and_unwritable_folders_are_refused(tmp_path) -> None:
    torch.manual_seed(0)
    rcnn = load_model("maskrcnn_r50_fpn", device="cpu", num_classes=3)
    with pytest.raises(DetsegError, match="only part of the model"):
        cached_graph(rcnn, tmp_path)
    with pytest.raises(DetsegError, match="not a network|no ONNX"):
        cached_graph(load_model("hog_svm", device="cpu"), tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DetsegError, match="cannot create the ONNX cache folder"):
        cached_graph(_espnet(), blocker / "onnx")
    assert not list(tmp_path.rglob("*.onnx"))


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DETSEG_CACHE", str(tmp_path / "d"))
    assert cache_folder() == tmp_path / "d" / "onnx"
    monkeypatch.delenv("DETSEG_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_folder() == tmp_path / "x" / "detseg" / "onnx"

"""Video prediction for every task (tiny generated videos), batched prediction, and the
``detseg predict`` video / ``--runtime onnx`` command lines."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from detseg.api import load_model
from detseg.checkpoint import save_checkpoint
from detseg.cli import app
from detseg.data.images import write_image
from detseg.data.video import VideoWriter, read_frames, video_info
from detseg.engine.video import batches, predict_video
from detseg.errors import DetsegError
from detseg.predictor import Predictor

pytest.importorskip("av")
runner = CliRunner()
FPS = Fraction(12, 1)
_POLAR = {"backbone": "mobilenet_v2", "out_channels": 32, "feat_channels": 64, "stacked_convs": 1}


def _frames(count: int = 5, h: int = 48, w: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return [np.roll(base, 3 * i, axis=1) for i in range(count)]  # a panning "scene"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with VideoWriter(path, FPS) as writer:
        for frame in _frames():
            writer.write(frame)
    return path


def _check_output(path, frames: int = 5) -> None:
    info = video_info(path)
    assert (info.fps, info.width, info.height) == (FPS, 64, 48)
    assert len(list(read_frames(path))) == frames


def test_batches_split_in_order() -> None:
    assert [len(b) for b in batches(range(7), 3)] == [3, 3, 1]
    with pytest.raises(DetsegError):
        next(batches(range(3), 0))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("unet", {"num_classes": 3, "base_channels": 4, "depth": 2}),
        ("fcos_mnv2_fpn", {"num_classes": 3}),
        ("polarmask_r50", {"num_classes": 3, **_POLAR}),
        ("bgmv2_mobilenetv2", {"refine_mode": "full"}),
    ],
)
def test_every_task_writes_a_video_with_the_source_fps(name, kwargs, clip, tmp_path) -> None:
    torch.manual_seed(0)
    predictor = Predictor(load_model(name, device="cpu", **kwargs), score_threshold=0.0)
    plate = _frames(1)[0] if predictor.needs_plate else None
    summary = predict_video(predictor, clip, tmp_path, batch_size=2, bgr=plate, progress=False)
    assert summary["frames"] == 5 and summary["fps"] == 12.0
    _check_output(summary["outputs"][0])
    # the annotation is drawn: the output is not the input re-encoded
    first = next(read_frames(summary["outputs"][0])).astype(np.float32)
    assert np.abs(first - next(read_frames(clip))).mean() > 1.0


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("unet", {"num_classes": 3, "base_channels": 4, "depth": 2}), ("fcos_mnv2_fpn", {})],
)
def test_predict_batch_equals_one_by_one(name, kwargs) -> None:
    torch.manual_seed(0)
    loaded = load_model(name, device="cpu", **kwargs)
    if name == "fcos_mnv2_fpn":
        torch.nn.init.constant_(loaded.model.head.cls_logits.bias, 0.0)
    # the reference path: batching must not change a single number (the fast path's
    # channels-last kernels may round differently per batch size)
    predictor = Predictor(loaded, exact=True, score_threshold=0.2)
    frames = _frames(3)
    batch = predictor.predict_batch(frames)
    for frame, together in zip(frames, batch, strict=True):
        alone = predictor(frame)
        assert json.dumps(alone.to_json()) == json.dumps(together.to_json())
    assert any(p.to_json().get("detections") or p.labels is not None for p in batch)


def test_cli_predict_video(clip, tmp_path) -> None:
    result = runner.invoke(
        app,
        ["predict", str(clip), "--model", "fcos_mnv2_fpn", "-o", str(tmp_path), "--json",
         "--video-preset", "ultrafast"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)["images"]
    assert record["frames"] == 5 and record["frames_per_second"] > 0
    _check_output(record["outputs"][0])
    plate_missing = runner.invoke(
        app, ["predict", str(clip), "--model", "bgmv2_mobilenetv2", "-o", str(tmp_path)]
    )
    assert plate_missing.exit_code == 2 and "--bgr" in plate_missing.stderr
    for source, preset, message in ((clip, "quick", "video preset 'quick'"),
                                    (tmp_path / "x.png", "ultrafast", "is for video sources")):  # fmt: skip
        bad = runner.invoke(
            app,
            ["predict", str(source), "--model", "fcos_mnv2_fpn", "-o", str(tmp_path / "bad"),
             "--video-preset", preset],
        )  # fmt: skip
        assert bad.exit_code == 2 and message in bad.stderr and len(bad.stderr.splitlines()) == 1
        assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").rglob("*.mp4"))


def test_cli_runtime_onnx_gives_the_torch_records(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    loaded = load_model("unet", device="cpu", num_classes=3, base_channels=4, depth=2)
    weights = tmp_path / "unet.safetensors"
    save_checkpoint(weights, loaded.model, loaded.checkpoint_meta())
    image = tmp_path / "img.png"
    write_image(image, _frames(1, 45, 61)[0])
    onnx = tmp_path / "unet.onnx"
    exported = runner.invoke(
        app, ["export", "--weights", str(weights), "--model", "unet", "-o", str(onnx),
              "--height", "32", "--width", "32", "--json"]
    )  # fmt: skip
    assert exported.exit_code == 0, exported.output
    runs = {}
    for runtime, extra in (("torch", ["--weights", str(weights)]), ("onnx", ["--onnx", str(onnx)])):
        result = runner.invoke(
            app,
            ["predict", str(image), "--runtime", runtime, *extra, "-o", str(tmp_path / runtime),
             "--json"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        runs[runtime] = json.loads(result.stdout)["images"][0]["classes"]
    # no file: the graph is exported into the cache folder on first use, then reused
    env = {"DETSEG_CACHE": str(tmp_path / "cache")}
    for run in ("cached", "again"):
        result = runner.invoke(
            app,
            ["predict", str(image), "--runtime", "onnx", "--model", "unet", "--weights",
             str(weights), "-o", str(tmp_path / run), "--json"],
            env=env,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        runs[run] = json.loads(result.stdout)["images"][0]["classes"]
    for run in ("onnx", "cached", "again"):
        assert runs[run].keys() == runs["torch"].keys()
        for name, fraction in runs["torch"].items():
            assert abs(runs[run][name] - fraction) <= 1e-3
    assert len(list((tmp_path / "cache" / "onnx").glob("unet-*.onnx"))) == 1
    for extra, message in (
        (["--runtime", "torch", "--onnx", str(onnx)], "--onnx FILE runs with --runtime onnx"),
        (["--runtime", "onnx", "--precision", "bf16"], "--runtime onnx runs the exported graph"),
        (["--runtime", "tvm"], "--runtime 'tvm': use torch or onnx"),
    ):
        bad = runner.invoke(
            app, ["predict", str(image), "--model", "unet", *extra, "-o", str(tmp_path / "bad")]
        )
        assert bad.exit_code == 2 and message in bad.stderr and len(bad.stderr.splitlines()) == 1
    assert not (tmp_path / "bad").exists()

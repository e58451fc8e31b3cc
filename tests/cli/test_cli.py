"""The CLI: every bad input of the issue ends in one stderr line and exit code 2, no partial files."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from detseg.cli import app
from detseg.semantic.demo import make_shapes_dataset

runner = CliRunner()


def _run(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env)


def _assert_user_error(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("detseg: error:"), result.stderr
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), train=2, val=2, size=32)


@pytest.fixture(scope="module")
def unet_ckpt(tmp_path_factory, shapes):
    out = tmp_path_factory.mktemp("run")
    result = _run(
        "train",
        "--model",
        "unet",
        "--model-arg",
        "base_channels=8",
        "--model-arg",
        "depth=2",
        "--data",
        str(shapes),
        "--num-classes",
        "4",
        "--ignore-index",
        "255",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--crop",
        "32",
        "--eval-every",
        "0",
        "--out",
        str(out),
        "--json",
    )
    assert result.exit_code == 0, result.output
    return out / "last.safetensors"


def _png_header_only(path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_models_lists_registered_models():
    result = _run("models", "--json")
    assert result.exit_code == 0
    names = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert {"unet", "deeplabv3plus_resnet50", "fcn_resnet50", "espnet"} <= set(names)
    assert names["espnet"]["official"]
    # spec table 0: 193.0 GMACs at 21 classes; the default build has 2 (classifier 64 -> 2)
    classifier_gflops = 2 * 64 * (21 - 2) * 512 * 512 / 1e9
    assert names["unet"]["gflops_512"] == pytest.approx(2 * 193.0 - classifier_gflops, abs=0.1)


def _models_text(rows: list[dict], width: int, wide: bool) -> str:
    from rich.console import Console

    from detseg.cli import _models_table

    console = Console(width=width, record=True)
    console.print(_models_table(rows, wide, width))
    return console.export_text()


def test_models_table_fits_80_columns_and_wide_shows_everything():
    official = "BackgroundMattingV2 MattingRefine .pth state dict (official release)"
    rows = [
        {"name": "deeplabv3plus_mobilenetv2", "task": "semantic", "params": 13_355_253,
         "gflops_512": 67.6, "official": None, "summary": "DeepLabV3+ " * 10},
        {"name": "bgmv2_resnet101", "task": "matting", "params": 59_240_000,
         "gflops_512": None, "official": official, "summary": "photo + plate -> alpha"},
    ]  # fmt: skip
    for width, wide in [(80, False), (100, False), (80, True), (200, True)]:
        lines = _models_text(rows, width, wide).splitlines()
        assert max(len(line) for line in lines) <= width
        text = "\n".join(lines)
        assert "deeplabv3plus_mobilenetv2" in text and "13.36 M" in text and "67.6" in text
        assert ("summary" in text) == (width == 100 or wide)
        assert ("state dict (official release)" in text) == (width == 200)  # wide: in full
        if not wide:  # one line per model
            assert sum("bgmv2_resnet101" in line for line in lines) == 1


def test_unknown_model():
    _assert_user_error(_run("predict", "x.png", "--model", "unetz"), "unknown model 'unetz'")


def test_predict_writes_overlays_and_labels(tmp_path, shapes, unet_ckpt):
    result = _run(
        "predict", str(shapes / "val"), "--weights", str(unet_ckpt), "-o", str(tmp_path), "--json"
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["model"] == "unet" and len(payload["images"]) == 2
    from detseg.api import load_model

    assert load_model(weights=unet_ckpt).kwargs == {
        "num_classes": 4,
        "base_channels": 8,
        "depth": 2,
    }
    label = np.asarray(Image.open(tmp_path / "0000_label.png"))
    assert label.shape == (32, 32) and label.max() < 4
    assert (tmp_path / "0000_overlay.png").is_file()


def test_bad_images(tmp_path, unet_ckpt):
    out = tmp_path / "out"
    _assert_user_error(
        _run("predict", str(tmp_path / "missing.png"), "--weights", str(unet_ckpt), "-o", str(out)),
        "no such file",
    )
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    _assert_user_error(
        _run("predict", str(tmp_path / "trunc.png"), "--weights", str(unet_ckpt), "-o", str(out)),
        "trunc.png",
    )
    _png_header_only(tmp_path / "zero.png", 0, 10)
    _assert_user_error(
        _run("predict", str(tmp_path / "zero.png"), "--weights", str(unet_ckpt), "-o", str(out)),
        "zero.png",
    )
    _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    _assert_user_error(
        _run("predict", str(tmp_path / "bomb.png"), "--weights", str(unet_ckpt), "-o", str(out)),
        "decompression bomb",
    )
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_wrong_model_checkpoint_and_malicious_pickle(tmp_path, unet_ckpt):
    _assert_user_error(
        _run("predict", "x.png", "--model", "fcn_resnet18", "--weights", str(unet_ckpt)),
        "is a checkpoint of model 'unet'",
    )
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    _assert_user_error(
        _run("predict", "x.png", "--model", "unet", "--weights", str(tmp_path / "other.pth")),
        "no official weights format",
    )
    _assert_user_error(
        _run("predict", "x.png", "--model", "espnet", "--weights", str(tmp_path / "other.pth")),
        "other.pth",
    )

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /tmp/detseg_cli_pwned",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"w": Evil()}))
    _assert_user_error(
        _run("predict", "x.png", "--model", "unet", "--weights", str(tmp_path / "evil.pth")),
        "refused",
    )
    assert not os.path.exists("/tmp/detseg_cli_pwned")


def test_predict_exact_and_fast_paths_agree(tmp_path, shapes, unet_ckpt):
    outputs = {}
    for flags in (["--exact"], [], ["--precision", "bf16"]):
        out = tmp_path / ("_".join(flags) or "fast")
        args = ["predict", str(shapes / "val"), "--weights", str(unet_ckpt), "-o", str(out)]
        result = _run(*args, *flags, "--json")
        assert result.exit_code == 0, result.output
        outputs[out.name] = np.asarray(Image.open(out / "0000_label.png"))
    exact = outputs.pop("--exact")
    np.testing.assert_array_equal(outputs["fast"], exact)
    assert (outputs["--precision_bf16"] == exact).mean() > 0.9
    args = ["predict", str(shapes / "val"), "--weights", str(unet_ckpt), "-o", str(tmp_path)]
    _assert_user_error(_run(*args, "--exact", "--precision", "bf16"), "--exact")
    _assert_user_error(_run(*args, "--precision", "fp8"), "--precision")


def test_eval_saved_predictions_and_bad_labels(tmp_path, shapes):
    preds = tmp_path / "preds"
    preds.mkdir()
    for name in ("0000.png", "0001.png"):
        label = np.asarray(Image.open(shapes / "valannot" / name))
        Image.fromarray(label).save(preds / name)
    args = ["eval", "--data", str(shapes), "--split", "val", "--pred", str(preds),
            "--num-classes", "4", "--ignore-index", "255"]  # fmt: skip
    ok = _run(*args, "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["mIoU"] == pytest.approx(100.0)
    Image.fromarray(np.full((32, 32), 50, np.uint8)).save(preds / "0001.png")
    _assert_user_error(_run(*args), "out of range")
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(preds / "0001.png")
    _assert_user_error(_run(*args), "is 32x16")
    # a precision only applies where a model runs; saved labels are scored as they are
    _assert_user_error(_run(*args, "--precision", "bf16"), "--precision bf16 runs a model")


def test_label_values_out_of_range_in_training_data(tmp_path, shapes):
    bad = make_shapes_dataset(tmp_path / "bad", train=1, val=1, size=32)
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(bad / "trainannot" / "0000.png")
    _assert_user_error(
        _run(
            "train",
            "--model",
            "unet",
            "--data",
            str(bad),
            "--num-classes",
            "4",
            "--ignore-index",
            "255",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "r"),
        ),
        "out of range",
    )


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "detseg.cli",
            "predict",
            str(tmp_path / "no.png"),
            "--model",
            "unet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1

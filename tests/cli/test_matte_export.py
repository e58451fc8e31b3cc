"""`detseg matte` and `detseg export` end to end on tiny inputs."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from detseg.cli import app

runner = CliRunner()


def _pair(tmp_path, size=(96, 128)):
    rng = np.random.default_rng(0)
    plate = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    src = plate.copy()
    src[20:60, 30:90] = 200
    Image.fromarray(src).save(tmp_path / "src.png")
    Image.fromarray(plate).save(tmp_path / "plate.png")
    return tmp_path / "src.png", tmp_path / "plate.png"


def test_bgmv2_matte_writes_every_output(tmp_path):
    src, plate = _pair(tmp_path)
    args = [
        "matte",
        str(src),
        "--model",
        "bgmv2_mobilenetv2",
        "--bgr",
        str(plate),
        "-o",
        str(tmp_path / "out"),
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)["written"]
    kinds = {p.split("/")[-2] for p in written}
    assert {"com", "pha", "fgr", "err", "ref"} <= kinds
    pha = np.asarray(Image.open(tmp_path / "out" / "pha" / "src.png"))
    assert pha.shape[:2] == (96, 128)


def test_matte_errors_are_one_line(tmp_path):
    src, plate = _pair(tmp_path)
    no_plate = runner.invoke(app, ["matte", str(src), "--model", "bgmv2_mobilenetv2"])
    assert no_plate.exit_code == 2 and "--bgr" in no_plate.stderr
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(tmp_path / "small.png")
    mismatch = runner.invoke(
        app,
        [
            "matte",
            str(src),
            "--model",
            "bgmv2_mobilenetv2",
            "--bgr",
            str(tmp_path / "small.png"),
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert mismatch.exit_code == 2
    assert len([line for line in mismatch.stderr.splitlines() if line.strip()]) == 1
    wrong_task = runner.invoke(app, ["matte", str(src), "--model", "unet"])
    assert wrong_task.exit_code == 2 and "not a matting model" in wrong_task.stderr
    preset = runner.invoke(
        app,
        ["matte", str(src), "--model", "bgmv2_mobilenetv2", "--bgr", str(plate),
         "--video-preset", "ultrafast", "-o", str(tmp_path / "p")],
    )  # fmt: skip
    assert preset.exit_code == 2 and "is for video sources" in preset.stderr


def test_export_semantic_model_matches_pytorch(tmp_path):
    result = runner.invoke(
        app,
        [
            "export",
            "--model",
            "unet",
            "-o",
            str(tmp_path / "u.onnx"),
            "--height",
            "64",
            "--width",
            "48",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    diffs = json.loads(result.stdout)["max_abs_diff"]
    assert diffs and max(diffs.values()) < 1e-4

"""`detseg train --task matting --model gfm_*` end to end on a few alphamatting images."""

import json
import subprocess
import sys

import pytest

from detseg.data.images import read_image, write_image
from detseg.errors import InputFileError
from detseg.matting.gfm_train import train_gfm
from detseg.matting.gfm_training import shrink_to


@pytest.fixture()
def tiny_matting(shared, tmp_path):
    source = shared / "data" / "alphamatting"
    for sub in ("input", "alpha"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    for name in ("GT01", "GT02"):  # shrunk copies: a CPU-sized test
        photo = shrink_to(read_image(source / "input" / f"{name}.jpg"), 160)
        alpha = shrink_to(read_image(source / "alpha" / f"{name}.png")[..., 0], 160)
        write_image(tmp_path / "data" / "input" / f"{name}.png", photo)
        write_image(tmp_path / "data" / "alpha" / f"{name}.png", alpha)
    return tmp_path / "data", tmp_path / "data" / "input"


def test_train_gfm_runs_and_records_the_sad_curve(tiny_matting, tmp_path) -> None:
    data, backgrounds = tiny_matting
    summary = train_gfm(
        model="gfm_r34",
        data=data,
        backgrounds=backgrounds,
        out_dir=tmp_path / "run",
        steps=2,
        batch_size=2,
        lr=1e-4,
        size=32,
        eval_every=2,
        val_limit=1,
        device="cpu",
        progress=False,
    )
    assert summary["steps"] == 2 and summary["first_eval"]["step"] == 0
    assert summary["best_SAD"] > 0 and (tmp_path / "run" / "best.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


def test_train_gfm_refuses_other_layouts_and_models(tiny_matting, tmp_path) -> None:
    data, backgrounds = tiny_matting
    with pytest.raises(InputFileError, match="input/ and alpha/"):
        train_gfm(model="gfm_r34", data=tmp_path, backgrounds=backgrounds, device="cpu")
    with pytest.raises(InputFileError, match="not a GFM model"):
        train_gfm(model="bgmv2_base_mobilenetv2", data=data, backgrounds=backgrounds, device="cpu")


def test_cli_trains_gfm(tiny_matting, tmp_path) -> None:
    data, backgrounds = tiny_matting
    command = [sys.executable, "-m", "detseg", "train", "--task", "matting", "--model", "gfm_r34"]
    command += ["--data", str(data), "--backgrounds", str(backgrounds), "--steps", "1"]
    command += ["--batch-size", "2", "--size", "32", "--eval-every", "0", "--device", "cpu"]
    command += ["--out", str(tmp_path / "cli"), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 1

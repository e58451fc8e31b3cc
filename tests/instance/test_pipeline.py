"""Instance prediction through the API: drawn masks and RLE records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from torch import equal as torch_equal

from detseg.api import load_model, predict
from detseg.ops.masks import rle_to_mask
from detseg.registry import get_entry


def test_predict_instances_writes_drawing_and_rles(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), np.uint8)).save(
        tmp_path / "img.png"
    )
    model = load_model(
        "polarmask_r50", device="cpu", backbone="mobilenet_v2", num_classes=3, score_thr=0.0
    )
    records = predict(
        model,
        tmp_path / "img.png",
        tmp_path / "out",
        score_threshold=0.0,
        max_size=96,
        progress=False,
    )
    assert (tmp_path / "out" / "img_inst.jpg").is_file()
    assert records[0]["width"] == 96 and records[0]["height"] == 80
    assert records[0]["detections"]
    for det in records[0]["detections"]:
        mask = rle_to_mask(det["mask"])
        assert mask.shape == (80, 96) and int(mask.sum()) == det["area"]


def test_predict_with_a_two_stage_model(tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 80, 3), np.uint8)).save(
        tmp_path / "img.png"
    )
    model = load_model("maskrcnn_r50_fpn", device="cpu")
    records = predict(
        model, tmp_path / "img.png", tmp_path / "out", score_threshold=0.0, progress=False
    )
    assert records[0]["width"] == 80 and (tmp_path / "out" / "img_inst.jpg").is_file()


LIGHT = {
    "polarmask_r50": ["backbone=mobilenet_v2"],
    "tensormask_r50": ["backbone=mobilenet_v2", "fpn_channels=32", "num_convs=1",
                       "cls_channels=16", "bbox_channels=16", "mask_channels=16"],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LIGHT))
def test_train_instance_through_the_cli(shared, tmp_path, name):
    from typer.testing import CliRunner

    from detseg.cli import app
    from tests.conftest import need

    data = need(shared / "data" / "coco128")
    model_args = [a for kv in LIGHT[name] for a in ("--model-arg", kv)]
    args = ["train", "--task", "instance", "--model", name, *model_args,
            "--data", str(data), "--steps", "1", "--batch-size", "1",
            "--max-size", "64", "--eval-every", "0", "--val-limit", "1", "--out",
            str(tmp_path / "run"), "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 1 and "AP" in summary["last_eval"]
    loaded = load_model(weights=tmp_path / "run" / "last.safetensors")
    assert loaded.name == get_entry(name).name and loaded.task == "instance"


@pytest.mark.parametrize("name", sorted(LIGHT))
def test_eval_instance_reports_mask_ap(shared, name):
    from detseg.api import evaluate

    data = shared / "data" / "coco128"
    kwargs = dict(kv.split("=") for kv in LIGHT[name])
    kwargs = {k: v if k == "backbone" else int(v) for k, v in kwargs.items()}
    model = load_model(name, device="cpu", **kwargs)
    metrics = evaluate("instance", data=data, split="val", model=model, limit=2, max_size=64)
    assert metrics["images"] == 2 and 0.0 <= metrics["AP"] <= 1.0 and "box_AP50" in metrics


def test_predict_on_an_official_polarmask_checkpoint(tmp_path):
    """`detseg predict --task instance --model polarmask_r50 --weights OFFICIAL.pth IMG --json`."""
    import torch
    from typer.testing import CliRunner

    from detseg.cli import app
    from tests.instance.test_polarmask import _official_state

    torch.save(
        {"state_dict": _official_state(old_names=False), "meta": {"epoch": 12}},
        tmp_path / "polar_768_1x_r50.pth",
    )
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (60, 90, 3), np.uint8)).save(
        tmp_path / "img.png"
    )
    args = ["predict", "--task", "instance", "--model", "polarmask_r50", "--weights",
            str(tmp_path / "polar_768_1x_r50.pth"), str(tmp_path / "img.png"), "-o",
            str(tmp_path / "out"), "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)["images"][0]
    assert (record["width"], record["height"]) == (90, 60)
    assert (tmp_path / "out" / "img_inst.jpg").is_file()


def test_predict_tensormask_draws_masks_and_rles(tmp_path):
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (70, 90, 3), np.uint8)).save(
        tmp_path / "img.png"
    )
    kwargs = dict(kv.split("=") for kv in LIGHT["tensormask_r50"])
    kwargs = {k: v if k == "backbone" else int(v) for k, v in kwargs.items()}
    model = load_model("tensormask_r50", device="cpu", num_classes=2, score_thresh=0.0, **kwargs)
    records = predict(
        model, tmp_path / "img.png", tmp_path / "out", score_threshold=0.0, max_size=96,
        progress=False,
    )  # fmt: skip
    assert (tmp_path / "out" / "img_inst.jpg").is_file()
    dets = records[0]["detections"]
    assert 0 < len(dets) <= 100
    for det in dets:
        mask = rle_to_mask(det["mask"])
        assert mask.shape == (70, 90) and int(mask.sum()) == det["area"]


@pytest.mark.parametrize("name", ["maskrcnn_r50", "pointrend_r50"])
def test_train_and_eval_rcnn_through_the_cli(shared, tmp_path, name):
    from typer.testing import CliRunner

    from detseg.cli import app
    from tests.conftest import need

    data = need(shared / "data" / "coco128")
    args = ["train", "--task", "instance", "--model", name, "--model-arg",
            "backbone=mobilenet_v2", "--model-arg", "detections_per_image=5", "--data",
            str(data), "--steps", "2", "--batch-size", "2",
            "--max-size", "96", "--eval-every", "0", "--val-limit", "1", "--out",
            str(tmp_path / "run"), "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and "AP90" in summary["last_eval"]
    weights = str(tmp_path / "run" / "last.safetensors")
    args = ["eval", "--task", "instance", "--weights", weights, "--data", str(data),
            "--limit", "1", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["images"] == 1 and 0.0 <= metrics["AP"] <= 1.0 and "box_AP50" in metrics


def test_sliced_instances_and_coco_segm_through_the_cli(tmp_path):
    """`detseg predict --task instance --slice 64 --save-coco R.json`: masks in image pixels, one
    COCO segm result per instance; a slice as large as the image is the whole-image pass."""
    import torch
    from typer.testing import CliRunner

    from detseg.checkpoint import CheckpointMeta, save_checkpoint
    from detseg.cli import app

    Image.fromarray(np.random.default_rng(2).integers(0, 255, (96, 128, 3), np.uint8)).save(
        tmp_path / "img.png"
    )
    torch.manual_seed(0)
    loaded = load_model(
        "polarmask_r50", device="cpu", backbone="mobilenet_v2", num_classes=3, score_thr=0.0
    )
    weights = tmp_path / "polar.safetensors"
    meta = CheckpointMeta(model=loaded.name, kwargs=loaded.kwargs, class_names=["a", "b", "c"])
    save_checkpoint(weights, loaded.model, meta)

    def run(*extra: str) -> list:
        args = ["predict", str(tmp_path / "img.png"), "--task", "instance", "--weights",
                str(weights), "--score-threshold", "0", "--out", str(tmp_path / "out"), "--json",
                *extra]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["images"][0]["detections"]

    whole = run()
    assert run("--slice", "128") == whole and whole
    sliced = run("--slice", "64", "--overlap", "0.25", "--merge", "nmm", "--match", "ios",
                 "--save-coco", str(tmp_path / "res.json"))  # fmt: skip
    results = json.loads((tmp_path / "res.json").read_text())
    assert sliced and len(results) == len(sliced)  # threshold 0: every instance in both
    for det, res in zip(sliced, results, strict=True):
        mask = rle_to_mask(det["mask"])
        assert mask.shape == (96, 128) and int(mask.sum()) == det["area"]
        assert res["segmentation"] == det["mask"] and res["category_id"] == det["label"] + 1
        assert res["image_id"] == 1 and "bbox" not in res


def test_sliced_two_stage_model():
    """Mask R-CNN through ``instance_detector``: one tile is its whole-image pass; two tiles give
    cropped masks inside the image."""
    from detseg.detection.sliced import SliceConfig, sliced_predict
    from detseg.instance.pipeline import _segment, instance_detector

    image = np.random.default_rng(3).integers(0, 255, (60, 90, 3), np.uint8)
    model = load_model("maskrcnn_r50_fpn", device="cpu")
    detect = instance_detector(model)
    one = sliced_predict(image, detect, SliceConfig(size=90))
    whole = _segment(model, image, 768)
    assert torch_equal(one.boxes, whole.boxes) and torch_equal(one.masks, whole.masks)
    out = sliced_predict(image, detect, SliceConfig(size=60, overlap=0.2))  # 2 tiles
    assert out.image_hw == (60, 90) and len(out.crops) == len(out.boxes)
    for crop, (x0, y0) in zip(out.crops, out.origins, strict=True):
        assert x0 + crop.shape[1] <= 90 and y0 + crop.shape[0] <= 60

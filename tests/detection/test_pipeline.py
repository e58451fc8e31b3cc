"""Detection task glue: dataset layouts, training (HOG + SVM, FCOS), evaluation and prediction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from detseg.api import load_model
from detseg.data.coco import write_coco
from detseg.data.images import read_image
from detseg.data.yolo import write_yolo
from detseg.detection.pipeline import (
    _trained_max_size,
    draw_detections,
    evaluate_detection,
    load_split,
    predict_detection_files,
    train_detection,
)
from detseg.errors import DetsegError, InputFileError
from detseg.results import Detections
from tests.detection.squares import SMALL_HOG, square_dataset, write_via


@pytest.fixture(scope="module")
def via_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/{train,val}/via_region_data.json`` (balloon's layout) with 6 + 3 square images."""
    root = tmp_path_factory.mktemp("via")
    write_via(square_dataset(root / "train", 6, seed=0))
    write_via(square_dataset(root / "val", 3, seed=1))
    return root


@pytest.fixture(scope="module")
def hog_run(via_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("hog_run")
    kwargs = {**SMALL_HOG, "rounds": 1, "negatives_per_image": 20}
    return train_detection(
        model="hog_svm",
        data=via_root,
        out_dir=out,
        class_name="square",
        model_kwargs=kwargs,
        progress=False,
    )


def test_layouts(via_root: Path, tmp_path: Path) -> None:
    train = load_split(via_root, "train", "square")
    assert len(train.images) == 6 and train.class_names == ("square",)
    assert len(load_split(via_root, "val", "square").images) == 3
    # a COCO file serves every split whole
    write_coco(train, tmp_path / "all.json")
    assert len(load_split(tmp_path / "all.json", "val").images) == 6
    # COCO 2017 layout: annotations/instances_<split>.json, images in <split>/
    coco = train.to_coco()
    for im in coco["images"]:
        im["file_name"] = Path(im["file_name"]).name
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps(coco))
    shutil.copytree(via_root / "train", tmp_path / "train2017")
    split = load_split(tmp_path, "train")
    assert [r.path.parent.name for r in split.images] == ["train2017"] * 6
    # YOLO with split folders: images/<split>, labels/<split>
    yolo = tmp_path / "yolo"
    write_yolo(train, yolo)
    for kind in ("images", "labels"):
        (yolo / kind / "val").mkdir()
        for f in sorted((yolo / kind).glob("[01].*")):
            f.rename(yolo / kind / "val" / f.name)
    assert len(load_split(yolo, "val").images) == 2
    assert load_split(yolo, "val").images[0].annotations


def test_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="no such file or folder"):
        load_split(tmp_path / "missing", "train")
    with pytest.raises(InputFileError, match="via_region_data.json"):
        load_split(tmp_path, "train")


def test_hog_svm_trains_and_evaluates(hog_run: dict, via_root: Path) -> None:
    assert hog_run["best_AP50"] > 0.8, hog_run
    assert hog_run["train_images"] == 6 and hog_run["val_images"] == 3
    assert json.loads((Path(hog_run["out_dir"]) / "summary.json").read_text()) == hog_run
    loaded = load_model(weights=hog_run["checkpoints"][0], device="cpu")
    metrics = evaluate_detection(
        model=loaded, data=via_root, split="val", class_name="square", progress=False
    )
    assert metrics["AP50"] == pytest.approx(hog_run["best_AP50"])
    assert len(metrics["stats"]) == 12 and metrics["per_class"]["square"]["num_gt"] == 3


def test_predict_draws_and_saves_coco(hog_run: dict, via_root: Path, tmp_path: Path) -> None:
    loaded = load_model(weights=hog_run["checkpoints"][0], device="cpu")
    gt = tmp_path / "val.json"
    write_coco(load_split(via_root, "val", "square"), gt)
    records = predict_detection_files(
        loaded,
        via_root / "val",
        tmp_path / "out",
        score_threshold=0.5,
        save_coco=tmp_path / "results.json",
        coco_gt=gt,
        progress=False,
    )
    assert len(records) == 3
    for r in records:
        assert r["detections"] and all(d["score"] >= 0.5 for d in r["detections"])
        assert r["detections"][0]["class"] == "square"
        drawn = read_image(r["outputs"][0])
        assert drawn.shape == (r["height"], r["width"], 3)
    # the saved results (no threshold) score the same as evaluating the model
    saved = evaluate_detection(data=gt, split=None, results_json=tmp_path / "results.json")
    direct = evaluate_detection(model=loaded, data=gt, split=None, progress=False)
    assert saved["stats"] == pytest.approx(direct["stats"])


def test_sliced_prediction_finds_the_square(hog_run: dict, via_root: Path) -> None:
    loaded = load_model(weights=hog_run["checkpoints"][0], device="cpu")
    whole = predict_detection_files(loaded, via_root / "val" / "0.png", None, progress=False)
    tiled = predict_detection_files(
        loaded, via_root / "val" / "0.png", None, slice=64, overlap=0.5, merge="nmm", progress=False
    )
    box = lambda r: np.array(r[0]["detections"][0]["box"])  # noqa: E731
    assert np.abs(box(whole) - box(tiled)).max() < 12  # same square, found from the tiles


def test_evaluate_argument_errors(hog_run: dict, via_root: Path) -> None:
    loaded = load_model(weights=hog_run["checkpoints"][0], device="cpu")
    with pytest.raises(DetsegError, match="either --model"):
        evaluate_detection(data=via_root, split="val")
    with pytest.raises(DetsegError, match="boxes only"):
        evaluate_detection(model=loaded, data=via_root, split="val", iou_type="segm")


def test_fcos_training_records_curve_and_size(via_root: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    summary = train_detection(
        model="fcos_mnv2_fpn",
        data=via_root,
        out_dir=tmp_path,
        steps=2,
        batch_size=2,
        eval_every=1,
        max_size=64,
        class_name="square",
        device="cpu",
        progress=False,
    )
    history = json.loads((tmp_path / "history.json").read_text())
    assert [e["step"] for e in history["evals"]] == [0.0, 1.0, 2.0]
    assert {"AP", "AP50", "AP75"} <= set(history["evals"][0])
    assert summary["first_eval"]["step"] == 0 and summary["steps"] == 2
    loaded = load_model(weights=tmp_path / "last.safetensors", device="cpu")
    assert _trained_max_size(loaded) == 64 and loaded.class_names == ("square",)
    metrics = evaluate_detection(
        model=loaded, data=via_root, split="val", class_name="square", progress=False
    )
    assert 0.0 <= metrics["AP50"] <= 1.0


def test_draw_detections() -> None:
    image = np.zeros((40, 60, 3), np.uint8)
    det = Detections(
        torch.tensor([[10.0, 12.0, 50.0, 30.0]]), torch.tensor([0.9]), torch.tensor([0])
    )
    out = draw_detections(image, det, ("square",))
    assert image.max() == 0  # the input is untouched
    assert out[30, 30].any() and out[20, 50].any()  # bottom and right edges drawn
    assert not out[21, 30].any()  # inside the box stays clear

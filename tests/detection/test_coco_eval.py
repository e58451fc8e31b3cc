"""COCO evaluation: bit-identical to pycocotools (reference file, synthetic cases, hand-worked)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detseg.data.coco import read_coco
from detseg.detection.coco_eval import (
    detections_to_coco,
    evaluate_coco,
    evaluate_detections,
    run_coco_eval,
    write_coco_results,
)
from detseg.errors import DetsegError
from detseg.results import Detections, Instances
from tests.conftest import need
from tests.data.test_coco import tiny_coco
from tests.detection.coco_synthetic import synthetic_coco


def _pycocotools(gt: dict, results: list[dict], iou_type: str) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_reproduces_reference_stats_exactly(shared: Path, iou_type: str) -> None:
    ref = need(shared / "data/cocoeval_reference")
    expected = json.loads((ref / "EXPECTED_pycocotools_stats.json").read_text())[iou_type]
    out = evaluate_coco(ref / "gt.json", ref / f"results_{iou_type}.json", iou_type)
    assert out["stats"] == expected  # bit for bit, all 12
    assert out["per_class"]["person"]["num_gt"] > 0
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize(("seed", "iou_type"), [(0, "bbox"), (1, "bbox"), (2, "segm"), (3, "segm")])
def test_synthetic_cases_match_pycocotools_bitwise(seed: int, iou_type: str) -> None:
    gt, results = synthetic_coco(40, seed, segm=iou_type == "segm")
    ours = run_coco_eval(gt, results, iou_type)
    ref = _pycocotools(gt, results, iou_type)
    assert ours.stats == list(ref.stats)
    np.testing.assert_array_equal(ours.precision, ref.eval["precision"])


def _one_image_gt(n: int) -> dict:
    boxes = [[10.0 + 30 * i, 10.0, 20.0, 20.0] for i in range(n)]
    anns = [
        {"id": i + 1, "image_id": 1, "category_id": 4, "bbox": b, "area": 400.0, "iscrowd": 0}
        for i, b in enumerate(boxes)
    ]
    images = [{"id": 1, "file_name": "x.jpg", "width": 200, "height": 100}]
    return {"images": images, "annotations": anns, "categories": [{"id": 4, "name": "a"}]}


def test_hand_worked_pycocotools_epsilon() -> None:
    # pycocotools' precision is tp / (tp + fp + 2**-52): a single true positive scores 1/(1+eps)
    # while two true positives score exactly 1.
    for n, ap in ((1, 1.0 / (1.0 + 2.0**-52)), (2, 1.0)):
        gt = _one_image_gt(n)
        res = [
            {"image_id": 1, "category_id": 4, "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]
        ]
        res.append({"image_id": 1, "category_id": 4, "bbox": [150, 60, 10, 10], "score": 0.1})
        ev = run_coco_eval(gt, res)
        assert (ev.precision[:, :, 0, 0, -1] == ap).all()
        assert ev.stats == list(_pycocotools(gt, res, "bbox").stats)


def test_in_memory_maps_labels_and_boxes(tmp_path: Path) -> None:
    ds = read_coco(tiny_coco(tmp_path))  # labels: 0 = cat (id 3), 1 = dog (id 7)
    dog = Detections(torch.tensor([[2.0, 3.0, 12.0, 8.0]]), torch.tensor([0.9]), torch.tensor([1]))
    none = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    (r,) = detections_to_coco(11, dog, ds.category_ids)
    assert r["category_id"] == 7 and r["bbox"] == [2.0, 3.0, 10.0, 5.0]
    ev = evaluate_detections(ds, [dog, none])
    assert (
        ev.per_class()["dog"]["AP"] == pytest.approx(1.0) and ev.per_class()["cat"]["AP"] == 0.0
    )  # the zero-width cat box is never found
    wrong = Detections(dog.boxes, dog.scores, torch.tensor([0]))
    assert evaluate_detections(ds, [wrong, none]).stats[0] == 0.0
    write_coco_results(tmp_path / "res.json", [r])
    assert evaluate_coco(tmp_path / "instances.json", tmp_path / "res.json")["stats"] == ev.stats


def test_in_memory_segm(tmp_path: Path) -> None:
    ds = read_coco(tiny_coco(tmp_path))
    mask = torch.zeros(1, 20, 30, dtype=torch.bool)
    mask[0, 3:8, 2:12] = True
    det = Instances(
        torch.tensor([[2.0, 3.0, 12.0, 8.0]]), torch.tensor([0.8]), torch.tensor([1]), masks=mask
    )
    empty = Instances(
        torch.zeros(0, 4),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.int64),
        masks=torch.zeros(0, 20, 30, dtype=torch.bool),
    )
    assert "bbox" not in detections_to_coco(11, det, ds.category_ids, "segm")[0]
    assert evaluate_detections(ds, [det, empty], "segm").per_class()["dog"]["AP"] == pytest.approx(
        1.0
    )
    with pytest.raises(DetsegError, match="needs a model that predicts masks"):
        evaluate_detections(ds, [Detections(det.boxes, det.scores, det.labels), empty], "segm")


def _disc_gt_and_result(mask: np.ndarray) -> tuple[dict, list[dict]]:
    from faster_coco_eval.core import mask as mask_utils

    disc = _disc(200)
    rle = mask_utils.encode(np.asfortranarray(disc.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    gt = {
        "images": [{"id": 1, "width": 200, "height": 200, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "disc"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": rle,
                "iscrowd": 0,
                "area": float(disc.sum()),
                "bbox": [40.0, 40.0, 120.0, 120.0],
            }
        ],
    }
    pred = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    pred["counts"] = pred["counts"].decode()
    return gt, [{"image_id": 1, "category_id": 1, "segmentation": pred, "score": 0.9}]


def _disc(size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - 100) ** 2 + (xx - 100) ** 2 <= 60**2


def test_boundary_ap_penalises_blocky_masks_more_than_mask_ap() -> None:
    exact = run_coco_eval(*_disc_gt_and_result(_disc(200)), "boundary").stats[0]
    assert exact == pytest.approx(1.0)
    # the disc rendered on a 10-px grid (a 28x28-style coarse mask upsampled by nearest)
    blocky = np.kron(_disc(200)[5::10, 5::10], np.ones((10, 10), bool))
    gt, results = _disc_gt_and_result(blocky)
    segm, boundary = (run_coco_eval(gt, results, kind).stats[0] for kind in ("segm", "boundary"))
    assert segm > 0.8  # mask IoU about 0.96: most thresholds pass
    assert boundary < segm - 0.3  # boundary IoU about 0.7 fails the strict thresholds


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"image_id": 99, "category_id": 4, "bbox": [0, 0, 1, 1], "score": 1.0}, "image_id 99"),
        ({"image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 1.0}, "category_id 5"),
        (
            {"image_id": 1, "category_id": 4, "score": 1.0},
            "needs image_id, category_id, score, bbox",
        ),
    ],
)
def test_bad_results_are_named(tmp_path: Path, entry: dict, message: str) -> None:
    path = tmp_path / "res.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises(DetsegError, match=rf"res.json: result \[0\].*{message}"):
        evaluate_coco(_one_image_gt(1), path)


def test_table_and_pr_plot(tmp_path: Path) -> None:
    gt, results = synthetic_coco(20, 5)
    ev = run_coco_eval(gt, results)
    table = ev.table()
    assert "class1" in table and "class90" not in table and "AR100" in table
    ev.plot_pr(tmp_path / "pr.png")
    assert (tmp_path / "pr.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".*tmp*"))


def test_no_detections_scores_zero_not_a_crash() -> None:
    for iou_type in ("bbox", "segm"):
        gt, _ = synthetic_coco(5, 1, segm=iou_type == "segm")
        stats = run_coco_eval(gt, [], iou_type).stats
        assert stats[0] == 0.0 and set(stats) <= {0.0, -1.0}  # -1: an area range without GT

"""`detseg coco-eval` and `detseg convert` through the CLI, on the shared reference data."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from detseg.cli import app
from tests.conftest import need

runner = CliRunner()


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_eval_reproduces_pycocotools(shared, iou_type):
    ref = shared / "data" / "cocoeval_reference"
    expected = json.loads(need(ref / "EXPECTED_pycocotools_stats.json").read_text())[iou_type]
    result = runner.invoke(
        app,
        [
            "coco-eval",
            str(ref / "gt.json"),
            str(ref / f"results_{iou_type}.json"),
            "--iou-type",
            iou_type,
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stats"] == expected


def test_convert_via_to_coco_and_bad_json(shared, tmp_path):
    via = need(shared / "data" / "balloon" / "val")
    result = runner.invoke(
        app,
        [
            "convert",
            str(via),
            str(tmp_path / "val.json"),
            "--to",
            "coco",
            "--class-name",
            "balloon",
        ],
    )
    assert result.exit_code == 0, result.output
    coco = json.loads((tmp_path / "val.json").read_text())
    assert len(coco["images"]) == 13 and coco["categories"][0]["name"] == "balloon"
    (tmp_path / "bad.json").write_text('{"images": [')
    bad = runner.invoke(app, ["coco-eval", str(tmp_path / "bad.json"), str(tmp_path / "val.json")])
    assert bad.exit_code == 2 and "bad.json" in bad.stderr


def test_coco_eval_boundary_and_unknown_iou_type(shared):
    ref = shared / "data" / "cocoeval_reference"
    args = ["coco-eval", str(need(ref / "gt.json")), str(need(ref / "results_segm.json"))]
    result = runner.invoke(app, [*args, "--iou-type", "boundary", "--json"])
    assert result.exit_code == 0, result.output
    boundary = json.loads(result.stdout)["stats"][0]
    segm = json.loads((ref / "EXPECTED_pycocotools_stats.json").read_text())["segm"][0]
    assert 0 < boundary <= segm  # each match keeps the smaller of mask and boundary IoU
    bad = runner.invoke(app, [*args, "--iou-type", "nope"])
    assert bad.exit_code == 2 and "use bbox, segm or boundary" in bad.stderr

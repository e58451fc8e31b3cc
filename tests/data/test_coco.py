"""COCO / VIA / YOLO readers and writers on tiny generated files and on the shared datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detseg.data.coco import read_coco, write_coco
from detseg.data.convert import convert, detect_format, read_dataset
from detseg.data.images import write_image
from detseg.data.via import read_via
from detseg.data.yolo import read_yolo
from detseg.errors import DetsegError
from detseg.ops.masks import mask_to_rle, rle_to_uncompressed
from tests.conftest import need


def tiny_coco(root: Path, **overrides: object) -> Path:
    """Two 20x30 images (the second without objects), categories with ids 7 and 3."""
    for name in ("a.png", "b.png"):
        write_image(root / name, np.full((20, 30, 3), 128, np.uint8))
    crowd = np.zeros((20, 30), np.uint8)
    crowd[10:15, 20:28] = 1
    data = {
        "images": [
            {"id": 11, "file_name": "a.png", "width": 30, "height": 20},
            {"id": 12, "file_name": "b.png", "width": 30, "height": 20},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 11,
                "category_id": 7,
                "bbox": [2, 3, 10, 5],
                "area": 50,
                "segmentation": [[2, 3, 12, 3, 12, 8, 2, 8]],
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 11,
                "category_id": 3,
                "bbox": [20, 10, 8, 5],
                "area": 40,
                "segmentation": rle_to_uncompressed(mask_to_rle(crowd)),
                "iscrowd": 1,
            },
            {
                "id": 3,
                "image_id": 11,
                "category_id": 3,
                "bbox": [5, 5, 0, 4],
                "area": 0,
                "iscrowd": 0,
            },
        ],
    }
    data.update(overrides)
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_categories_are_sorted_and_contiguous(tmp_path: Path) -> None:
    ds = read_coco(tiny_coco(tmp_path))
    assert ds.class_names == ("cat", "dog")
    assert ds.category_ids == [3, 7]
    assert ds.label_of(7) == 1
    a, crowd, degenerate = ds.images[0].annotations
    assert (a.label, crowd.label, crowd.iscrowd) == (1, 0, True)
    np.testing.assert_array_equal(a.box, [2, 3, 12, 8])
    np.testing.assert_array_equal(degenerate.box, [5, 5, 5, 9])
    assert ds.images[1].annotations == []


def test_coco_write_read_round_trip(tmp_path: Path) -> None:
    ds = read_coco(tiny_coco(tmp_path))
    write_coco(ds, tmp_path / "out" / "copy.json")
    back = read_coco(tmp_path / "out" / "copy.json")
    assert back.images[0].path.resolve() == ds.images[0].path.resolve()
    assert back.category_ids == ds.category_ids
    for x, y in zip(ds.images[0].annotations, back.images[0].annotations, strict=True):
        np.testing.assert_allclose(x.box, y.box)
        assert (x.label, x.iscrowd, x.segmentation) == (y.label, y.iscrowd, y.segmentation)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"annotations": [{"id": 5, "image_id": 11, "category_id": 9, "bbox": [0, 0, 1, 1]}]},
            r"annotations\[0\] \(id 5, image_id 11\): category_id 9 is not in categories",
        ),
        (
            {"annotations": [{"id": 5, "image_id": 99, "category_id": 7, "bbox": [0, 0, 1, 1]}]},
            r"annotations\[0\].*image_id is not in images",
        ),
        (
            {"annotations": [{"id": 5, "image_id": 11, "category_id": 7, "bbox": [0, 0, 1]}]},
            r"annotations\[0\].*bbox must be",
        ),
        (
            {"categories": [{"id": 7, "name": "a"}, {"id": 7, "name": "b"}]},
            r"category ids \[7\] appear more than once",
        ),
        ({"images": [{"id": 1, "file_name": "a.png", "width": 0, "height": 5}]}, r"images\[0\]"),
    ],
)
def test_bad_entries_name_file_and_entry(tmp_path: Path, overrides: dict, expected: str) -> None:
    path = tiny_coco(tmp_path, **overrides)
    with pytest.raises(DetsegError, match=rf"instances.json: {expected}"):
        read_coco(path)


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DetsegError, match=r"bad.json: malformed JSON at line 2, column 12"):
        read_coco(path)


def _write_via(root: Path, regions: object, filename: str = "img.png") -> Path:
    write_image(root / "img.png", np.zeros((40, 50, 3), np.uint8))
    entry = {"filename": filename, "size": 1, "regions": regions, "file_attributes": {}}
    path = root / "via_region_data.json"
    path.write_text(json.dumps({"img.png1": entry}))
    return path


def test_via_polygon_dict_and_list(tmp_path: Path) -> None:
    shape = {"name": "polygon", "all_points_x": [5, 25, 25, 5], "all_points_y": [4, 4, 30, 30]}
    region = {"shape_attributes": shape, "region_attributes": {}}
    for regions in ({"0": region}, [region]):
        ds = read_via(_write_via(tmp_path, regions), class_name="balloon")
        (a,) = ds.images[0].annotations
        np.testing.assert_array_equal(a.box, [5, 4, 25, 30])
        assert a.area == 20 * 26
        assert ds.class_names == ("balloon",) and (ds.images[0].width, ds.images[0].height) == (
            50,
            40,
        )


def test_via_errors_name_the_entry(tmp_path: Path) -> None:
    with pytest.raises(DetsegError, match=r'entry "img.png1": image .*missing.png not found'):
        read_via(_write_via(tmp_path, {}, filename="missing.png"))
    circle = {"shape_attributes": {"name": "circle", "cx": 1, "cy": 1, "r": 2}}
    with pytest.raises(
        DetsegError, match=r'entry "img.png1" region 0: shape .circle. is not supported'
    ):
        read_via(_write_via(tmp_path, [circle]))


def test_yolo_boxes_and_segments(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "a.png", np.zeros((20, 40, 3), np.uint8))
    write_image(tmp_path / "images" / "b.png", np.zeros((20, 40, 3), np.uint8))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("1 0.5 0.5 0.5 0.5\n0 0.1 0.1 0.3 0.1 0.3 0.6\n")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    ds = read_yolo(tmp_path)
    box, seg = ds.images[0].annotations
    np.testing.assert_allclose(box.box, [10, 5, 30, 15])
    np.testing.assert_allclose(seg.box, [4, 2, 12, 12])
    assert (box.label, seg.label, ds.class_names) == (1, 0, ("cat", "dog"))
    assert ds.images[1].annotations == []
    (tmp_path / "labels" / "b.txt").write_text("0 0.5 x 0.1 0.1\n")
    with pytest.raises(DetsegError, match=r"b.txt:1: expected"):
        read_yolo(tmp_path)
    (tmp_path / "labels" / "b.txt").write_text("2 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DetsegError, match=r"class 2 but only 2 names"):
        read_yolo(tmp_path)


def test_coco_yolo_coco_round_trip(tmp_path: Path) -> None:
    src = tiny_coco(tmp_path)
    convert(src, tmp_path / "yolo", to="yolo", segments=False)
    assert detect_format(tmp_path / "yolo")[0] == "yolo"
    back = convert(tmp_path / "yolo", tmp_path / "back.json", to="coco")
    assert back.class_names == ("cat", "dog")
    # crowd dropped; the degenerate box survives as a zero-width box
    boxes = sorted(
        a.box.tolist() for a in read_dataset(tmp_path / "back.json").images[0].annotations
    )
    np.testing.assert_allclose(boxes, [[2, 3, 12, 8], [5, 5, 5, 9]], atol=1e-4)


def test_shared_balloon_and_coco128(shared: Path) -> None:
    balloon = read_dataset(need(shared / "data/balloon/train"), class_name="balloon")
    assert (len(balloon.images), sum(len(i.annotations) for i in balloon.images)) == (61, 255)
    first = balloon.images[0].annotations[0].segmentation[0]
    assert first[:6] == [510, 482, 500, 450, 497, 420]
    coco = read_dataset(need(shared / "data/coco128"))
    assert (len(coco.images), sum(len(i.annotations) for i in coco.images)) == (128, 929)
    assert coco.label_of(90) == 79 and coco.class_names[0] == "person"
    gt = read_coco(need(shared / "data/cocoeval_reference/gt.json"))
    crowds = {a.id for im in gt.images for a in im.annotations if a.iscrowd}
    assert crowds == {38, 514, 911}


def test_convert_balloon_via_to_coco(shared: Path, tmp_path: Path) -> None:
    src = need(shared / "data/balloon/val")
    convert(src, tmp_path / "balloon_val.json", to="coco", class_name="balloon")
    back = read_coco(tmp_path / "balloon_val.json")
    assert (len(back.images), sum(len(i.annotations) for i in back.images)) == (13, 50)
    assert back.class_names == ("balloon",) and back.images[0].path.is_file()
    via = read_dataset(src, class_name="balloon")
    for a, b in zip(via.images[0].annotations, back.images[0].annotations, strict=True):
        assert a.segmentation == b.segmentation and a.area == b.area
        np.testing.assert_allclose(a.box, b.box, atol=0.01)

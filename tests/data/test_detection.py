"""DetectionDataset: targets, box/mask-consistent augmentation, negatives, missing images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from detseg.data.detection import DetectionDataset
from detseg.detection.fcos_training import collate_detection
from detseg.errors import DetsegError
from tests.conftest import need
from tests.data.test_coco import tiny_coco


def _mask_extent(mask: torch.Tensor) -> list[int]:
    ys, xs = np.nonzero(mask.numpy())
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_eval_item_drops_crowd_and_degenerate_keeps_negative(tmp_path: Path) -> None:
    ds = DetectionDataset(tiny_coco(tmp_path), max_size=60, masks=True)
    image, target = ds[0]
    assert image.shape == (3, 40, 60) and image.dtype == torch.float32
    torch.testing.assert_close(target["boxes"], torch.tensor([[4.0, 6.0, 24.0, 16.0]]))
    assert target["labels"].tolist() == [1] and target["labels"].dtype == torch.int64
    assert (target["image_id"], target["orig_size"], target["size"]) == (11, (20, 30), (40, 60))
    assert target["masks"].shape == (1, 40, 60) and target["masks"].dtype == torch.uint8
    assert _mask_extent(target["masks"][0]) == [4, 6, 24, 16]
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 40, 60)
    batch = collate_detection([ds[0], ds[1]])
    assert len(batch["images"]) == 2 and [t["image_id"] for t in batch["targets"]] == [11, 12]


def test_only_degenerate_boxes_gives_a_negative(tmp_path: Path) -> None:
    anns = [
        {"id": 1, "image_id": 11, "category_id": 7, "bbox": [40, 40, 5, 5]},
        {"id": 2, "image_id": 11, "category_id": 7, "bbox": [3, 3, 4, -2]},
    ]
    ds = DetectionDataset(tiny_coco(tmp_path, annotations=anns), train=True, max_size=32)
    _, target = ds[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_missing_image_names_entry(tmp_path: Path) -> None:
    path = tiny_coco(tmp_path)
    (tmp_path / "b.png").unlink()
    with pytest.raises(DetsegError, match=r"instances.json: image id 12 \(b.png\): .*not found"):
        DetectionDataset(path)


def test_train_augmentation_keeps_boxes_on_masks(shared: Path) -> None:
    ds = DetectionDataset(need(shared / "data/balloon/val"), train=True, max_size=256, masks=True)
    np.random.seed(3)
    sizes, flipped = set(), False
    for i in range(6):
        image, target = ds[i]
        assert max(image.shape[1:]) in range(192, 257, 32)
        sizes.add(max(image.shape[1:]))
        for box, mask in zip(target["boxes"], target["masks"], strict=True):
            assert mask.any()
            assert np.abs(np.array(_mask_extent(mask)) - box.numpy()).max() <= 2.0
        first = (
            ds.dataset.images[i].annotations[0].box[0] * image.shape[2] / ds.dataset.images[i].width
        )
        flipped |= not np.isclose(target["boxes"][:, 0].numpy(), first, atol=1.5).any()
    assert len(sizes) > 1 and flipped


def test_coco128_masks_follow_boxes(shared: Path) -> None:
    ds = DetectionDataset(need(shared / "data/coco128"), max_size=320, masks=True)
    image, target = ds[0]
    assert image.shape[0] == 3 and max(image.shape[1:]) == 320
    assert len(target["boxes"]) == len(ds.dataset.images[0].annotations) > 0
    for box, mask in zip(target["boxes"], target["masks"], strict=True):
        assert np.abs(np.array(_mask_extent(mask)) - box.numpy()).max() <= 2.5

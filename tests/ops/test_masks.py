"""RLE / mask / polygon round trips, checked against numpy and pycocotools' own area and box."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from detseg.ops import masks

small_masks = st.tuples(st.integers(1, 12), st.integers(1, 12)).flatmap(
    lambda hw: arrays(np.uint8, hw, elements=st.integers(0, 1))
)


@settings(max_examples=60, deadline=None)
@given(small_masks)
def test_mask_rle_round_trip(mask: np.ndarray) -> None:
    rle = masks.mask_to_rle(mask)
    assert isinstance(rle["counts"], str)
    assert rle["size"] == list(mask.shape)
    np.testing.assert_array_equal(masks.rle_to_mask(rle), mask)
    assert masks.rle_area(rle) == int(mask.sum())


@settings(max_examples=60, deadline=None)
@given(small_masks)
def test_uncompressed_rle_round_trip(mask: np.ndarray) -> None:
    raw = masks.rle_to_uncompressed(masks.mask_to_rle(mask))
    counts = raw["counts"]
    assert sum(counts) == mask.size
    # Column-major runs starting with zeros: rebuild the mask by hand, independently of pycocotools.
    flat = np.concatenate([np.full(n, i % 2, np.uint8) for i, n in enumerate(counts)])
    np.testing.assert_array_equal(flat.reshape(mask.shape[::-1]).T, mask)
    np.testing.assert_array_equal(masks.rle_to_mask(raw), mask)
    np.testing.assert_array_equal(masks.segmentation_to_mask(raw, *mask.shape), mask)


@settings(max_examples=40, deadline=None)
@given(small_masks)
def test_rle_box_is_mask_extent(mask: np.ndarray) -> None:
    box = masks.rle_to_box(masks.mask_to_rle(mask))
    if mask.sum() == 0:
        np.testing.assert_array_equal(box, 0)
        return
    ys, xs = np.nonzero(mask)
    np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def test_rectangle_polygon_rasterises_to_rectangle() -> None:
    # A polygon along pixel corners (2,1)-(6,4) covers columns 2..5 and rows 1..3.
    rle = masks.polygons_to_rle([[2, 1, 6, 1, 6, 4, 2, 4]], 8, 10)
    expected = np.zeros((8, 10), np.uint8)
    expected[1:4, 2:6] = 1
    np.testing.assert_array_equal(masks.rle_to_mask(rle), expected)


def test_polygons_are_merged_and_short_ones_ignored() -> None:
    polys = [[0, 0, 2, 0, 2, 2, 0, 2], [4, 4, 6, 4, 6, 6, 4, 6], [1, 1, 2, 2]]
    assert masks.rle_area(masks.polygons_to_rle(polys, 8, 8)) == 8
    assert masks.rle_area(masks.polygons_to_rle([], 5, 5)) == 0


def test_mask_to_polygons_round_trip_keeps_blobs() -> None:
    mask = np.zeros((40, 50), np.uint8)
    mask[5:20, 3:25] = 1
    yy, xx = np.mgrid[:40, :50]
    mask[(yy - 28) ** 2 + (xx - 38) ** 2 < 64] = 1
    polys = masks.mask_to_polygons(mask)
    assert len(polys) == 2
    back = masks.segmentation_to_mask(polys, 40, 50)
    iou = (back & mask).sum() / (back | mask).sum()
    assert iou > 0.99

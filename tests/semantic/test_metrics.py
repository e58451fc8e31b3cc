"""Confusion-matrix metrics: stored ESPNet matrices, hand-worked cases and a brute-force reference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detseg.errors import DetsegError
from detseg.semantic.metrics import ConfusionMatrix
from tests.conftest import need


@pytest.fixture(scope="module")
def reference(shared):
    path = shared / "data" / "weights" / "espnet_camvid_reference" / "metrics.json"
    return json.loads(need(path).read_text())


@pytest.mark.parametrize("split", ["val", "test"])
def test_espnet_reference_numbers(reference, split):
    ref = reference[split]
    cm = ConfusionMatrix.from_matrix(ref["confusion_matrix"], ignore_index=11)
    authors = cm.compute("authors")
    standard = cm.compute("standard")
    assert authors["mIoU"] == pytest.approx(ref["authors"]["mIoU"], abs=0.01)
    assert authors["mean_class_acc"] == pytest.approx(ref["authors"]["class_avg_acc"], abs=0.01)
    assert authors["pixel_acc"] == pytest.approx(ref["authors"]["global_acc"], abs=0.01)
    assert authors["per_class_IoU"] == pytest.approx(ref["authors"]["per_class_IoU"], abs=0.01)
    assert authors["per_class_acc"] == pytest.approx(ref["per_class_acc"], abs=0.01)
    assert standard["mIoU"] == pytest.approx(ref["void_ignored"]["mIoU"], abs=0.01)
    assert standard["per_class_IoU"] == pytest.approx(
        ref["void_ignored"]["per_class_IoU"], abs=0.01
    )


def test_hand_worked_case():
    # classes 0, 1, 2; void = 9.  gt/pred pairs, one per pixel.
    gt = np.array([0, 0, 0, 1, 1, 9, 9, 2], dtype=np.uint8)
    pred = np.array([0, 0, 1, 1, 9, 1, 9, 0], dtype=np.uint8)
    cm = ConfusionMatrix(3, ignore_index=9)
    cm.update(pred, gt)
    expected = np.zeros((4, 4), np.int64)
    for g, p in [(0, 0), (0, 0), (0, 1), (1, 1), (1, 3), (3, 1), (3, 3), (2, 0)]:
        expected[g, p] += 1
    np.testing.assert_array_equal(cm.matrix.numpy(), expected)

    std = cm.compute()
    # class 0: TP 2, FN 1 (0->1), FP 1 (2->0) -> 2/4; class 1: TP 1, FN 1 (->void), FP 1 -> 1/3
    # class 2: TP 0, FN 1 -> 0
    assert std["per_class_IoU"] == pytest.approx([50.0, 100 / 3, 0.0])
    assert std["mIoU"] == pytest.approx((50 + 100 / 3 + 0) / 3)
    assert std["pixel_acc"] == pytest.approx(100 * 3 / 6)
    assert std["per_class_acc"] == pytest.approx([200 / 3, 50.0, 0.0])
    assert std["num_pixels"] == 6

    authors = cm.compute("authors")
    # the void pixel predicted 1 becomes a false positive of class 1: 1 / 4
    assert authors["per_class_IoU"] == pytest.approx([50.0, 25.0, 0.0])
    assert authors["mean_class_acc"] == pytest.approx(std["mean_class_acc"])


def test_classes_absent_from_label_and_prediction_are_excluded():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([[0, 1], [1, 0]]), torch.tensor([[0, 1], [0, 0]]))
    out = cm.compute()
    assert out["per_class_IoU"][2:] == [None, None]
    assert out["mIoU"] == pytest.approx((200 / 3 + 50) / 2)
    assert out["per_class_acc"] == pytest.approx([200 / 3, 100.0, None, None])


def test_predicted_only_class_counts_with_zero_iou():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 2]), np.array([0, 0]))
    out = cm.compute()
    assert out["per_class_IoU"] == [50.0, None, 0.0]
    assert out["mean_class_acc"] == 50.0


def test_batches_accumulate_like_one_update():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 6, (3, 5, 7))
    gt[gt == 5] = 255
    pred = rng.integers(0, 5, (3, 5, 7))
    whole = ConfusionMatrix(5, ignore_index=255)
    whole.update(pred, gt)
    parts = ConfusionMatrix(5, ignore_index=255)
    for i in range(3):
        parts.update(torch.from_numpy(pred[i]), torch.from_numpy(gt[i]).to(torch.uint8))
    assert torch.equal(whole.matrix, parts.matrix)
    parts.reset()
    assert int(parts.matrix.sum()) == 0


def test_empty_matrix_gives_none():
    out = ConfusionMatrix(2, ignore_index=255).compute()
    assert out["mIoU"] is None and out["pixel_acc"] is None and out["num_pixels"] == 0


@pytest.mark.parametrize(
    ("pred", "gt", "match"),
    [
        (np.zeros((2, 2), np.int64), np.zeros((2, 3), np.int64), "shape"),
        (np.zeros(3, np.int64), np.array([0, 1, 7]), "class id 7"),
        (np.array([0, -1, 0]), np.zeros(3, np.int64), "class id -1"),
        (np.zeros(3, np.float32), np.zeros(3, np.int64), "integer"),
    ],
)
def test_bad_inputs_raise_detseg_error(pred, gt, match):
    with pytest.raises(DetsegError, match=match):
        ConfusionMatrix(3, ignore_index=255).update(pred, gt)


def test_bad_construction():
    with pytest.raises(ValueError, match="valid class id"):
        ConfusionMatrix(12, ignore_index=11)
    with pytest.raises(DetsegError, match="convention"):
        ConfusionMatrix(2).compute("segnet")


def _brute_force(pred, gt, num_classes, void, authors):
    """Per-class TP / FP / FN by explicit counting over pixels."""
    ious, recalls = [], []
    for c in range(num_classes):
        tp = fp = fn = 0
        for p, g in zip(pred.tolist(), gt.tolist(), strict=True):
            if g == void and not authors:
                continue
            tp += p == c and g == c
            fp += p == c and g != c
            fn += g == c and p != c
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
        recalls.append(tp / (tp + fn) if tp + fn else math.nan)
    valid = [p == g for p, g in zip(pred.tolist(), gt.tolist(), strict=True) if g != void]
    return ious, recalls, (sum(valid) / len(valid) if valid else math.nan)


@settings(max_examples=60, deadline=None)
@given(
    num_classes=st.integers(1, 4),
    pixels=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=40),
    authors=st.booleans(),
)
def test_matches_brute_force(num_classes, pixels, authors):
    void = num_classes  # ids 0..C-1 valid, C = void, larger ids folded onto those
    pred = np.array([min(p, void) for p, _ in pixels])
    gt = np.array([min(g, void) for _, g in pixels])
    cm = ConfusionMatrix(num_classes, ignore_index=void)
    cm.update(pred, gt)
    out = cm.compute("authors" if authors else "standard")
    ious, recalls, acc = _brute_force(pred, gt, num_classes, void, authors)

    def same(ours, ref):
        return (ours is None and math.isnan(ref)) or (
            ours is not None and ours == pytest.approx(100 * ref)
        )

    assert all(same(o, r) for o, r in zip(out["per_class_IoU"], ious, strict=True))
    assert all(same(o, r) for o, r in zip(out["per_class_acc"], recalls, strict=True))
    assert same(out["pixel_acc"], acc)
    present = [v for v in ious if not math.isnan(v)]
    assert same(out["mIoU"], sum(present) / len(present) if present else math.nan)

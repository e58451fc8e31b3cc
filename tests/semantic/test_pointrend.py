"""Semantic PointRend head against the detectron2 parity fixtures (d2_pointrend_semseg*)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detseg.data.preprocess import Preprocess
from detseg.semantic.losses import SegmentationLoss, semantic_loss
from detseg.semantic.pointrend import (
    DeepLabV3PlusPointRend,
    SemanticPointRendHead,
    top2_uncertainty,
)
from detseg.semantic.sliding import sliding_window_predict, whole_image_predict
from tests.parity import fixture_names, run_fixture

NAMES = fixture_names("d2_pointrend_semseg")


def test_fixtures_are_found(shared) -> None:
    assert len(NAMES) == 2, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_parity(shared, name: str) -> None:
    diffs = run_fixture(name)
    assert diffs and max(diffs.values()) <= 1e-4, diffs


def test_top2_uncertainty() -> None:
    logits = torch.tensor([1.0, 5.0, 4.0]).view(1, 3, 1, 1)
    assert top2_uncertainty(logits).item() == -1.0


def test_output_resolution() -> None:
    head = SemanticPointRendHead(num_classes=3, in_channels=32, conv_dims=32, point_fc_dim=16)
    head.eval()
    feats = [torch.randn(1, 32, 8 >> i, 16 >> i) for i in range(4)]
    with torch.no_grad():
        logits, coarse = head(*feats)
    assert coarse.shape == (1, 3, 8, 16) and logits.shape == (1, 3, 32, 64)


def _small_model() -> DeepLabV3PlusPointRend:
    torch.manual_seed(0)
    return DeepLabV3PlusPointRend(
        num_classes=4,
        backbone="resnet18",
        point_fc_dim=16,
        subdivision_num_points=64,
        train_num_points=32,
    )


def test_deeplab_pointrend_inference_and_loss() -> None:
    model = _small_model()
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 4, (2, 64, 64))
    labels[0, :8] = 255
    outputs = model.train()(images)
    assert outputs["out"].shape == (2, 4, 64, 64)
    logits, coords = outputs["point"]
    assert logits.shape == (2, 4, 32) and coords.shape == (2, 32, 2)
    # the general semantic loss scores the point head like any auxiliary head, weight 1
    criterion = SegmentationLoss(ignore_index=255)
    total, logs = semantic_loss(outputs, labels, criterion, model.aux_weights)
    total.backward()
    assert set(logs) == {"loss_out", "loss_point"}
    assert total.item() == pytest.approx(logs["loss_out"] + logs["loss_point"], rel=1e-5)
    assert model.point_head.fc1.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(images)
        coarse, _ = model.coarse(images)
    assert out.shape == (2, 4, 64, 64)
    # Cells that were never re-predicted keep the bilinear upsampling of the coarse logits.
    up = torch.nn.functional.interpolate(coarse, scale_factor=4, mode="bilinear")
    assert 0 < (out - up).abs().amax(1).gt(1e-5).float().mean() < 1


def test_point_loss_uses_nearest_labels_at_the_points() -> None:
    labels = torch.zeros(1, 4, 4, dtype=torch.int64)
    labels[0, :, 2:] = 1
    coords = torch.tensor([[[0.1, 0.5], [0.9, 0.5], [0.6, 0.1]]])  # columns 0, 3 and 2
    logits = torch.zeros(1, 2, 3)
    logits[0, 1] = torch.tensor([-20.0, 20.0, 20.0])  # right for all three
    _, parts = semantic_loss({"point": (logits, coords)}, labels, SegmentationLoss())
    assert parts["loss_point"] < 1e-6
    logits[0, 1, 2] = -20.0  # now wrong at the column-2 point
    _, parts = semantic_loss({"point": (logits, coords)}, labels, SegmentationLoss())
    assert parts["loss_point"] == pytest.approx(20 / 3, rel=1e-3)


def test_sliding_window_inference_with_the_point_head() -> None:
    model = _small_model().eval()
    image = np.random.default_rng(0).integers(0, 255, (64, 96, 3), np.uint8)
    pre = Preprocess()
    whole = whole_image_predict(model, image, pre, 4, size_divisor=32)
    same = sliding_window_predict(model, image, pre, 4, crop=(64, 96), stride=(64, 96))
    assert torch.equal(same.labels, whole.labels)
    tiled = sliding_window_predict(model, image, pre, 4, crop=64, stride=32, size_divisor=32)
    assert tiled.labels.shape == (64, 96)
    # away from the tile seams the single 64x64 window at x = 0 decides the left columns
    left = whole_image_predict(model, image[:, :64], pre, 4, size_divisor=32)
    assert torch.equal(tiled.labels[:, :16], left.labels[:, :16])

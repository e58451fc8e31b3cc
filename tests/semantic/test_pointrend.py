"""Semantic PointRend head against the detectron2 parity fixtures (d2_pointrend_semseg*)."""

from __future__ import annotations

import pytest
import torch

from detseg.semantic.pointrend import (
    DeepLabV3PlusPointRend,
    SemanticPointRendHead,
    top2_uncertainty,
)
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


def test_deeplab_pointrend_inference_and_loss() -> None:
    torch.manual_seed(0)
    model = DeepLabV3PlusPointRend(
        num_classes=4,
        backbone="resnet18",
        point_fc_dim=16,
        subdivision_num_points=64,
        train_num_points=32,
    )
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 4, (2, 64, 64))
    labels[0, :8] = 255
    total, logs = model.compute_loss(images, labels)
    total.backward()
    assert torch.isfinite(total) and set(logs) == {"loss_sem_seg", "loss_sem_seg_point"}
    assert model.point_head.fc1.weight.grad.abs().sum() > 0
    assert model.train()(images).shape == (2, 4, 64, 64)
    model.eval()
    with torch.no_grad():
        out = model(images)
        coarse, _ = model.coarse(images)
    assert out.shape == (2, 4, 64, 64)
    # Cells that were never re-predicted keep the bilinear upsampling of the coarse logits.
    up = torch.nn.functional.interpolate(coarse, scale_factor=4, mode="bilinear")
    assert 0 < (out - up).abs().amax(1).gt(1e-5).float().mean() < 1

"""PointRend instance heads against the detectron2 parity fixtures (d2_pointrend_*)."""

from __future__ import annotations

import pytest
import torch

from detseg.instance.pointrend import PointRendMaskHead
from tests.parity import fixture_names, run_fixture

NAMES = [n for n in fixture_names("d2_pointrend_") if "semseg" not in n]


def test_fixtures_are_found(shared) -> None:
    assert len(NAMES) == 3, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_parity(shared, name: str) -> None:
    diffs = run_fixture(name)
    assert diffs and max(diffs.values()) <= 1e-4, diffs


def test_schedule_and_empty_input() -> None:
    head = PointRendMaskHead(in_channels=8, num_classes=3, conv_dim=8, fc_dim=16, point_fc_dim=8)
    assert (head.init_resolution, head.steps) == (28, 3)
    head.eval()
    with torch.no_grad():
        logits, coarse = head(torch.zeros(1, 8, 8, 8), torch.zeros(0, 4), torch.zeros(0))
    assert logits.shape == (0, 1, 28, 28) and coarse.shape == (0, 3, 7, 7)
    with torch.no_grad():
        boxes = torch.tensor([[2.0, 3.0, 20.0, 25.0]])
        logits, _ = head(torch.randn(1, 8, 8, 8), boxes, torch.tensor([2.0]))
    assert logits.shape == (1, 1, 224, 224) and torch.isfinite(logits).all()

"""PointRend instance heads against the detectron2 parity fixtures (d2_pointrend_*)."""

from __future__ import annotations

import pytest
import torch

from detseg.engine.fast import accelerate
from detseg.errors import CheckpointError
from detseg.instance.maskrcnn import convert_detectron2
from detseg.instance.pointrend import PointHead, PointRendMaskHead, PointRendRCNN, class_channel
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


def test_fast_path_subdivides_to_the_same_logits() -> None:
    """accelerate's head (predicted class only, point layers as row convolutions) = the reference."""
    torch.manual_seed(0)
    head = PointRendMaskHead(in_channels=8, num_classes=3, conv_dim=8, fc_dim=16, point_fc_dim=8)
    head.eval()
    fast = accelerate(head)
    assert fast.point_head.fast_inference and not head.point_head.fast_inference
    p2 = torch.randn(1, 8, 16, 16)
    boxes = torch.tensor([[2.0, 3.0, 40.0, 50.0], [10.0, 0.0, 60.0, 30.0]])
    classes = torch.tensor([2.0, 0.0])
    with torch.no_grad():
        expected, actual = head(p2, boxes, classes)[0], fast(p2, boxes, classes)[0]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_fast_path_in_pieces_of_rois_across_images(monkeypatch) -> None:
    """The fast point head runs on pieces of RoIs (here 2, across two images' boxes): the same
    logits as the reference on all RoIs at once."""
    torch.manual_seed(0)
    head = PointRendMaskHead(in_channels=8, num_classes=3, conv_dim=8, fc_dim=16, point_fc_dim=8)
    fast = accelerate(head.eval())
    calls: list[int] = []
    real_head = fast.point_head.forward
    monkeypatch.setattr(
        fast.point_head, "forward", lambda *a: calls.append(len(a[0])) or real_head(*a)
    )
    monkeypatch.setattr("detseg.instance.pointrend.rows_per_kept_block", lambda row_bytes: 2)
    p2 = torch.randn(2, 8, 16, 16)
    boxes = [
        torch.tensor([[2.0, 3.0, 40.0, 50.0], [10.0, 0.0, 60.0, 30.0], [5.0, 5.0, 20.0, 20.0]]),
        torch.tensor([[0.0, 0.0, 64.0, 64.0], [30.0, 12.0, 50.0, 60.0]]),
    ]
    classes = torch.tensor([2, 0, 1, 1, 2])
    with torch.no_grad():
        expected = class_channel(head.predict(p2, boxes, classes)[0], classes)
        actual = fast.predict(p2, boxes, classes)[0]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert calls[:3] == [2, 1, 2]  # image 0: 2 + 1 RoIs, image 1: 2


@pytest.mark.parametrize("each_layer", [True, False])
def test_point_head_rows_equal_the_reference(each_layer: bool) -> None:
    torch.manual_seed(0)
    head = PointHead(8, num_classes=5, fc_dim=16, coarse_pred_each_layer=each_layer).eval()
    fast = accelerate(head)
    fine, coarse, classes = torch.randn(3, 8, 11), torch.randn(3, 5, 11), torch.tensor([4, 0, 2])
    with torch.no_grad():
        for wanted in (None, classes):
            expected, actual = head(fine, coarse, wanted), fast(fine, coarse, wanted)
            assert actual.shape == expected.shape == (3, 5 if wanted is None else 1, 11)
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_whole_model_runs_and_renders_at_224() -> None:
    model = PointRendRCNN(detections_per_image=2).eval()
    assert "roi_heads.mask_head.coarse_head.fc1.weight" in model.state_dict()
    with torch.no_grad():
        boxes, scores, classes, masks, count = model(
            torch.rand(3, 64, 96) * 255, torch.tensor([32.0, 48.0])
        )
    assert boxes.shape == (2, 4) and masks.shape == (2, 32, 48) and count.shape == (1,)
    assert (boxes[:, 2] <= 48).all() and (boxes[:, 3] <= 32).all()


def test_old_key_generations_are_renamed() -> None:
    model = PointRendRCNN()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    old = {
        k.replace(
            "roi_heads.mask_head.coarse_head.fc", "roi_heads.mask_coarse_head.coarse_mask_fc"
        ).replace("roi_heads.mask_head.point_head.", "roi_heads.mask_point_head."): v
        for k, v in state.items()
    }
    assert "roi_heads.mask_coarse_head.coarse_mask_fc1.weight" in old
    kwargs, converted = convert_detectron2(old, "roi_heads.mask_head.point_head.fc1.weight")
    assert kwargs == {"num_classes": 80}
    assert set(converted) == set(state)
    with pytest.raises(CheckpointError):
        convert_detectron2(old, "roi_heads.mask_head.mask_fcn1.weight")

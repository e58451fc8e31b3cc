"""HOG + linear SVM sliding-window detector on tiny synthetic images (a bright square is the object)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

from detseg.api import load_model  # noqa: E402
from detseg.checkpoint import CheckpointMeta, save_checkpoint  # noqa: E402
from detseg.data.coco import Category, DetectionSet  # noqa: E402
from detseg.detection.hog_svm import HogSvmDetector, train_hog_svm  # noqa: E402
from tests.detection.squares import SMALL_HOG as SMALL  # noqa: E402
from tests.detection.squares import square_dataset, square_image  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> HogSvmDetector:
    data = square_dataset(tmp_path_factory.mktemp("squares"), 8, seed=0)
    model, history = train_hog_svm(data, rounds=1, negatives_per_image=20, seed=0, **SMALL)
    assert [h["round"] for h in history] == [0, 1] and history[1]["hard_added"] >= 0
    assert history[1]["negatives"] == history[0]["negatives"] + history[1]["hard_added"]
    return model


def test_finds_the_square(trained: HogSvmDetector) -> None:
    rng = np.random.default_rng(123)  # images the detector never saw
    for _ in range(4):
        image, box = square_image(rng)
        det = trained.detect(image)
        assert len(det) >= 1 and det.class_names == ("square",)
        best = int(det.scores.argmax())
        iou = float(box_iou(det.boxes[best : best + 1], torch.from_numpy(box[None]).float()))
        assert iou >= 0.5, (det.boxes[best], box)
        assert float(det.scores[best]) > 0.5
        assert det.boxes.dtype == torch.float32 and det.labels.dtype == torch.int64


def test_background_scores_low(trained: HogSvmDetector) -> None:
    rng = np.random.default_rng(7)
    blank = rng.normal(50, 12, (96, 96, 3)).clip(0, 255).astype(np.uint8)
    det = trained.detect(blank)
    assert len(det) == 0 or float(det.scores.max()) < 0.5


def test_nms_leaves_no_overlapping_pair(trained: HogSvmDetector) -> None:
    image, _ = square_image(np.random.default_rng(5))
    trained.score_thresh = 1e-4  # many candidates, so that NMS has work
    try:
        det = trained.detect(image)
    finally:
        trained.score_thresh = 0.05
    assert len(det) > 1
    iou = box_iou(det.boxes, det.boxes).fill_diagonal_(0)
    assert float(iou.max()) <= trained.nms_thresh + 1e-6
    assert bool((det.scores[:-1] >= det.scores[1:]).all())


def test_window_vectors_match_the_block_grid() -> None:
    """A window cut out on the cell grid has the same HOG vector as the full image's block slice,
    and ``decision_map`` is the dot product of the weight with it (layout agreement)."""
    model = HogSvmDetector(**SMALL)
    image, _ = square_image(np.random.default_rng(1))
    torch.manual_seed(0)
    model.weight.copy_(torch.randn(model.feature_dim))
    model.bias.fill_(0.3)
    blocks = model.hog_blocks(image)
    r, c = 5, 7  # window origin in cells; its object box starts one cell (context) further
    ppc, k = model.ppc, model.context
    box = ((c + k) * ppc, (r + k) * ppc, (c + 6 - k) * ppc, (r + 6 - k) * ppc)
    vec = model.crop_features(image, box)
    br, bc = model.block_grid
    expected = blocks[:, r : r + br, c : c + bc].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(vec, expected, atol=1e-5, rtol=0)
    margin = float(model.decision_map(blocks)[r, c])
    assert margin == pytest.approx(float(expected @ model.weight) + 0.3, abs=1e-4)
    assert model.window_boxes(torch.tensor([r]), torch.tensor([c]), 1.0).tolist() == [list(box)]


def test_calibration_is_monotone_probability(trained: HogSvmDetector) -> None:
    a, _ = trained.calibration.tolist()
    assert a > 0
    p = trained.probability(torch.linspace(-1, 1, 9))
    assert bool((p[1:] >= p[:-1]).all()) and float(p[-1]) > float(p[0])
    assert 0 <= float(p.min()) and float(p.max()) <= 1


def test_checkpoint_round_trip(trained: HogSvmDetector, tmp_path: Path) -> None:
    path = tmp_path / "hog.safetensors"
    save_checkpoint(path, trained, CheckpointMeta(model="hog_svm", kwargs=trained.config()))
    assert b"pickle" not in path.read_bytes()[:64]
    loaded = load_model(weights=path, device="cpu")
    assert loaded.name == "hog_svm" and loaded.class_names == ("square",)
    image, _ = square_image(np.random.default_rng(9))
    a, b = trained.detect(image), loaded.model.detect(image)
    torch.testing.assert_close(a.boxes, b.boxes)
    torch.testing.assert_close(a.scores, b.scores)


def test_bad_settings_and_missing_class() -> None:
    with pytest.raises(ValueError, match="no object"):
        HogSvmDetector(window=(2, 2), context=1)
    from detseg.errors import DetsegError

    empty = DetectionSet([], [Category(1, "square")], Path("nowhere"))
    with pytest.raises(DetsegError, match="no 'square' boxes"):
        train_hog_svm(empty, **SMALL)


@pytest.mark.slow
def test_balloon_val_ap50(shared: Path, tmp_path: Path) -> None:
    """Trained on balloon train (2 hard-negative rounds), box AP50 on val is 0.4645 here."""
    from detseg.detection.pipeline import train_detection
    from tests.conftest import need

    root = need(shared / "data" / "balloon")
    summary = train_detection(
        model="hog_svm", data=root, out_dir=tmp_path, class_name="balloon", progress=False
    )
    assert summary["best_AP50"] > 0.4, summary

"""Sliding-window inference against whole-image inference and a brute-force full-accumulator reference."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from detseg.data.preprocess import Preprocess
from detseg.errors import DetsegError
from detseg.semantic.sliding import (
    predict_semantic,
    sliding_window_predict,
    whole_image_predict,
    window_starts,
)

NUM_CLASSES = 5
PRE = Preprocess(channel_order="BGR", post_scale=0.5)


def _model(stride: int = 1) -> nn.Module:
    """A deterministic conv net with a 5x5 receptive field: window borders change its logits."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=stride, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, NUM_CLASSES, 3, padding=1),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))  # logits of order 1
    return model.eval()


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _reference(model: nn.Module, image: np.ndarray, crop: tuple[int, int], stride: tuple[int, int]):
    """Averaged logits over a (C, H, W) accumulator, windows placed by mmseg's grid formula."""
    x = PRE(image)
    height, width = image.shape[:2]
    win_h, win_w = min(crop[0], height), min(crop[1], width)
    total = torch.zeros((NUM_CLASSES, height, width))
    count = torch.zeros((height, width))
    with torch.no_grad():
        for gy in range(max(height - crop[0] + stride[0] - 1, 0) // stride[0] + 1):
            y = min(gy * stride[0], height - win_h)
            for gx in range(max(width - crop[1] + stride[1] - 1, 0) // stride[1] + 1):
                x0 = min(gx * stride[1], width - win_w)
                total[:, y : y + win_h, x0 : x0 + win_w] += model(
                    x[None, :, y : y + win_h, x0 : x0 + win_w]
                )[0]
                count[y : y + win_h, x0 : x0 + win_w] += 1
    assert count.min() >= 1
    scores, labels = (total / count).softmax(dim=0).max(dim=0)
    return labels, scores


def _assert_same(result, labels: torch.Tensor, scores: torch.Tensor, atol: float = 1e-6) -> None:
    """Same labels, scores within ``atol``: 1e-6 for the same convolutions; looser where crops of
    another size or batch may round the convolutions differently."""
    assert result.labels.dtype == torch.int64 and result.scores.dtype == torch.float32
    assert torch.equal(result.labels, labels)
    assert (result.scores - scores).abs().max() <= atol


@pytest.mark.parametrize("crop", [(37, 45), (64, 64), (40, 100)])
@pytest.mark.parametrize("size_divisor", [1, 8])
@pytest.mark.parametrize("model_stride", [1, 2])
def test_one_window_equals_whole_image(crop, size_divisor, model_stride):
    model, image = _model(model_stride), _image(37, 45)
    whole = whole_image_predict(model, image, PRE, NUM_CLASSES, size_divisor=size_divisor)
    assert whole.labels.shape == (37, 45)
    sliding = sliding_window_predict(
        model, image, PRE, NUM_CLASSES, crop=crop, stride=16, size_divisor=size_divisor
    )
    _assert_same(sliding, whole.labels, whole.scores)


@pytest.mark.parametrize(
    "size, crop, stride",
    [
        ((50, 70), (24, 32), (16, 20)),
        ((20, 100), (32, 32), (24, 24)),
        ((33, 33), (10, 10), (10, 10)),
    ],
)
def test_averaging_matches_full_accumulator(size, crop, stride):
    model, image = _model(), _image(*size)
    labels, scores = _reference(model, image, crop, stride)
    whole = whole_image_predict(model, image, PRE, NUM_CLASSES)
    assert not torch.equal(whole.scores, scores)  # window borders matter: the comparison can fail
    result = sliding_window_predict(
        model, image, PRE, NUM_CLASSES, crop=crop, stride=stride, batch_size=2
    )
    _assert_same(result, labels, scores, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    crop=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    data=st.data(),
)
def test_random_grids_match_full_accumulator(height, width, crop, data):
    stride = (data.draw(st.integers(1, crop[0])), data.draw(st.integers(1, crop[1])))
    model, image = _model(), _image(height, width, seed=height * 41 + width)
    labels, scores = _reference(model, image, crop, stride)
    result = sliding_window_predict(
        model, image, PRE, NUM_CLASSES, crop=crop, stride=stride, batch_size=3
    )
    _assert_same(result, labels, scores, atol=1e-5)


@given(size=st.integers(1, 400), crop=st.integers(1, 128), data=st.data())
def test_windows_cover_every_pixel_and_stay_inside(size, crop, data):
    stride = data.draw(st.integers(1, crop))
    length = min(crop, size)
    starts = window_starts(size, crop, stride)
    assert starts[0] == 0 and starts[-1] + length == size
    assert all(0 < b - a <= stride for a, b in pairwise(starts))
    covered = np.zeros(size, dtype=int)
    for s in starts:
        assert 0 <= s <= size - length
        covered[s : s + length] += 1
    assert covered.min() >= 1


def test_image_smaller_than_crop_is_padded_and_cropped_back():
    model, image = _model(stride=2), _image(20, 30)
    result = sliding_window_predict(
        model, image, PRE, NUM_CLASSES, crop=64, stride=48, size_divisor=16
    )
    assert result.labels.shape == result.scores.shape == (20, 30)
    whole = whole_image_predict(model, image, PRE, NUM_CLASSES, size_divisor=16)
    _assert_same(result, whole.labels, whole.scores)


def test_batch_size_does_not_change_the_result():
    model, image = _model(), _image(60, 80)
    one = sliding_window_predict(model, image, PRE, NUM_CLASSES, crop=24, stride=16, batch_size=1)
    three = sliding_window_predict(model, image, PRE, NUM_CLASSES, crop=24, stride=16, batch_size=3)
    _assert_same(three, one.labels, one.scores, atol=1e-5)


def test_progress_counts_every_window():
    calls: list[tuple[int, int]] = []
    sliding_window_predict(
        _model(), _image(50, 70), PRE, NUM_CLASSES, crop=(24, 32), stride=(16, 20), batch_size=2,
        progress=lambda done, total: calls.append((done, total)),
    )  # fmt: skip
    assert calls[-1] == (9, 9)  # rows start at 0, 16, 26; columns at 0, 20, 38
    assert [d for d, _ in calls] == sorted({d for d, _ in calls})


def test_double_precision_model_gives_the_same_labels():
    image = _image(30, 40)
    single = sliding_window_predict(_model(), image, PRE, NUM_CLASSES, crop=16, stride=12)
    double = sliding_window_predict(_model().double(), image, PRE, NUM_CLASSES, crop=16, stride=12)
    assert torch.equal(single.labels, double.labels)
    assert (single.scores - double.scores).abs().max() <= 1e-4


def test_predict_semantic_dispatches():
    model, image = _model(), _image(30, 40)
    kwargs = dict(crop=16, stride=12, batch_size=2)
    sliding = predict_semantic(model, image, PRE, NUM_CLASSES, mode="sliding", **kwargs)
    _assert_same(
        sliding_window_predict(model, image, PRE, NUM_CLASSES, **kwargs),
        sliding.labels,
        sliding.scores,
    )
    whole = predict_semantic(model, image, PRE, NUM_CLASSES, class_names=tuple("abcde"))
    assert whole.class_names == tuple("abcde")
    _assert_same(whole_image_predict(model, image, PRE, NUM_CLASSES), whole.labels, whole.scores)
    with pytest.raises(ValueError, match="unknown inference mode"):
        predict_semantic(model, image, PRE, NUM_CLASSES, mode="tiled")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(crop=16, stride=17), "larger than the crop"),
        (dict(crop=0, stride=1), "crop 0 is invalid"),
        (dict(crop=(16, 16, 16), stride=8), "crop"),
        (dict(crop=16, stride=8, batch_size=0), "batch size 0"),
    ],
)
def test_bad_settings_are_user_errors(kwargs, match):
    with pytest.raises(DetsegError, match=match):
        sliding_window_predict(_model(), _image(30, 40), PRE, NUM_CLASSES, **kwargs)


def test_wrong_class_count_is_a_programming_error():
    with pytest.raises(ValueError, match="predicts 5 classes"):
        sliding_window_predict(_model(), _image(30, 40), PRE, 7, crop=16, stride=12)

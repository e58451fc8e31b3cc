"""GFM test-time strategies and the matte / eval entry points."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from detseg.errors import DetsegError
from detseg.matting import gfm_infer
from detseg.matting.gfm import GFM
from detseg.matting.gfm_infer import (
    evaluate_matting_model,
    hybrid_merge,
    infer_gfm,
    matte_images,
    scaled_size,
)


def test_scaled_size_official_rule() -> None:
    assert scaled_size(497, 800, 1 / 2) == (224, 384)
    assert scaled_size(497, 800, 1 / 3) == (160, 256)
    assert scaled_size(4000, 4000, 1 / 2) == (1600, 1600)
    with pytest.raises(DetsegError, match="too small"):
        scaled_size(60, 400, 1 / 2)


def test_hybrid_merge_rules() -> None:
    glance = np.array([0.0, 128.0, 255.0, 200.0])
    focus = np.array([0.4, 0.5, 0.3, 0.7])
    np.testing.assert_allclose(hybrid_merge("TT", glance, focus), [0, 0.5, 1, 0.7])
    np.testing.assert_allclose(
        hybrid_merge("BT", glance, focus), [0, 0.002, 0.7, 200 / 255 - 0.7], atol=1e-3
    )
    np.testing.assert_allclose(hybrid_merge("FT", glance, focus), [0.4, 1, 1, 1])


@pytest.fixture(scope="module")
def net() -> GFM:
    torch.manual_seed(0)
    return GFM("r34", "TT").eval()


@pytest.mark.parametrize("strategy", ["hybrid", "resize"])
def test_infer_gfm_shapes_and_merge(net: GFM, strategy: str) -> None:
    image = np.random.default_rng(0).integers(0, 256, (100, 140, 3), dtype=np.uint8)
    out = infer_gfm(net, image, strategy)
    assert all(v.shape == (100, 140) for v in out.values())
    assert 0 <= out["alpha"].min() and out["alpha"].max() <= 1
    if strategy == "hybrid":
        np.testing.assert_array_equal(out["alpha"], hybrid_merge("TT", out["glance"], out["focus"]))


def test_matte_and_eval_entry_points(net: GFM, tmp_path) -> None:
    data = tmp_path / "data"
    for sub in ("input", "alpha", "trimap"):
        (data / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    alpha = np.zeros((96, 128), np.uint8)
    alpha[30:70, 40:90] = 255
    trimap = np.where(alpha > 0, 255, 0).astype(np.uint8)
    trimap[25:75, 35:95][alpha[25:75, 35:95] == 0] = 128
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(
        data / "input" / "x.png"
    )
    Image.fromarray(alpha).save(data / "alpha" / "x.png")
    Image.fromarray(trimap).save(data / "trimap" / "x.png")
    weights = tmp_path / "gfm_r34_tt.pth"
    torch.save(net.state_dict(), weights)
    written = matte_images(data / "input", tmp_path / "out", weights=weights)
    assert [p.name for p in written] == ["x.png"] and (tmp_path / "out" / "x_rgba.png").exists()
    assert np.array(Image.open(written[0])).shape == (96, 128)
    scores = evaluate_matting_model(data, tmp_path / "pred", method="closed-form")
    assert scores["count"] == 1 and {"SAD", "Grad", "Conn", "SAD_fg"} <= set(scores["mean"])
    assert scores["mean"]["SAD_fg"] == 0  # closed-form keeps the known regions
    with pytest.raises(DetsegError, match="no bundled weights"):
        matte_images(data / "input", tmp_path / "o2")
    with pytest.raises(DetsegError, match="needs --trimap"):
        matte_images(data / "input", tmp_path / "o2", method="closed-form")


def test_matte_runs_the_fast_path_unless_exact(net: GFM, tmp_path, monkeypatch) -> None:
    """``detseg matte --model gfm_*``: fast path (BN folded) by default, the reference with
    ``exact``, bf16 autocast with ``precision="bf16"``; the three alphas agree."""
    (tmp_path / "in").mkdir()
    photo = np.random.default_rng(2).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "in" / "x.png")
    weights = tmp_path / "gfm_r34_tt.pth"
    torch.save(net.state_dict(), weights)
    seen = []
    infer = gfm_infer.infer_gfm

    def spy(model: nn.Module, image: np.ndarray, strategy: str = "hybrid"):
        autocast = []
        hooks = [
            m.register_forward_pre_hook(
                lambda *_: autocast.append(torch.is_autocast_enabled("cpu"))
            )
            for m in model.modules()
            if isinstance(m, nn.Conv2d)
        ]
        try:
            return infer(model, image, strategy)
        finally:
            for hook in hooks:
                hook.remove()
            has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
            seen.append((has_bn, set(autocast)))

    monkeypatch.setattr(gfm_infer, "infer_gfm", spy)
    alphas = {}
    for label, options in {
        "exact": {"exact": True},
        "fast": {},
        "bf16": {"precision": "bf16"},
    }.items():
        (path,) = matte_images(tmp_path / "in", tmp_path / label, weights=weights, **options)
        alphas[label] = np.asarray(Image.open(path), dtype=np.int16)
    assert seen == [(True, {False}), (False, {False}), (False, {True})]
    assert np.abs(alphas["fast"] - alphas["exact"]).max() <= 1  # 8-bit truncation
    assert alphas["bf16"].shape == alphas["exact"].shape
    with pytest.raises(DetsegError, match="--exact runs the float32 reference path"):
        matte_images(tmp_path / "in", tmp_path / "o", weights=weights, exact=True, precision="bf16")
    with pytest.raises(DetsegError, match="is for models"):
        matte_images(
            tmp_path / "in", tmp_path / "o", method="knn", trimap=weights, precision="bf16"
        )
    assert not (tmp_path / "o").exists()

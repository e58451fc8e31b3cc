"""Matting metrics against the official GFM evaluation outputs and hand-worked cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from detseg.errors import DetsegError
from detseg.matting import metrics as M

KEYS = {
    "sad": "SAD",
    "mse": "MSE",
    "mad": "MAD",
    "grad": "Grad",
    "conn": "Conn",
    "sad_trimap": "SAD_trimap",
    "mse_trimap": "MSE_trimap",
    "mad_trimap": "MAD_trimap",
    "sad_fg": "SAD_fg",
    "sad_bg": "SAD_bg",
}


def test_official_gfm_reference(shared) -> None:
    ref = json.loads((shared / "data" / "gfm_eval_reference.json").read_text())
    z = np.load(shared / "data" / "gfm_eval_reference.npz")
    got = M.evaluate_matte(z["pred"].astype(np.float64), z["alpha_u8"], z["trimap_k11"])
    for key, want in ref["expected"].items():
        rtol = ref["tolerance"]["grad_rel"] if key == "grad" else 0
        assert got[KEYS[key]] == pytest.approx(want, rel=rtol, abs=ref["tolerance"]["default_abs"])


def test_hand_worked_sad_mse_mad() -> None:
    gt = np.zeros((2, 2))
    pred = np.array([[0.5, 0.0], [0.0, 1.0]])
    assert M.sad(pred, gt) == pytest.approx(1.5 / 1000)
    assert M.mse(pred, gt) == pytest.approx((0.25 + 1) / 4)
    assert M.mad(pred, gt) == pytest.approx(1.5 / 4)
    trimap = np.array([[128, 0], [0, 255]], dtype=np.uint8)
    # forcing: pred -> [[0.5, 0], [0, 1]] (already); |U| = 1
    sad_t, mse_t, mad_t = M.trimap_sad_mse_mad(pred, gt, trimap)
    assert (sad_t, mse_t, mad_t) == pytest.approx((1.5e-3, 1.25, 1.5))
    dim = M.evaluate_matte(pred, gt, trimap, "dim")
    assert dim["SAD"] == pytest.approx(0.5e-3) and dim["MSE"] == pytest.approx(0.25)
    assert dim["SAD_fg"] == pytest.approx(1e-3) and dim["SAD_bg"] == 0


def test_gradient_and_connectivity_zero_for_perfect_prediction() -> None:
    rng = np.random.default_rng(0)
    gt = rng.random((20, 30))
    for convention in ("gfm", "dim"):
        assert M.gradient_error(gt, gt, convention=convention) == 0
        assert M.connectivity_error(gt, gt, convention=convention) == 0


def test_gradient_error_of_a_step_against_flat() -> None:
    gt = np.zeros((21, 21))
    pred = gt.copy()
    pred[:, 11:] = 1.0
    # Only pred has gradients; GFM: sum of squared magnitudes / 10, independent of image content.
    expected = float((M._gfm_gradient_magnitude(pred, 1.4).astype(np.float64) ** 2).sum()) / 10
    assert M.gradient_error(pred, gt) == pytest.approx(expected, rel=1e-6)
    assert M.gradient_error(pred, gt) > 0


def test_dim_kernel_is_unit_norm_9x9_and_odd() -> None:
    k = M.dim_gradient_kernel(1.4)
    assert k.shape == (9, 9)
    assert np.sqrt((k**2).sum()) == pytest.approx(1.0)
    np.testing.assert_allclose(k, -k[:, ::-1])


def test_connectivity_hand_worked() -> None:
    # One pixel of pred (0.5) disconnected from everything at threshold 0.1: level map 0 there,
    # phi(pred) = 1 - 0.5, phi(gt=0) = 1 -> error 0.5 / 1000.
    gt = np.zeros((3, 3))
    gt[0, 0] = 1.0
    pred = gt.copy()
    pred[2, 2] = 0.5
    assert M.connectivity_error(pred, gt) == pytest.approx(0.5 / 1000)


def _write(path, arr) -> None:
    Image.fromarray(arr).save(path)


def test_evaluate_folder(tmp_path) -> None:
    for d in ("pred", "alpha", "trimap"):
        (tmp_path / d).mkdir()
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 255
    trimap = np.full((8, 8), 128, np.uint8)
    _write(tmp_path / "alpha" / "a.png", gt)
    _write(tmp_path / "trimap" / "a.png", trimap)
    _write(tmp_path / "pred" / "a.png", gt)
    out = M.evaluate_folder(tmp_path / "pred", tmp_path / "alpha", tmp_path / "trimap")
    assert out["count"] == 1 and out["mean"]["SAD"] == 0 and "SAD_fg" in out["mean"]
    _write(tmp_path / "pred" / "b.png", gt)
    with pytest.raises(DetsegError, match="no same-named ground truth"):
        M.evaluate_folder(tmp_path / "pred", tmp_path / "alpha")
    (tmp_path / "pred" / "b.png").unlink()
    _write(tmp_path / "pred" / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DetsegError, match="sizes differ"):
        M.evaluate_folder(tmp_path / "pred", tmp_path / "alpha")
    with pytest.raises(DetsegError, match="convention"):
        M.evaluate_folder(tmp_path / "pred", tmp_path / "alpha", convention="x")
    with pytest.raises(DetsegError, match="does not exist"):
        M.evaluate_folder(tmp_path / "nope", tmp_path / "alpha")

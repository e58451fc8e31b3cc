"""Composition: alpha blending, trimap helpers vs the official outputs, RSSN steps and seeding."""

from __future__ import annotations

import numpy as np
import pytest

from detseg.errors import DetsegError
from detseg.matting import composite as C


def test_alpha_composite_hand_worked() -> None:
    fg = np.full((1, 2, 3), 200.0)
    bg = np.full((1, 2, 3), 100.0)
    out = C.alpha_composite(fg, bg, np.array([[0.25, 1.0]]))
    np.testing.assert_allclose(out[0, :, 0], [125.0, 200.0])
    with pytest.raises(DetsegError):
        C.alpha_composite(fg, np.zeros((2, 2, 3)), np.ones((1, 2)))


def test_trimap_helpers_match_official(shared) -> None:
    z = np.load(shared / "data" / "gfm_eval_reference.npz")
    a = z["alpha_u8"]
    np.testing.assert_array_equal(C.trimap_from_alpha(a, 11), z["trimap_k11"])
    np.testing.assert_array_equal(C.trimap_from_alpha(a, 25), z["trimap_k25"])
    np.testing.assert_array_equal(C.dilate_mask(a, 50), z["dilation_k50"])
    np.testing.assert_array_equal(C.erode_mask(a, 50), z["erosion_k50"])


def test_trimap_hand_worked() -> None:
    a = np.zeros((9, 9), np.uint8)
    a[2:7, 2:7] = 255
    t = C.trimap_from_alpha(a, 3)
    assert t[4, 4] == 255 and t[0, 0] == 0 and t[2, 2] == 128 and t[1, 4] == 128
    assert set(np.unique(t)) == {0, 128, 255}


def test_wrap_uint8_like_numpy_cast() -> None:
    np.testing.assert_array_equal(
        C.wrap_uint8(np.array([-0.5, -1.2, 255.9, 256.0, 300.0])), [0, 255, 255, 0, 44]
    )


def _layers(seed: int = 0):
    rng = np.random.default_rng(seed)
    fg = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    bg = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    alpha = rng.random((24, 32))
    return fg, bg, alpha


OFF = C.RSSNConfig(p_denoise=0, p_blur=0, p_noise=0)


def test_rssn_all_steps_off_is_plain_composite() -> None:
    from skimage.transform import resize

    fg, bg, alpha = _layers()
    s = C.rssn_composite(fg, bg, alpha, np.random.default_rng(0), OFF)
    bg_r = resize(bg, (24, 32, 3)) * 255
    np.testing.assert_array_equal(
        s.image, np.trunc(C.alpha_composite(fg, bg_r, alpha)).astype(np.uint8)
    )
    np.testing.assert_array_equal(s.fg, fg)
    assert s.steps == {}


def test_rssn_blur_touches_background_only() -> None:
    fg, bg, alpha = _layers()
    cfg = C.RSSNConfig(p_denoise=0, p_blur=1, p_noise=0, blur_kernels=(5,))
    s = C.rssn_composite(fg, bg, alpha, np.random.default_rng(0), cfg)
    plain = C.rssn_composite(fg, bg, alpha, np.random.default_rng(0), OFF)
    assert s.steps == {"blur_kernel": 5.0}
    np.testing.assert_array_equal(s.fg, plain.fg)
    assert s.bg.std() < plain.bg.std()  # a box blur smooths the random background


def test_rssn_noise_is_shared() -> None:
    fg, bg, alpha = _layers()
    alpha[:] = 1.0  # composite == fg, so the same field must give the same result
    cfg = C.RSSNConfig(p_denoise=0, p_blur=0, p_noise=1)
    s = C.rssn_composite(fg, bg, alpha, np.random.default_rng(0), cfg)
    assert s.steps == {"noise_sigma": 10.0}
    np.testing.assert_array_equal(s.image, s.fg)
    diff = s.fg.astype(np.int16) - fg
    assert 5 < np.abs(np.where(np.abs(diff) > 128, 0, diff)).mean() < 12  # ~ 0.8 sigma


def test_rssn_denoise_uses_given_copies() -> None:
    fg, bg, alpha = _layers()
    fg_d, bg_d = np.zeros_like(fg), np.full_like(bg, 7)
    cfg = C.RSSNConfig(p_denoise=1, p_blur=0, p_noise=0)
    s = C.rssn_composite(fg, bg, alpha, np.random.default_rng(0), cfg, denoised=(fg_d, bg_d))
    assert s.steps == {"denoise": 1.0}
    assert (s.fg == 0).all() and np.abs(s.bg.astype(int) - 7).max() <= 1


def test_rssn_nlm_denoiser_smooths() -> None:
    fg, bg, alpha = _layers()
    cfg = C.RSSNConfig(p_denoise=1, p_blur=0, p_noise=0, nlm_strength=30)
    s = C.rssn_composite(fg, bg, alpha, np.random.default_rng(0), cfg)
    assert s.fg.std() < fg.std()


def test_rssn_seeded_and_probabilities() -> None:
    fg, bg, alpha = _layers()
    cfg = C.RSSNConfig(p_denoise=0)
    a = C.rssn_composite(fg, bg, alpha, np.random.default_rng(5), cfg)
    b = C.rssn_composite(fg, bg, alpha, np.random.default_rng(5), cfg)
    np.testing.assert_array_equal(a.image, b.image)
    rng = np.random.default_rng(1)
    runs = [C.rssn_composite(fg, bg, alpha, rng, cfg).steps for _ in range(200)]
    for step in ("blur_kernel", "noise_sigma"):
        assert 0.38 < np.mean([step in r for r in runs]) < 0.62
    assert {r["blur_kernel"] for r in runs if "blur_kernel" in r} == {20.0, 30.0, 40.0, 50.0, 60.0}


def test_estimate_foreground_recovers_constant_colour() -> None:
    fg = np.zeros((16, 16, 3))
    fg[..., 0] = 0.8
    bg = np.zeros((16, 16, 3))
    bg[..., 2] = 0.6
    alpha = np.tile(np.linspace(0, 1, 16), (16, 1))
    image = np.round(C.alpha_composite(fg, bg, alpha) * 255).astype(np.uint8)
    est = C.estimate_foreground(image, alpha)
    assert np.abs(est[:, 4:, 0].astype(int) - 204).max() <= 6
    assert est[:, 4:, 2].max() <= 10

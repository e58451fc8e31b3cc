"""GFM training pieces: dataset items, targets, losses (hand-worked and against the definition)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detseg.checkpoint import CheckpointMeta, save_checkpoint
from detseg.matting.composite import RSSNConfig
from detseg.matting.gfm import GFM
from detseg.matting.gfm_infer import load_gfm
from detseg.matting.gfm_training import (
    RSSNMattingDataset,
    gfm_loss,
    glance_target,
    laplacian_loss,
    make_evaluate_fn,
    make_loss_fn,
)


def _dataset(size: int = 64) -> RSSNMattingDataset:
    rng = np.random.default_rng(0)
    alpha = np.zeros((120, 150), np.uint8)
    alpha[30:90, 40:110] = 255
    alpha[28:30, 40:110] = 100
    fg = rng.integers(0, 256, (120, 150, 3), dtype=np.uint8)
    bg = rng.integers(0, 256, (90, 200, 3), dtype=np.uint8)
    return RSSNMattingDataset(
        [fg], [alpha], [bg], size=size, crop_sizes=(96,), rssn=RSSNConfig(p_denoise=0)
    )


def test_dataset_items_and_seeding() -> None:
    ds = _dataset()
    np.random.seed(3)
    a = ds[0]
    np.random.seed(3)
    b = ds[0]
    assert set(a) == {
        "image",
        "fg",
        "bg",
        "mask",
        "trimap",
        "dilation",
        "erosion",
        "dilation_sub",
        "erosion_sub",
    }
    assert a["image"].shape == (3, 64, 64) and a["mask"].shape == (1, 64, 64)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert float(a["image"].max()) <= 255 and float(a["mask"].min()) >= 0
    # Sub-maps are consistent with the maps they come from (up to bilinear rounding).
    assert (a["dilation"] - a["mask"] - a["dilation_sub"]).abs().max() <= 1


def test_glance_target_mapping() -> None:
    v = torch.tensor([0.0, 1.0, 2.0, 3.0, 128.0, 254.0, 255.0]).view(1, 1, 1, 7)
    assert glance_target(v, 3).flatten().tolist() == [0, 1, 2, 1, 1, 1, 2]
    assert glance_target(v, 2).flatten().tolist() == [0, 0, 0, 0, 0, 0, 1]


def test_laplacian_loss_zero_and_constant_shift() -> None:
    x = torch.rand(2, 1, 64, 64)
    assert float(laplacian_loss(x, x)) == 0.0
    # A constant offset survives only in the final low-pass level: loss == |c|.
    assert float(laplacian_loss(x + 0.25, x)) == pytest.approx(0.25, abs=1e-5)


def test_tt_loss_hand_worked_perfect_focus() -> None:
    """With focus == fusion == alpha the alpha terms are ~0 and comp is ~0 for an exact composite."""
    n, h, w = 1, 32, 32
    alpha = torch.zeros(n, 1, h, w)
    alpha[..., 8:24, 8:24] = 1.0
    fg, bg = torch.full((n, 3, h, w), 200.0), torch.full((n, 3, h, w), 50.0)
    batch = {
        "mask": alpha * 255,
        "trimap": torch.where(alpha > 0, 255.0, 0.0),
        "fg": fg,
        "bg": bg,
        "image": alpha * fg + (1 - alpha) * bg,
    }
    glance = torch.zeros(n, 3, h, w)
    glance[:, 2] = alpha[:, 0]
    glance[:, 0] = 1 - alpha[:, 0]
    total, logs = gfm_loss((glance, alpha, alpha), batch, "TT")
    assert logs["whole"] < 1e-5 and logs["comp"] < 1e-5
    # No unknown pixels: the official epsilon still adds 1e-6 per pixel (divided by 0 + 1).
    assert logs["focus"] == pytest.approx(h * w * 1e-6, rel=1e-4)
    # CE of sigmoid outputs used as logits: one-hot 0/1 "logits" give log(1 + 2/e) per pixel.
    assert logs["ce"] == pytest.approx(np.log(1 + 2 / np.e), rel=1e-5)
    assert float(total) == pytest.approx(
        0.25 * sum(v for k, v in logs.items() if k != "loss"), rel=1e-6
    )


@pytest.mark.parametrize("rosta", ["TT", "RIM"])
def test_loss_backward_reaches_both_branches(rosta: str) -> None:
    ds = _dataset(64)
    batch = {k: v[None] for k, v in ds[0].items()}
    model = GFM("r34", rosta)
    loss, logs = make_loss_fn(rosta)(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    head = model.decoder0_g if rosta == "TT" else model.decoder0_g_tt
    assert head[0].weight.grad.abs().sum() > 0 and model.bridge_block[0].weight.grad.abs().sum() > 0


def test_evaluate_fn_and_checkpoint_roundtrip(tmp_path) -> None:
    model = GFM("r34", "TT").eval()
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    alpha = np.zeros((64, 64), np.uint8)
    with torch.no_grad():
        scores = make_evaluate_fn([image], [alpha])(model)
        fusion = model(torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))[None])[2]
    assert scores["SAD"] == pytest.approx(float(fusion.double().sum()) / 1000, rel=1e-6)
    path = tmp_path / "gfm.safetensors"
    save_checkpoint(
        path, model, CheckpointMeta(model="gfm_r34", kwargs={"backbone": "r34", "rosta": "TT"})
    )
    loaded = load_gfm("gfm_r34", path)
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_from_folders(tmp_path) -> None:
    from PIL import Image

    from detseg.errors import DetsegError

    rng = np.random.default_rng(0)
    for sub in ("img", "alpha", "bg"):
        (tmp_path / sub).mkdir()
    alpha = np.zeros((40, 50), np.uint8)
    alpha[10:30, 10:40] = 255
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
        tmp_path / "img" / "a.png"
    )
    Image.fromarray(alpha).save(tmp_path / "alpha" / "a.png")
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(
        tmp_path / "bg" / "b.jpg"
    )
    ds = RSSNMattingDataset.from_folders(
        tmp_path / "img", tmp_path / "alpha", tmp_path / "bg", size=32, crop_sizes=(36,)
    )
    assert len(ds) == 1 and ds[0]["image"].shape == (3, 32, 32)
    np.testing.assert_array_equal(ds.alphas[0], alpha)
    Image.fromarray(alpha).save(tmp_path / "img" / "orphan.png")
    with pytest.raises(DetsegError, match="no same-named alpha"):
        RSSNMattingDataset.from_folders(tmp_path / "img", tmp_path / "alpha", tmp_path / "bg")


def test_evaluate_fn_with_test_strategy() -> None:
    model = GFM("r34", "TT").eval()
    image = np.random.default_rng(0).integers(0, 256, (70, 100, 3), dtype=np.uint8)
    with torch.no_grad():
        scores = make_evaluate_fn([image], [np.zeros((70, 100), np.uint8)], strategy="resize")(
            model
        )
    assert scores["SAD"] >= 0 and set(scores) == {"SAD", "MSE", "MAD"}

"""bgmv2 training pieces: losses, augmentations, datasets, and a small overfitting run."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import default_collate

from detseg.errors import DetsegError
from detseg.matting.bgmv2 import MattingBase, MattingRefine
from detseg.matting.bgmv2_training import (
    MattingPairs,
    augment_batch,
    base_loss,
    box_blur,
    build_training_model,
    initial_model,
    make_evaluate_fn,
    make_loss_fn,
    random_crop,
    refine_loss,
    sobel,
    train_bgmv2,
)


def test_sobel_on_a_step_edge() -> None:
    x = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(4, 1)[None, None]
    g = sobel(x)[0, 0]
    # Columns 1 and 2 see the step: (1 + 2 + 1) / 8; elsewhere only the 1e-6 floor.
    torch.testing.assert_close(g[:, 1], torch.full((4,), math.sqrt(0.25 + 1e-6)))
    torch.testing.assert_close(g[:, 0], torch.full((4,), 1e-3))


def test_base_loss_terms() -> None:
    pha = torch.tensor([[0.0, 0.5], [1.0, 0.0]]).reshape(1, 1, 2, 2)
    fgr = torch.rand(1, 3, 2, 2)
    loss, parts = base_loss((pha, fgr, torch.zeros_like(pha)), pha, fgr)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    wrong_fgr = fgr.clone()
    wrong_fgr[..., 0, 0] += 0.3  # alpha* is 0 there: ignored
    wrong_fgr[..., 0, 1] += 0.4  # counted: 3 channels * 0.4 / 12 elements
    _, parts = base_loss((pha, wrong_fgr, torch.zeros_like(pha)), pha, fgr)
    assert parts["fgr"] == pytest.approx(0.1, abs=1e-6)
    _, parts = base_loss((pha, fgr, torch.full_like(pha, 0.5)), pha, fgr)
    assert parts["err"] == pytest.approx(0.25)


def test_refine_loss_is_zero_for_a_perfect_prediction() -> None:
    pha = (torch.rand(1, 1, 8, 8) > 0.5).float()
    fgr = torch.rand(1, 3, 8, 8)
    small = torch.nn.functional.interpolate(pha, size=(2, 2), mode="bilinear")
    fgr_sm = torch.nn.functional.interpolate(fgr, size=(2, 2), mode="bilinear")
    up = torch.nn.functional.interpolate(small, size=(8, 8), mode="bilinear")
    err = (up - pha).abs()  # not exactly representable at 2x2: only check the other terms
    loss, parts = refine_loss((pha, fgr, small, fgr_sm, err[..., ::4, ::4]), pha, fgr)
    assert parts["pha"] == pytest.approx(0.0, abs=1e-6) and parts["fgr"] == pytest.approx(
        0, abs=1e-6
    )
    assert loss.item() >= parts["err"]


def test_box_blur_is_a_mean() -> None:
    x = torch.zeros(1, 1, 5, 5)
    x[..., 2, 2] = 9.0
    assert box_blur(x, 1)[..., 1:4, 1:4].eq(1.0).all() and box_blur(x, 0) is x


def test_augment_batch_composites_and_keeps_range() -> None:
    fgr, bgr = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    pha = torch.zeros(4, 1, 32, 32)
    pha[..., 8:24, 8:24] = 1.0
    torch.manual_seed(1)
    src, new_bgr = augment_batch(fgr, pha, bgr)
    assert src.shape == fgr.shape and new_bgr.shape == bgr.shape
    assert 0 <= src.min() and src.max() <= 1 and 0 <= new_bgr.min() and new_bgr.max() <= 1
    # Inside the opaque square the source is the foreground (up to the optional noise).
    assert (src[..., 8:24, 8:24] - fgr[..., 8:24, 8:24]).abs().max() < 0.2
    torch.manual_seed(1)
    again, _ = augment_batch(fgr, pha, bgr)
    torch.testing.assert_close(src, again)


def test_random_crop_sizes() -> None:
    batch = {"pha": torch.rand(2, 1, 40, 40), "fgr": torch.rand(2, 3, 40, 40)}
    for _ in range(5):
        out = random_crop(batch, 17, 40, multiple=4)
        h, w = out["pha"].shape[-2:]
        assert h % 4 == 0 and w % 4 == 0 and 16 <= min(h, w) and out["fgr"].shape[-2:] == (h, w)


@pytest.fixture
def pairs(shared) -> MattingPairs:
    return MattingPairs.from_folders(
        shared / "data" / "alphamatting", shared / "data" / "bgm_pairs", size=(48, 64), max_side=128
    )


def test_dataset_items(pairs) -> None:
    assert len(pairs) == 27
    item = pairs[3]
    assert {k: tuple(v.shape) for k, v in item.items()} == {
        "fgr": (3, 48, 64),
        "pha": (1, 48, 64),
        "bgr": (3, 48, 64),
    }
    assert all(0 <= v.min() and v.max() <= 1 for v in item.values())
    with pytest.raises(DetsegError, match="subfolders"):
        MattingPairs.from_folders(pairs.bgr[0].parent, pairs.bgr[0].parent)


def test_loss_and_eval_for_both_stages(pairs) -> None:
    batch = default_collate([pairs[i] for i in range(2)])
    val = MattingPairs(
        pairs.fgr[:2], pairs.pha[:2], pairs.bgr[:1], (48, 64), train=False, max_side=128
    )
    base = build_training_model("mobilenetv2", "base")
    refine = build_training_model("mobilenetv2", "refine", base.state_dict())
    refine.refiner.sample_pixels = 16 * 20
    torch.testing.assert_close(refine.decoder.conv4.weight, base.decoder.conv4.weight)
    for model in (base, refine):
        loss, parts = make_loss_fn((32, 48))(model.train(), batch)
        loss.backward()
        assert set(parts) == {"pha", "grad", "fgr", "err"} and math.isfinite(loss.item())
        with torch.no_grad():
            metrics = make_evaluate_fn(val)(model.eval())
        assert set(metrics) == {"SAD", "MSE", "loss"} and metrics["SAD"] > 0
    with pytest.raises(DetsegError, match="does not fit"):
        build_training_model("resnet50", "refine", base.state_dict())
    assert isinstance(base, MattingBase) and isinstance(refine, MattingRefine)


@pytest.mark.slow
def test_overfits_alphamatting_composites(shared) -> None:
    """A few alphamatting composites: the alpha SAD of the base net falls under plain Adam."""
    torch.set_num_threads(1)
    root = shared / "data" / "alphamatting"
    full = MattingPairs.from_folders(root, shared / "data" / "bgm_pairs", max_side=96)
    train = MattingPairs(full.fgr[:4], full.pha[:4], full.bgr, (64, 64), max_side=96)
    val = MattingPairs(full.fgr[:4], full.pha[:4], full.bgr, (64, 64), train=False, max_side=96)
    model = MattingBase("mobilenetv2")
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    loss_fn, evaluate = make_loss_fn(), make_evaluate_fn(val)
    curve = []
    for step in range(121):
        if step % 30 == 0:
            with torch.no_grad():
                curve.append(evaluate(model.eval())["SAD"])
        batch = default_collate([train[(2 * step + i) % len(train)] for i in range(2)])
        loss, _ = loss_fn(model.train(), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print("SAD curve", [round(s, 3) for s in curve])
    assert curve[-1] < 0.6 * curve[0], curve


def test_initial_model_from_checkpoints(tmp_path) -> None:
    refine_file, base_file = tmp_path / "refine.pth", tmp_path / "base.pth"
    official = MattingRefine("mobilenetv2", refine_kernel_size=1)
    torch.save(official.state_dict(), refine_file)
    torch.save(MattingBase("mobilenetv2").state_dict(), base_file)
    base, kwargs = initial_model("bgmv2_base_mobilenetv2", refine_file)
    assert type(base) is MattingBase and kwargs == {}
    torch.testing.assert_close(base.decoder.conv4.bias, official.decoder.conv4.bias)
    refine, kwargs = initial_model("bgmv2_mobilenetv2", refine_file)
    assert refine.refiner.kernel_size == 1 and kwargs["refine_kernel_size"] == 1
    torch.testing.assert_close(refine.refiner.conv4.bias, official.refiner.conv4.bias)
    refine, kwargs = initial_model("bgmv2_mobilenetv2", base_file)
    assert refine.refiner.kernel_size == 3 and kwargs["refine_threshold"] == 0.7
    with pytest.raises(DetsegError, match="not resnet50"):
        initial_model("bgmv2_resnet50", base_file)
    with pytest.raises(DetsegError, match="not a bgmv2 model"):
        initial_model("gfm_r34")


def test_train_bgmv2_two_stages(shared, tmp_path) -> None:
    pytest.importorskip("detseg.engine.trainer")
    data, backgrounds = shared / "data" / "alphamatting", shared / "data" / "bgm_pairs"
    common = {"data": data, "backgrounds": backgrounds, "val_data": data, "val_limit": 2}
    common |= {"batch_size": 2, "size": 32, "max_side": 64, "device": "cpu", "progress": False}
    first = train_bgmv2(model="bgmv2_base_mobilenetv2", out_dir=tmp_path / "a", steps=2, **common)
    assert first["steps"] == 2 and first["best_SAD"] > 0
    second = train_bgmv2(
        model="bgmv2_mobilenetv2",
        out_dir=tmp_path / "b",
        steps=1,
        weights=tmp_path / "a" / "last.safetensors",
        **common,
    )
    assert second["steps"] == 1 and (tmp_path / "b" / "last.safetensors").is_file()
    assert second["first_eval"]["step"] == 0
    with pytest.raises(DetsegError, match="batch-size"):
        train_bgmv2(model="bgmv2_base_mobilenetv2", **{**common, "batch_size": 1})

"""bgmv2 inference: image pairs, folders and videos end to end with random weights."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from detseg.data.images import read_image, write_image
from detseg.data.video import VideoWriter, read_frames, video_info
from detseg.errors import DetsegError
from detseg.matting.bgmv2 import MattingBase, MattingRefine
from detseg.matting.bgmv2_infer import (
    OUTPUTS,
    composite,
    matte,
    matte_files,
    matte_pair,
    parse_background,
)


@pytest.fixture(scope="module")
def model() -> MattingRefine:
    return MattingRefine("mobilenetv2", refine_sample_pixels=16 * 40).eval()


@pytest.fixture
def bgm_pair(shared, tmp_path):
    """The 0001 photo and plate downscaled to 162x90 (not divisible by 4: exercises padding)."""
    paths = []
    for name in ("0001_img.png", "0001_back.png"):
        img = Image.open(shared / "data" / "bgm_pairs" / name).convert("RGB").resize((162, 90))
        paths.append(tmp_path / name)
        img.save(paths[-1])
    return paths


def test_matte_files_on_real_pair(model, bgm_pair, tmp_path) -> None:
    src, bgr = bgm_pair
    seen = []
    written = matte_files(
        model, src, bgr, tmp_path / "out", progress=lambda n, t: seen.append((n, t))
    )
    assert seen == [(1, 1)]
    assert sorted(p.parent.name for p in written) == sorted(OUTPUTS)
    modes = {p.parent.name: Image.open(p) for p in written}
    assert {k: (im.mode, im.size) for k, im in modes.items()} == {
        "com": ("RGBA", (162, 90)),
        "pha": ("L", (162, 90)),
        "fgr": ("RGB", (162, 90)),
        "err": ("L", (162, 90)),
        "ref": ("L", (162, 90)),
    }
    ref = np.asarray(modes["ref"])
    assert set(np.unique(ref)) <= {0, 255} and 0 < (ref > 0).mean() < 1
    assert not list((tmp_path / "out").rglob(".*tmp*"))


def test_matte_pair_matches_model_and_pads(model) -> None:
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (46, 63, 3), dtype=np.uint8)
    bgr = rng.integers(0, 256, (46, 63, 3), dtype=np.uint8)
    maps = matte_pair(model, src, bgr)
    assert maps["pha"].shape == (46, 63) and maps["fgr"].shape == (46, 63, 3)
    crop_src, crop_bgr = src[:44, :60], bgr[:44, :60]
    with torch.no_grad():
        s = torch.from_numpy(crop_src).permute(2, 0, 1)[None].float() / 255
        b = torch.from_numpy(crop_bgr).permute(2, 0, 1)[None].float() / 255
        pha = model(s, b)[0][0, 0].numpy()
    np.testing.assert_allclose(matte_pair(model, crop_src, crop_bgr)["pha"], pha, atol=1e-6)
    base = matte_pair(MattingBase("mobilenetv2"), src, bgr)
    assert set(base) == {"pha", "fgr", "err"} and base["err"].shape == (46, 63)


def test_size_mismatch_is_a_clear_error(model, bgm_pair, tmp_path) -> None:
    src, bgr = bgm_pair
    small = tmp_path / "small_back.png"
    write_image(small, read_image(bgr)[:60, :100])
    with pytest.raises(DetsegError, match="--resize-bgr"):
        matte_files(model, src, small, tmp_path / "out")
    written = matte_files(model, src, small, tmp_path / "out", outputs=("pha",), resize_bgr=True)
    assert [p.name for p in written] == ["0001_img.png"]
    with pytest.raises(DetsegError, match="unknown output"):
        matte_files(model, src, bgr, tmp_path / "out", outputs=("alpha",))


def test_composite_hand_worked() -> None:
    pha = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    fgr = np.full((1, 3, 3), 0.8, dtype=np.float32)
    rgba = composite(pha, fgr)
    assert rgba[0, :, 3].tolist() == [0, 128, 255] and rgba[0, :, 0].tolist() == [0, 204, 204]
    over = composite(pha, fgr, (0, 0, 255))
    assert over[0, :, 0].tolist() == [0, 102, 204] and over[0, :, 2].tolist() == [255, 230, 204]


def test_parse_background(tmp_path) -> None:
    assert parse_background(None) is None
    assert parse_background("#78ff9b") == (120, 255, 155)
    assert parse_background("1, 2,3") == (1, 2, 3)
    write_image(tmp_path / "bg.png", np.zeros((4, 5, 3), np.uint8))
    assert parse_background(str(tmp_path / "bg.png")).shape == (4, 5, 3)
    with pytest.raises(DetsegError, match="not a colour"):
        parse_background("300,0,0")


def test_video_keeps_fps_and_frames(model, tmp_path) -> None:
    rng = np.random.default_rng(1)
    plate = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    video = tmp_path / "clip.mp4"
    with VideoWriter(video, Fraction(15, 1)) as writer:
        for _ in range(3):
            writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    write_image(tmp_path / "plate.png", plate)
    seen = []
    written = matte_files(
        model,
        video,
        tmp_path / "plate.png",
        tmp_path / "out",
        outputs=("com", "pha"),
        progress=lambda n, t: seen.append(n),
        video_preset="ultrafast",
    )
    assert seen == [1, 2, 3]  # one frame per forward pass on the CPU (video_batch_size)
    for path in written:
        info = video_info(path)
        assert (info.fps, info.width, info.height) == (Fraction(15), 64, 48)
        assert len(list(read_frames(path))) == 3


def test_matte_command_with_official_checkpoint(bgm_pair, tmp_path) -> None:
    src, bgr = bgm_pair
    weights = tmp_path / "official.pth"
    torch.save(MattingRefine("mobilenetv2", refine_kernel_size=1).state_dict(), weights)
    written = matte(
        "bgmv2_mobilenetv2",
        src,
        bgr,
        tmp_path / "out",
        weights=weights,
        device="cpu",
        outputs=("com", "ref"),
        background="#00ff00",
        progress=False,
        refine_sample_pixels=640,
    )
    com = read_image(written[0])
    assert com.shape == (90, 162, 3) and (tmp_path / "out" / "ref" / "0001_img.png").is_file()
    with pytest.raises(DetsegError, match="use --model bgmv2_mobilenetv2"):
        matte("bgmv2_resnet50", src, bgr, tmp_path / "o2", weights=weights, progress=False)


def test_base_model_writes_what_it_produces(tmp_path) -> None:
    rng = np.random.default_rng(2)
    for name in ("a.png", "plate.png"):
        write_image(tmp_path / name, rng.integers(0, 256, (30, 41, 3), dtype=np.uint8))
    base = MattingBase("mobilenetv2")
    written = matte_files(base, tmp_path / "a.png", tmp_path / "plate.png", tmp_path / "out")
    assert sorted(p.parent.name for p in written) == ["com", "err", "fgr", "pha"]
    with pytest.raises(DetsegError, match="not produced"):
        matte_files(base, tmp_path / "a.png", tmp_path / "plate.png", tmp_path / "o", ("ref",))

"""PyAV video reading and atomic writing."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from detseg.data.video import VideoWriter, is_video, read_frames, video_info
from detseg.errors import DetsegError, InputFileError


def test_roundtrip_keeps_fps_size_and_content(tmp_path) -> None:
    path = tmp_path / "v.mp4"
    with VideoWriter(path, Fraction(30000, 1001)) as writer:
        for value in (0, 120, 240):
            writer.write(np.full((33, 45, 3), value, np.uint8))  # odd size: 4:4:4 chroma
    info = video_info(path)
    assert (info.fps, info.width, info.height, info.frames) == (Fraction(30000, 1001), 45, 33, 3)
    means = [float(f.mean()) for f in read_frames(path)]
    assert np.allclose(means, [0, 120, 240], atol=3)


def test_even_sized_rgb_frames_keep_their_colours(tmp_path) -> None:
    """4:2:0 streams: RGB frames converted to YUV before x264 (BT.601, limited range) come back
    with their colours: a smooth gradient and flat primaries within a few levels."""
    yy, xx = np.mgrid[0:64, 0:96]
    gradient = np.stack([xx * 255 // 96, yy * 255 // 64, (xx + yy) * 255 // 160], -1)
    frames = [gradient.astype(np.uint8)]
    frames += [np.full((64, 96, 3), c, np.uint8) for c in ((255, 0, 0), (0, 255, 0), (30, 60, 200))]
    path = tmp_path / "c.mp4"
    with VideoWriter(path, 10) as writer:
        for frame in frames:
            writer.write(frame)
    back = list(read_frames(path))
    assert len(back) == len(frames)
    for want, got in zip(frames, back, strict=True):
        diff = np.abs(got.astype(int) - want)
        assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 6, (diff.mean(), diff.max())


def test_presets(tmp_path) -> None:
    path = tmp_path / "fast.mp4"
    with VideoWriter(path, 10, preset="ultrafast") as writer:
        for value in (0, 200):
            writer.write(np.full((16, 24), value, np.uint8))  # gray frames
    assert [round(float(f.mean())) for f in read_frames(path)] == [0, 200]
    with pytest.raises(DetsegError, match="video preset 'quick': use one of ultrafast"):
        VideoWriter(tmp_path / "x.mp4", 10, preset="quick")


def test_failures_leave_no_file(tmp_path) -> None:
    path = tmp_path / "empty.mp4"
    with pytest.raises(DetsegError, match="no frames"):
        with VideoWriter(path, 10):
            pass
    with pytest.raises(RuntimeError):
        with VideoWriter(path, 10) as writer:
            writer.write(np.zeros((8, 8, 3), np.uint8))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs(tmp_path) -> None:
    assert is_video("a.MP4") and not is_video("a.png")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(InputFileError):
        video_info(bad)
    with pytest.raises(InputFileError, match="no such"):
        list(read_frames(tmp_path / "missing.mp4"))

"""Image I/O: the bad inputs of the issue each give one clear InputFileError."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from detseg.data.images import list_images, read_image, read_label, write_image
from detseg.errors import InputFileError


def _png(path, shape=(8, 10, 3)):
    Image.fromarray(np.zeros(shape, np.uint8)).save(path)
    return path


def test_round_trip_and_palette(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (6, 7, 3), dtype=np.uint8)
    write_image(tmp_path / "a.png", img)
    assert np.array_equal(read_image(tmp_path / "a.png"), img)
    lab = np.array([[0, 1], [2, 11]], np.uint8)
    write_image(tmp_path / "l.png", lab, palette=np.zeros((256, 3), np.uint8))
    assert Image.open(tmp_path / "l.png").mode == "P"
    assert np.array_equal(read_label(tmp_path / "l.png"), lab)


def test_missing_empty_truncated(tmp_path):
    with pytest.raises(InputFileError, match="no such file"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputFileError, match="empty"):
        read_image(tmp_path / "empty.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(
        tmp_path / "full.png"
    )
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match="truncated|corrupt|readable"):
        read_image(tmp_path / "trunc.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputFileError, match="not a readable image"):
        read_image(tmp_path / "text.png")


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    _png(tmp_path / "big.png", (100, 100, 3))
    monkeypatch.setenv("DETSEG_MAX_PIXELS", "5000")
    with pytest.raises(InputFileError, match="decompression bomb"):
        read_image(tmp_path / "big.png")


def test_rgb_label_is_refused(tmp_path):
    with pytest.raises(InputFileError, match="single-channel"):
        read_label(_png(tmp_path / "rgb.png"))


def test_list_images(tmp_path):
    _png(tmp_path / "b.png")
    _png(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.png"]
    assert [p.name for p in list_images(str(tmp_path / "*.png"))] == ["a.png", "b.png"]
    with pytest.raises(InputFileError):
        list_images(tmp_path / "missing")
    with pytest.raises(InputFileError, match="matches no images"):
        list_images(str(tmp_path / "*.jpg"))


def test_output_folder_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    from detseg.errors import DetsegError

    with pytest.raises(DetsegError, match="cannot create the output folder"):
        write_image(tmp_path / "taken" / "a.png", np.zeros((2, 2, 3), np.uint8))

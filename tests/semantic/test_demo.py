"""`detseg demo` writes its data, checkpoint, overlays, curves and summary."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from detseg.semantic.demo import DEMO_CLASSES, make_shapes_image, run_demo


def test_shapes_labels_follow_the_drawn_shapes():
    image, label = make_shapes_image(np.random.default_rng(3), size=64)
    assert image.shape == (64, 64, 3) and label.shape == (64, 64)
    assert set(np.unique(label)) <= set(range(len(DEMO_CLASSES))) and label.max() > 0


def test_demo_writes_everything(tmp_path):
    result = run_demo(tmp_path, steps=2, progress=False)
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["final_mIoU"] == result["final_mIoU"]
    assert (tmp_path / "run" / "curves.png").is_file()
    overlays = sorted((tmp_path / "overlays").glob("*_overlay.png"))
    assert len(overlays) == 32
    assert np.asarray(Image.open(overlays[0])).shape == (96, 96, 3)

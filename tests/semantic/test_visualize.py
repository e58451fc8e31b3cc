"""Palettes for label maps."""

import numpy as np

from detseg.data.folders import CAMVID_CLASSES
from detseg.semantic.visualize import CAMVID_COLOURS, palette, palette_for


def test_palette_for_camvid_with_or_without_void() -> None:
    for names in (CAMVID_CLASSES, (*CAMVID_CLASSES, "Unlabelled")):
        assert np.array_equal(palette_for(names)[:11], CAMVID_COLOURS[:11])
    assert np.array_equal(palette_for(("a", "b")), palette(256))

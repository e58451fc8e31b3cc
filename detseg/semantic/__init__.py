"""Semantic segmentation models, metrics and inference; importing this package registers them."""

from detseg.semantic import deeplab, espnet, fcn, unet  # noqa: F401

"""Semantic segmentation models, metrics and inference; importing this package registers them."""

from detseg.semantic import deeplab, duc_hdc, espnet, fcn, gcn, pspnet, segnet, unet  # noqa: F401

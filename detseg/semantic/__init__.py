"""Semantic segmentation models, metrics and inference; importing this package registers them."""

from detseg.semantic import (  # noqa: F401
    deeplab,
    duc_hdc,
    espnet,
    fcn,
    gcn,
    pointrend,
    pspnet,
    segnet,
    unet,
)

"""Backbones: torchvision models as multi-scale feature extractors."""

from detseg.backbones.trunks import Backbone, FeatureInfo, build_backbone

__all__ = ["Backbone", "FeatureInfo", "build_backbone"]

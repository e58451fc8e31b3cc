"""Semantic segmentation models, metrics and inference; importing this package registers them."""

"""Data: image/label I/O with limits, datasets, preprocessing and augmentation pipelines."""

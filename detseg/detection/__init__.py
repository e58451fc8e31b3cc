"""Detection models; importing this package registers them."""

from detseg.detection import fcos, hog_svm  # noqa: F401

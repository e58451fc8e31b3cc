"""Detection models; importing this package registers them."""

from detseg.detection import fcos  # noqa: F401

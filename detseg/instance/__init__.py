"""Instance models; importing this package registers them."""

from detseg.instance import (
    maskrcnn,  # noqa: F401
    pointrend,  # noqa: F401
    polarmask,  # noqa: F401
    tensormask,  # noqa: F401
)

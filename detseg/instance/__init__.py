"""Instance models; importing this package registers them."""

from detseg.instance import (
    polarmask,  # noqa: F401
    tensormask,  # noqa: F401
)

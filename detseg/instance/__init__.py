"""Instance models; importing this package registers them."""

from detseg.instance import polarmask  # noqa: F401

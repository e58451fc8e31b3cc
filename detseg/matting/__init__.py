"""Matting models; importing this package registers them."""
from detseg.matting import bgmv2  # noqa: F401
from detseg.matting import gfm  # noqa: F401

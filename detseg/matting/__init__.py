"""Matting models; importing this package registers them."""

from detseg.matting import bgmv2, gfm  # noqa: F401

"""Matting models; importing this package registers them."""

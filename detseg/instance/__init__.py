"""Instance models; importing this package registers them."""

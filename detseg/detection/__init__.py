"""Detection models; importing this package registers them."""

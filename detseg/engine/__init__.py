"""Training loop, distributed helpers, export and batch prediction."""

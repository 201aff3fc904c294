"""Built-in data for demos and tests: a synthetic, deliberately heterogeneous multi-site federation."""

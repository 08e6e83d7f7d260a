"""Privacy plugins: secure aggregation and differential privacy."""

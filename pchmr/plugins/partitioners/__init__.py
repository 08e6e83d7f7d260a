"""pchmr."""

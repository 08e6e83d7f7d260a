"""Attack plugins for ``pchmr audit``: membership inference (and update inversion)."""

"""Built-in plugins. Each module here registers through the ``pchmr`` entry-point group, exactly as a
third-party plugin package does; nothing in :mod:`pchmr.core` imports this package."""

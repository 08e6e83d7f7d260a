"""pchmr-example-plugins: a third-party plugin package for pchmr.

It offers the ``example-cnn`` backbone (:mod:`.backbone`), the ``round-robin`` partitioner
(:mod:`.partitioner`), the ``example-ellipsoid`` body model (:mod:`.bodymodel`), the
``example-turntable`` dataset (:mod:`.dataset`), the ``example-clip`` privacy mechanism
(:mod:`.privacy`) and the ``example-rest-fit`` annotator (:mod:`.annotator`), each registered
through its own entry point of the ``pchmr`` group in this package's ``pyproject.toml``. Importing this package imports no plugin module: pchmr loads them
through the entry points when its registry first needs them.
"""

__version__ = "0.1.0"

"""Process-level settings that make CPU training faster on small machines.

glibc's malloc returns large blocks to the kernel after every free (blocks above the mmap
threshold are mmap'ed and unmapped), so each step's large activations page-fault afresh: on
the 2-core machines pchmr is developed on, an element-wise op on a 200 MB tensor ran 6x slower
than with memory kept in the heap. :func:`tune_allocator` keeps freed memory for reuse, in this
process (``mallopt``) and in child processes started afterwards (Ray workers read the
``MALLOC_*`` environment variables at start-up).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["ALLOCATOR_ENV", "tune_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: keep up to 1 GiB of freed heap before trimming it back to the kernel
_TRIM_THRESHOLD_BYTES = 1 << 30
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD_BYTES)}


def tune_allocator() -> bool:
    """Apply the settings above; returns False where glibc's ``mallopt`` is unavailable."""
    for key, value in ALLOCATOR_ENV.items():
        os.environ.setdefault(key, value)
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    return ok and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1

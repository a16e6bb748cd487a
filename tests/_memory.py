"""Giving memory back between heavy runs in one test process."""

import gc
import sys


def release_memory():
    """Drops jax's compiled programs and traces, collects garbage and gives freed heap back to
    the OS, so one run's memory is not held while the next one runs."""
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass

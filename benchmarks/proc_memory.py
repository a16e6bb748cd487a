"""Resident memory of the current process (Linux ``/proc``), for the memory benchmarks.

``benchmarks.memory`` (torch) and ``benchmarks.memory_jax`` (JAX) measure a case as the
high-water mark of resident memory after :func:`reset_hwm`, minus :func:`rss` at that point.
"""

from __future__ import annotations

import os

# glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed; blocks below
# it then come from the heap and stay resident when freed, so the high-water mark grows with
# the order of allocations rather than with live memory. Cases run with the threshold fixed at
# glibc's initial 128 KiB.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def rss() -> int:
    """Resident bytes now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm() -> int:
    """The high-water mark of resident bytes (since start or the last :func:`reset_hwm`)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm() -> bool:
    """Resets the high-water mark to the current resident size; False where the kernel
    does not allow it (the mark then counts from the process start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

"""glibc's allocator, told to give memory back (Linux/glibc only; elsewhere these do nothing).

Python's large buffers (request bodies of tens of MiB, ONNX Runtime sessions) come from malloc. By default
glibc serves an allocation over 128 KiB with its own mmap, returned to the system on free, but raises that
threshold each time such a block is freed (up to 32 MiB): after a few large bodies, the next ones land in
the heap and their memory stays with the worker. A fixed threshold keeps every large block an mmap of its
own. And freed heap memory (an unloaded model version) is handed back with malloc_trim.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("nnserve.memory")

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h); setting it turns the dynamic threshold off
MMAP_THRESHOLD_BYTES = 1 << 20


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_large_blocks_separate() -> None:
    """Every allocation of 1 MiB or more is its own mmap, unmapped when freed (call once per process)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        log.info("glibc mallopt unavailable: large blocks may stay in the heap after they are freed")


def release_freed_memory() -> None:
    """Give freed heap memory back to the system (after a model version is unloaded)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)

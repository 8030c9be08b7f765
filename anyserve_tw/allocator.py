"""Keep glibc from handing tensor-sized buffers back to the kernel on every request.

A worker allocates megabyte buffers in its handler threads (the joined frame,
numpy results, the response) and frees them a moment later.  With glibc's
defaults those came from fresh mmap()ed or re-grown pages every time: about
590 page faults per 2 x 1 MiB request in the example worker, roughly half its
CPU.  Raising the mmap and trim thresholds keeps freed memory for the next
request (worker CPU per request ~2.5 -> ~1.25 ms, req/s ~250 -> ~335).

The cost is memory held after a burst: up to ``trim_threshold`` of free heap
per malloc arena.  Users who set these themselves (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or a ``glibc.malloc.*``
tunable in ``GLIBC_TUNABLES``) are left alone, as is any libc without
``mallopt``.
"""
import ctypes
import os

from twisted.logger import Logger

log = Logger()

# mallopt() parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def user_tunes_malloc(environ):
    """True when the environment already says how malloc should behave."""
    return (any(name in environ for name in _USER_SETTINGS)
            or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""))


def keep_freed_memory(environ=None, mmap_threshold=MMAP_THRESHOLD,
                      trim_threshold=TRIM_THRESHOLD):
    """Apply the thresholds to this process; True if glibc took them."""
    environ = os.environ if environ is None else environ
    if user_tunes_malloc(environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    taken = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)
                 and mallopt(M_TRIM_THRESHOLD, trim_threshold))
    if taken:
        log.info("malloc keeps freed buffers (mmap threshold {mmap} bytes, trim threshold {trim})",
                 mmap=mmap_threshold, trim=trim_threshold)
    return taken

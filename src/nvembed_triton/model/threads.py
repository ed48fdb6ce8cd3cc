"""The model's request threads take jemalloc's per-thread cache, which the launcher's JEMALLOC_CONF
(launcher/memory.py) leaves every other thread of tritonserver and its stubs without."""

from __future__ import annotations

import ctypes


def cache_this_thread() -> bool:
    """Gives the calling thread jemalloc's per-thread cache, which JEMALLOC_CONF leaves every thread
    without: for the threads a request passes through in the model's stub (the instance's main
    thread, the lanes, the deadline thread). A lone query took ~1 ms less through
    the server with them (bench/RESULTS.md); a few hundred caches of small objects cost little,
    unlike one per tritonserver thread. True if it took; False under another malloc (glibc's caches
    every thread already)."""
    mallctl = getattr(ctypes.CDLL(None), "mallctl", None)  # jemalloc's, where it is preloaded
    if mallctl is None:
        return False
    enabled = ctypes.c_bool(True)
    return mallctl(b"thread.tcache.enabled", None, None, ctypes.byref(enabled), ctypes.c_size_t(1)) == 0

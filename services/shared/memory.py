"""Giving freed memory back to the operating system (glibc only; elsewhere a no-op).

CPython, NumPy, ONNX Runtime and CTranslate2 all allocate through malloc from several threads, so
glibc keeps one arena per thread and returns little of what they free: after a burst of work in
other threads (VAD of a long file on a thread pool, a model call) the process keeps holding that
memory, and the next burst's peak stacks on top of it. `trim()` hands back the free pages of every
arena (malloc_trim, which also releases free pages inside the heaps); it takes a few milliseconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable

log = logging.getLogger("shared.memory")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim() -> bool:
    """Return free heap memory to the OS; True if anything was released."""
    fn = _malloc_trim()
    if fn is None:
        return False
    return bool(fn(0))

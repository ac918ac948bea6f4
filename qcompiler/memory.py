"""Handing freed memory back to the system, where the C library keeps it (glibc).

A compressed model is built from many blocks of a few MB (a weight's codes, its packed copy, the
float values read for one pass): glibc serves blocks under its mmap threshold from the heap and keeps
them when they are freed, so the resident set grows by what was freed. `trim()` returns the free
pages (`malloc_trim`); `fixed_mmap_threshold()` stops glibc from raising the threshold as large
blocks are freed, so blocks of 16 MB or more always go back at once. Both do nothing elsewhere.
"""

from __future__ import annotations

import ctypes
from functools import cache

M_MMAP_THRESHOLD = -3


@cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 -- glibc only
        return libc
    except (OSError, AttributeError):
        return None


def trim() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def fixed_mmap_threshold(nbytes: int = 16 << 20) -> None:
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, nbytes)

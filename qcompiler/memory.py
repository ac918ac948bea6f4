"""Handing freed memory back to the system, where the C library keeps it (glibc).

A compressed model is built from many blocks of a few MB (a weight's codes, its packed copy, the
float values read for one pass): glibc serves blocks under its mmap threshold from the heap and keeps
them when they are freed, so the resident set grows by what was freed. `trim()` returns the free
pages (`malloc_trim`); `fixed_mmap_threshold()` stops glibc from raising the threshold as large
blocks are freed, so blocks of 16 MB or more always go back at once. `page_out()` lets the system
drop the resident pages of weights a file backs once a pass is done with them (a memory-mapped
safetensors file: read back on the next touch). All three do nothing elsewhere.
"""

from __future__ import annotations

import ctypes
import mmap
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


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now; their content stays (file pages are read back on touch)


def page_out(regions) -> int:
    """Hand back the resident pages of `regions` ((address, bytes) pairs) that a file backs, such as
    weights read from a memory-mapped safetensors file: the content never changes, the system reads
    it back from the file (its page cache) on the next touch. Anonymous memory is left alone (without
    swap it could not go anywhere; with swap it would be written out). Returns the bytes advised; 0 where
    the system cannot say which memory a file backs or cannot page out (not Linux, an old kernel)."""
    libc = _libc()
    if libc is None:
        return 0
    try:
        files = _file_spans()
    except OSError:
        return 0
    page, done = mmap.PAGESIZE, 0
    for address, nbytes in regions:
        for start, end in files:
            lo, hi = max(start, address), min(end, address + nbytes)
            lo, hi = -(-lo // page) * page, hi // page * page  # whole pages inside the region only
            if hi > lo:
                if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_PAGEOUT) != 0:
                    return done  # the kernel does not know MADV_PAGEOUT
                done += hi - lo
    return done


def _file_spans() -> list[tuple[int, int]]:
    """The address ranges of this process's mappings of files (`/proc/self/maps` lines naming a path)."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = fields[0].split("-")
                spans.append((int(start, 16), int(end, 16)))
    return spans

"""The daemon's process memory: glibc's allocator set for a frame-at-a-time daemon, and the
memory a frame leaves behind handed back after its outcome.

    tune_allocator()   once, at start, before any thread exists (Daemon.__init__):
                       M_MMAP_THRESHOLD fixed at 128 KiB: every buffer over it (a received
                       frame, a product's tiles, a mask) is its own mapping, unmapped when
                       freed. glibc otherwise raises the threshold after the first large free
                       and then keeps later megabyte-sized buffers in its heaps: a burst of
                       1,000 one-MB messages from clients that left raised the daemon's memory
                       by ~140 MB for good. (M_ARENA_MAX 2 was tried too: the same peak and
                       floor on the full-tile cut, 265.0 against 265.2 MiB, so it is not set.)
    release_memory()   after each frame's outcome (the poller, Daemon._collect_results):
                       malloc_trim(0), which returns the free pages inside every arena's heap
                       (not only at its top). The small allocations of one frame (PNG and JPEG
                       buffers, OpenVINO's and OpenCV's scratch, msgpack) leave holes that
                       grew the daemon between frames by 8-35 MB; trimmed, it goes back to the
                       same floor after every frame. It costs ~1 ms.

Both are glibc's (mallopt(3), malloc_trim(3)); elsewhere (musl, macOS) they are no-ops that
return False. The figures: docs/onboard.md, "Real time over a full tile, and memory".
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3          # mallopt's parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 128 << 10


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim     # glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def tune_allocator() -> bool:
    """The fixed mmap threshold; True when glibc took it."""
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) if _LIBC is not None else False


def release_memory() -> bool:
    """Give the free pages of every malloc arena back to the system; True if any were."""
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False

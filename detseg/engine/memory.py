"""How the fast path's large temporaries are allocated (glibc's ``malloc`` on Linux).

By default glibc hands every block from its mmap threshold up (128 KB, adapting up to 32 MB) to
the kernel when it is freed and maps a fresh one for the next request, whose pages the kernel
faults in and zeroes again: an inference loop that allocates the same large temporaries on every
call pays that on each of them. Three measures, all measured in ``docs/performance.md``:

- ``keep_freed_memory`` (process-wide, once): freed blocks up to 32 MB stay with the process;
- ``heap_blocks`` (while a fast forward runs): blocks of any size come from the heap, and so are
  kept for the next call, which matters for temporaries torch does not show, such as oneDNN's
  scratchpads for the convolutions with thousands of channels;
- ``rows_per_kept_block``: how the RoI heads cut their work into pieces that stay within the
  kept blocks whatever the allocator does (other threads, other C libraries).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import threading
from collections.abc import Iterator

KEPT_BLOCK_BYTES = 32 << 20  # the largest mmap threshold glibc accepts
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_MMAP_MAX = 65536  # glibc's default number of mapped blocks


def rows_per_kept_block(row_bytes: int) -> int:
    """How many rows of ``row_bytes`` to compute at a time so that each temporary stays within
    half of ``KEPT_BLOCK_BYTES`` (at least 1). A larger temporary is a fresh ``mmap`` on every
    call outside ``heap_blocks``, its pages faulted in and zeroed again: a 1x1 convolution with
    an 80 MB output ran at half the throughput of the same work in 20 MB pieces here."""
    return max(1, (KEPT_BLOCK_BYTES // 2) // max(1, row_bytes))


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc on Linux (``mallopt`` exists), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """Process-wide, once: let glibc keep freed blocks of up to 32 MB for reuse instead of handing
    them back to the kernel (``mallopt`` ``M_MMAP_THRESHOLD`` 32 MB, its maximum, and
    ``M_TRIM_THRESHOLD`` 1 GB). Inference allocates the same large temporaries on every call (an
    HD frame's float maps are 8-25 MB); by default each one is a fresh ``mmap``:
    BackgroundMattingV2 on real HD frames ran 4.6 frames/s that way and 13 frames/s with this.
    The cost: up to 1 GB of freed memory stays with the process. Returns whether it applied
    (glibc on Linux only; elsewhere nothing changes)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEPT_BLOCK_BYTES)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    )


class _HeapBlocks:
    """The count of running ``heap_blocks`` scopes; the first sets ``M_MMAP_MAX`` 0, the last
    restores glibc's default."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0

    def enter(self, libc: ctypes.CDLL) -> None:
        with self.lock:
            self.running += 1
            if self.running == 1:
                libc.mallopt(_M_MMAP_MAX, 0)

    def leave(self, libc: ctypes.CDLL) -> None:
        with self.lock:
            self.running -= 1
            if self.running == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)


_HEAP_BLOCKS = _HeapBlocks()


@contextlib.contextmanager
def heap_blocks() -> Iterator[None]:
    """While the block runs (several threads may be inside at once), glibc maps no block on its
    own (``M_MMAP_MAX`` 0): the blocks of the main arena, whatever their size, come from the
    heap and are reused by the next call instead of being mapped and zeroed again. oneDNN's
    scratchpad for a 3x3 convolution 4096 -> 2048 on a 16x16 map was mapped afresh on every call:
    177 ms against 112 inside this (GFM ResNet-101: 1.82-1.96 s -> 1.51-1.55 s per image).
    Only the fast path runs inside it: had every allocation of the process been served so
    (``M_MMAP_MAX`` 0 for good), the heap's fragmentation would have raised the peak memory of a
    benchmark process that runs the reference path's multi-GB temporaries too from 13.4 to 23.4
    GB. The cost: the heap keeps the fast path's largest working set between calls. Elsewhere
    than glibc on Linux it does nothing."""
    libc = _glibc()
    if libc is None:
        yield
        return
    _HEAP_BLOCKS.enter(libc)
    try:
        yield
    finally:
        _HEAP_BLOCKS.leave(libc)

"""Keep freed CPU memory in the C library's heap, so generation loops do not page-fault.

A transformer pass on CPU allocates and frees the same few hundred-kilobyte activations layer after
layer. With glibc's defaults, blocks of this size are mmap'd and handed back to the system when freed,
or the heap top is trimmed, so every new activation is fresh memory: each 4 KiB page faults and is
zeroed by the kernel on first write. For the embedded SR stage that was ~9,400 page faults and ~14 ms
of system time per image, 10-15% of its wall time.

`tune_cpu_allocator()` sets glibc's mmap threshold to 32 MiB and its trim threshold to 64 MiB: the
values glibc itself adopts (its dynamic threshold, capped at 32 MiB) once a process has freed a 32 MiB
block, set from the start. Freed activations then stay in the heap for reuse; the process keeps at
most ~64 MiB of free memory at the heap top. It is process-wide and cannot be undone, so the library
never applies it behind your back: the `cogview` command and the benchmarks call it (set
`COGVIEW_MALLOC_TUNING=0` to turn that off); call it yourself in an application that generates on CPU.
On C libraries other than glibc it does nothing and returns False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["tune_cpu_allocator", "auto_tune_cpu_allocator"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_MIB = 1 << 20

_applied: tuple[int, int] | None = None


def tune_cpu_allocator(mmap_threshold_mb: int = 32, trim_threshold_mb: int = 64) -> bool:
    """Sets glibc's mmap and trim thresholds (MiB). True when set (or already set to these values)."""
    global _applied
    for name, value in (("mmap_threshold_mb", mmap_threshold_mb), ("trim_threshold_mb", trim_threshold_mb)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1024:
            raise ValueError(f"tune_cpu_allocator: `{name}` must be an int in [1, 1024], got {value!r}")
    if _applied == (mmap_threshold_mb, trim_threshold_mb):
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold_mb * _MIB) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold_mb * _MIB) == 1 and ok
    if ok:
        _applied = (mmap_threshold_mb, trim_threshold_mb)
    return ok


def auto_tune_cpu_allocator() -> bool:
    """`tune_cpu_allocator()` unless the environment sets COGVIEW_MALLOC_TUNING=0 (for the `cogview`
    command and the benchmarks)."""
    if os.environ.get("COGVIEW_MALLOC_TUNING", "1").strip() == "0":
        return False
    return tune_cpu_allocator()

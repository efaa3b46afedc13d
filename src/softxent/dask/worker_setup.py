"""Worker setup for fits on Dask: a Dask *preload* (``dask worker --preload softxent.dask.worker_setup``).

Why: distributed's Nanny spawns every worker with ``MALLOC_TRIM_THRESHOLD_=65536``
(``distributed.nanny.pre-spawn-environ``), so that a worker hands freed memory back to the OS quickly.
Setting that variable also freezes glibc's mmap threshold at 128 KiB.  An objective evaluation allocates
its row-block temporaries (``z``, ``h``, ``delta``: rows x K, a few hundred KiB each) afresh for every
block, so in such a worker every one of them is a new ``mmap`` whose pages the kernel faults in and
zeroes, and ``munmap``-ed again after.  Measured on this project's 2-core machine: the same BLAS product
ran 15-40 % slower in a process started that way, and a worker computed the same block sums 13-25 %
slower than the client process did -- most of Dask's per-evaluation overhead in ``benchmarks/fit_dask.py``.

:func:`tune_malloc` sets glibc's thresholds to the values its own dynamic rule settles on in a plain
NumPy process (allocations below 32 MiB from the heap; the heap top trimmed past 64 MiB free), so a
worker keeps at most ~64 MiB of freed heap and reuses it instead of faulting it in again.  Larger
allocations (data blocks) are still ``mmap``-ed and returned to the OS when freed, which keeps the
out-of-core fit's memory bounded.

:func:`~softxent.dask.start_local_cluster` preloads this module into its workers.  For a cluster of your
own, start the workers with ``--preload softxent.dask.worker_setup`` (or set the Dask config key
``distributed.worker.preload``).  Elsewhere than glibc (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["tune_malloc", "dask_setup", "MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES"]

MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, the dynamic rule's ceiling
TRIM_THRESHOLD_BYTES = 64 << 20  # twice the mmap threshold: glibc's dynamic rule
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from <malloc.h>
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD_BYTES, trim_threshold: int = TRIM_THRESHOLD_BYTES) -> bool:
    """Set glibc's mmap and trim thresholds in this process; True when both were set.

    False (and nothing changed) where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl and BSD libcs have no such symbol
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                 int(trim_threshold)))


def dask_setup(worker=None):
    """Dask's preload hook: runs in each worker process at start (and after a restart)."""
    tune_malloc()

"""Worker setup for fits on Dask: a Dask *preload* (``dask worker --preload softxent.dask.worker_setup``).

Why: distributed's Nanny spawns every worker with ``MALLOC_TRIM_THRESHOLD_=65536``
(``distributed.nanny.pre-spawn-environ``), so that a worker hands freed memory back to the OS quickly.
Setting that variable also freezes glibc's mmap threshold at 128 KiB.  An objective evaluation allocates
its row-block temporaries (``z``, ``h``, ``delta``: rows x K, a few hundred KiB each) afresh for every
block, so in such a worker every one of them is a new ``mmap`` whose pages the kernel faults in and
zeroes, and ``munmap``-ed again after.  Measured on this project's 2-core machine: the same BLAS product
ran 15-40 % slower in a process started that way, and a worker computed the same block sums 13-25 %
slower than the client process did -- most of Dask's per-evaluation overhead in ``benchmarks/fit_dask.py``.

:func:`tune_malloc` lets allocations below 8 MiB come from the heap, and trims the heap's top only
past 16 MiB free, so the temporaries are reused instead of faulted in again, and a worker keeps at most
~16 MiB of freed heap beyond them.  The objective works in row blocks of 4 MiB of ``X``, so its
temporaries (rows x K) stay below 8 MiB while K <= 2 D.  Data blocks (tens of MiB) are still
``mmap``-ed and handed back to the OS when freed, as Dask intends: the out-of-core fit, which reads
every block afresh at every evaluation, keeps its memory bounded.  (glibc's own dynamic rule, which
setting ``MALLOC_TRIM_THRESHOLD_`` switches off, would raise the mmap threshold to the largest block
freed, up to 32 MiB, and keep data blocks on the heap.)

:func:`~softxent.dask.start_local_cluster` preloads this module into its workers.  For a cluster of your
own, start the workers with ``--preload softxent.dask.worker_setup`` (or set the Dask config key
``distributed.worker.preload``).  Elsewhere than glibc (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from ..objective import LinearSoftmaxObjective

__all__ = ["tune_malloc", "dask_setup", "MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES"]

MMAP_THRESHOLD_BYTES = 2 * LinearSoftmaxObjective.BLOCK_BYTES  # 8 MiB
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES  # as glibc's dynamic rule sets it
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

"""softxent's own parallelism: row blocks spread over a pool of ``n_jobs`` threads, BLAS at one thread.

Why not BLAS's threads: the products of one evaluation are skinny (K = 2-100 columns) and run block by
block, and OpenBLAS's threads spin-wait between calls -- on a 2-core machine with one core busy elsewhere
a fit took 11.6-25.6 s with 2 BLAS threads and 1.4-1.5 s with one.  Why not OpenMP (``prange``): its
threads spin-wait as well (scikit-learn's OpenMP loss was measured 60x slower next to a busy process).
A thread pool that hands out many small blocks in turn instead lets a thread on a busy core simply take
fewer of them: nothing waits for the slowest thread's fixed share.

Determinism: the caller adds the blocks' partial sums in block order (:func:`ordered_map` yields them in
that order), so a fit gives the same numbers for every ``n_jobs``.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["effective_n_jobs", "check_n_jobs", "ordered_map", "blas_single_thread"]


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def check_n_jobs(n_jobs, name: str = "n_jobs"):
    """``n_jobs`` as given, or a ValueError: None, -1 or an int >= 1 (scikit-learn's message style)."""
    if n_jobs is None or (isinstance(n_jobs, numbers.Integral) and not isinstance(n_jobs, bool)
                          and (n_jobs >= 1 or n_jobs == -1)):
        return n_jobs
    raise ValueError(f"The {name!r} parameter must be None, -1 or an int >= 1 (the number of threads; None "
                     f"and -1: every core this process may use). Got {n_jobs!r} instead.")


def effective_n_jobs(n_jobs) -> int:
    """The number of threads ``n_jobs`` stands for: None or -1 = :func:`available_cores`."""
    check_n_jobs(n_jobs)
    return available_cores() if n_jobs in (None, -1) else int(n_jobs)


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(n: int) -> ThreadPoolExecutor:
    # one long-lived pool per size: starting threads per evaluation would cost more than small blocks
    with _pools_lock:
        pool = _pools.get(n)
        if pool is None:
            pool = _pools[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="softxent")
        return pool


_blas_controller = None


@contextlib.contextmanager
def blas_single_thread():
    """BLAS (OpenBLAS, MKL, BLIS) at one thread inside the block: the pool's threads are the parallelism.

    Uses threadpoolctl (a dependency); the controller is made once, as finding the loaded BLAS libraries
    walks the process's shared objects."""
    global _blas_controller
    if _blas_controller is None:
        from threadpoolctl import ThreadpoolController

        _blas_controller = ThreadpoolController()
    with _blas_controller.limit(limits=1, user_api="blas"):
        yield


def ordered_map(fn, items, n_jobs: int):
    """``fn(item)`` for each item, yielded in the items' order, on ``n_jobs`` threads (1: inline).

    The pool's threads take the items in turn as they finish the previous one (dynamic scheduling); at
    most ``2 n_jobs`` results wait to be consumed, so the memory held stays that of a few blocks."""
    items = list(items)
    if n_jobs <= 1 or len(items) <= 1:
        for item in items:
            yield fn(item)
        return
    pool = _pool(n_jobs)
    ahead = 2 * n_jobs
    futures = [pool.submit(fn, item) for item in items[:ahead]]
    try:
        for i in range(len(items)):
            result = futures[i].result()
            futures[i] = None  # release the finished block's arrays
            if i + ahead < len(items):
                futures.append(pool.submit(fn, items[i + ahead]))
            yield result
    finally:  # the consumer stopped early (an exception): do not leave blocks running
        for f in futures:
            if f is not None:
                f.cancel()

"""Which Dask cluster a fit runs on: the caller's client, the current one, or a LocalCluster of our own."""

from __future__ import annotations

import contextlib
import os

# Every worker of our own cluster preloads this (glibc malloc thresholds; the module says why).
WORKER_PRELOAD = "softxent.dask.worker_setup"

# Workers run BLAS on one thread: a cluster already runs one task per core, and a BLAS pool per task on
# top would oversubscribe the cores (distributed's Nanny sets these by default too; we say so explicitly).
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def start_local_cluster(n_workers: int | None = None, *, memory_limit="auto", **kwargs):
    """A ``LocalCluster`` of worker processes bound to 127.0.0.1, one single-threaded worker per core.

    No dashboard; every port (scheduler, workers, nannies, the scheduler's HTTP routes) on 127.0.0.1;
    BLAS single-threaded in every worker; each worker preloads :mod:`softxent.dask.worker_setup`
    (glibc's malloc thresholds, which distributed's Nanny otherwise leaves at a setting that made
    evaluations 13-25 % slower).  ``kwargs`` go to ``LocalCluster`` (a ``preload`` list given there is
    kept, ours added).
    """
    from distributed import LocalCluster

    # dashboard_address=None turns the dashboard off, but the scheduler still serves its HTTP routes
    # (health, metrics) on port 8787 by default: on 127.0.0.1 and a free port instead.
    scheduler_kwargs = {"dashboard_address": "127.0.0.1:0", **kwargs.pop("scheduler_kwargs", {})}
    preload = kwargs.pop("preload", None) or []
    preload = [preload] if isinstance(preload, str) else list(preload)
    if WORKER_PRELOAD not in preload:
        preload.append(WORKER_PRELOAD)
    options = dict(n_workers=n_workers or usable_cores(), threads_per_worker=1, processes=True,
                   host="127.0.0.1", dashboard_address=None, memory_limit=memory_limit,
                   env=dict(SINGLE_THREAD_ENV), preload=preload, scheduler_kwargs=scheduler_kwargs)
    options.update(kwargs)
    return LocalCluster(**options)


def current_client():
    """The current ``distributed.Client`` (the default one), or None when there is none."""
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


@contextlib.contextmanager
def client_for(client=None, scheduler: str | None = None):
    """The client a fit runs on, closed afterwards when this function opened it.

    ``client`` given: that one.  ``scheduler`` (an address such as ``tcp://10.0.0.5:8786``): a new
    client connected to it.  Neither: the current client if there is one, otherwise a new LocalCluster
    sized to this machine (see :func:`start_local_cluster`), shut down after the fit.
    """
    if client is not None:
        yield client
        return
    from distributed import Client

    if scheduler is not None:
        own = Client(scheduler, set_as_default=False)
        try:
            yield own
        finally:
            own.close()
        return
    existing = current_client()
    if existing is not None:
        yield existing
        return
    cluster = start_local_cluster()
    own = Client(cluster, set_as_default=False)
    try:
        yield own
    finally:
        own.close()
        cluster.close()

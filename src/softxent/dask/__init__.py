"""softxent on Dask: ``SoftmaxRegression`` for data larger than one machine, on ``dask.distributed``.

``SoftmaxRegression().fit(X, y)`` with a dask array ``X`` (and ``y``) runs here: the full-batch solvers
(lbfgs, newton-cg, gd, proximal) evaluate the objective as ONE map-reduce over the row blocks per
evaluation -- each block computes its sums with the same :class:`~softxent.objective.LinearSoftmaxObjective`
code as on one machine, the client adds them and applies the penalty -- and sgd / adam stream the blocks.
The fitted model is an ordinary ``SoftmaxRegression``; its ``predict*`` methods also take dask arrays
(lazily).

* :func:`fit_dask`, :func:`partial_fit_dask`, :func:`predict_dask` -- what the estimator calls (``fit_dask``
  also takes ``client=`` and ``persist=``).
* :class:`DaskLinearSoftmaxObjective`, :class:`DaskBlocks` -- the objective over row blocks on a cluster.
* :func:`read_table` -- partitioned Parquet / CSV -> lazy ``X``, ``y``.
* :func:`client_for`, :func:`start_local_cluster` -- the current client, or a LocalCluster on 127.0.0.1.
* :mod:`softxent.dask.worker_setup` -- a Dask preload for the workers (glibc malloc thresholds; our
  LocalCluster preloads it, a cluster of your own should: ``dask worker --preload softxent.dask.worker_setup``).

The fit uses the current ``distributed.Client``; with none it starts a LocalCluster sized to this
machine (one single-threaded worker per core, bound to 127.0.0.1, no dashboard) and shuts it down after.
Needs the ``dask`` extra: ``pip install 'softxent[dask]'``.
"""

try:
    import dask as _dask  # noqa: F401
    import dask.array as _da  # noqa: F401
    import distributed as _distributed  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without dask
    raise ImportError("softxent.dask needs dask[array,dataframe] and distributed: pip install 'softxent[dask]'") \
        from exc

from ._cluster import client_for, start_local_cluster
from .estimator import fit_dask, partial_fit_dask, predict_dask
from .io import read_table
from .objective import DaskBlocks, DaskLinearSoftmaxObjective

__all__ = [
    "fit_dask",
    "partial_fit_dask",
    "predict_dask",
    "DaskLinearSoftmaxObjective",
    "DaskBlocks",
    "read_table",
    "client_for",
    "start_local_cluster",
]

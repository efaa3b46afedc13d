"""``SoftmaxRegression`` on dask inputs: what ``fit`` / ``partial_fit`` / ``predict*`` do with a dask array.

:meth:`softxent.SoftmaxRegression.fit` hands a dask array (or dask DataFrame) to :func:`fit_dask`, which
validates the blocks in one pass (classes, NaN/inf, weights), builds a
:class:`~softxent.dask.objective.DaskLinearSoftmaxObjective` and runs the estimator's own solver on it.
The fitted model is an ordinary ``SoftmaxRegression`` (NumPy ``coef_`` / ``intercept_``), whose
``predict*`` methods work on NumPy arrays, and lazily on dask arrays through :func:`predict_dask`.
"""

from __future__ import annotations

import copy

import numpy as np

from ..estimator import _check_scale, _seed_sequence, _weight_divisor
from ..objective import LinearSoftmaxObjective
from ..solvers import (FULL_BATCH_SOLVERS, MinibatchState, Monitor, _no_improvement,
                       minibatch_epochs)
from . import _blocks
from ._cluster import client_for, current_client
from .objective import DaskBlocks, check_dask_arrays

__all__ = ["fit_dask", "partial_fit_dask", "predict_dask"]

_PREDICT_METHODS = ("predict", "predict_proba", "predict_log_proba", "decision_function")


def _is_dask_dataframe(obj) -> bool:
    # by name: dask.dataframe (and pandas) need not be installed for dask arrays
    return type(obj).__module__.startswith("dask.dataframe") and type(obj).__name__ == "DataFrame"


def _is_dask_series(obj) -> bool:
    return type(obj).__module__.startswith("dask.dataframe") and type(obj).__name__ == "Series"


def _as_arrays(X, y=None, sample_weight=None):
    """dask DataFrame ``X`` (and dask Series ``y`` / ``sample_weight``) -> dask arrays with known, matching
    row chunks; returns ``(X, y, sample_weight, feature_names)``.  Arrays pass through unchanged."""
    if not _is_dask_dataframe(X):
        if _is_dask_series(y):
            y = y.to_dask_array(lengths=True)
        if _is_dask_series(sample_weight):
            sample_weight = sample_weight.to_dask_array(lengths=True)
        return X, y, sample_weight, None
    from .io import frame_to_arrays

    features = list(X.columns)
    names = np.asarray(features, dtype=object) if all(isinstance(c, str) for c in features) else None
    frame, target, weight = X, None, None
    # Series from the same source are joined to X as columns, so that all come from the same partitions
    if _is_dask_series(y):
        target = _free_name("__softxent_target__", features)
        frame = frame.assign(**{target: y})
    if _is_dask_series(sample_weight):
        weight = _free_name("__softxent_weight__", features)
        frame = frame.assign(**{weight: sample_weight})
    dtype = np.float32 if all(str(t) == "float32" for t in X.dtypes) else np.float64
    X_arr, y_arr, s_arr = frame_to_arrays(frame, features, target, weight, dtype=dtype)
    return X_arr, (y if y_arr is None else y_arr), (sample_weight if s_arr is None else s_arr), names


def _free_name(name, taken):
    while name in taken:
        name += "_"
    return name


def _set_features(est, n_features, names):
    est.n_features_in_ = int(n_features)
    if names is not None:
        est.feature_names_in_ = names
    elif hasattr(est, "feature_names_in_"):
        del est.feature_names_in_


# ----------------------------------------------------------------------------------------------- fit
def fit_dask(est, X, y, sample_weight=None, *, client=None, persist="auto", coef_node=False):
    """Fit the ``SoftmaxRegression`` ``est`` on dask ``X`` ``(N, D)`` and ``y`` ``(N,)``; returns ``est``.

    Full-batch solvers (lbfgs, newton-cg, gd, proximal) run on the client and evaluate the objective as
    one map-reduce over the row blocks per evaluation; sgd / adam stream the blocks to the client, one
    at a time, for each epoch.  ``client``: a ``distributed.Client`` (default: the current one; with
    none, a LocalCluster on this machine that is shut down afterwards).  ``persist``: keep the blocks in
    the workers' memory (True), recompute them from the source at every evaluation (False, out of core),
    or 'auto' (persist when they take at most 30% of the workers' memory limit).  ``coef_node``: the
    coefficients are inlined into the one-per-worker tasks of each evaluation (False, the default: a
    no-op map-reduce took 10.7 ms on 1 worker against 18.7 ms with a node, in benchmarks/fit_dask.py
    --quick) or enter it as one graph node those tasks depend on (True; see
    :meth:`DaskLinearSoftmaxObjective._node`).
    """
    from sklearn.utils.class_weight import compute_class_weight
    from sklearn.utils.multiclass import check_classification_targets

    est._validate_params()
    X, y, sample_weight, names = _as_arrays(X, y, sample_weight)
    with client_for(client) as cl:
        blocks = DaskBlocks.from_arrays(cl, X, y, sample_weight, persist=persist)
        classes = blocks.labels
        check_classification_targets(classes)
        if len(classes) < 2:
            raise ValueError("This solver needs samples of at least 2 classes in the data, but the data "
                             f"contains only one class: {classes[0]!r}")
        if est.warm_start and hasattr(est, "classes_") and not np.array_equal(est.classes_, classes):
            raise ValueError(f"warm_start needs the same classes as the previous fit {est.classes_.tolist()}; "
                             f"got {classes.tolist()}")
        _set_features(est, blocks.n_features, names)
        est.classes_ = classes
        cw = None
        if est.class_weight is not None:  # the class counts stand in for y (one row per class, weighted)
            cw = compute_class_weight(est.class_weight, classes=classes, y=classes,
                                      sample_weight=blocks.label_counts.astype(np.float64))
        # the in-memory fit's weight taming and scale check, on the blocks
        top = blocks.max_weight(classes, cw)
        if not top > 0:  # weights are >= 0: no positive one is a zero total (a sum could overflow)
            raise ValueError("sample_weight must not sum to zero (every sample would be ignored); got a total "
                             "weight of 0.0")
        obj = blocks.objective(classes, cw, alpha=est.alpha, l1_ratio=est.l1_ratio,
                               fit_intercept=est.fit_intercept, coef_node=coef_node,
                               weight_divisor=_weight_divisor(top))
        _check_scale(obj)
        solver = est._resolve_solver()
        est.solver_ = solver
        w0 = est._initial_w(obj)

        def run(monitor):
            if solver in FULL_BATCH_SOLVERS:
                return est._run_full_batch(obj, w0, solver, monitor)
            return _fit_minibatch(est, obj, w0, solver, monitor)

        converged = est._run_and_finish(obj, w0, blocks.dtype, run)
        est.n_evaluations_ = obj.n_evaluations
    if not converged:
        est._warn_not_converged(solver, stacklevel=3)
    return est


def _fit_minibatch(est, obj, w0, solver, monitor):
    """sgd / adam on dask: an epoch is one pass over the blocks in a shuffled order, each block fetched to
    the client (the next one is computed meanwhile) and run through ``minibatch_epochs`` for one epoch.

    A block's minibatches are normalised by ``S |B| / N`` as in memory (the block objective gets the
    weight sum ``S n_b / N``).  The epoch's objective is the row-weighted mean of the blocks' batch
    objectives -- or, with ``early_stopping``, the objective of the validation rows (``validation_fraction``
    of each block, drawn with the seed; one map-reduce per epoch) -- and the fit stops when it has not
    improved by ``tol`` for ``n_iter_no_change`` epochs.
    """
    if not (est.warm_start and getattr(est, "_mb_state", None) is not None):
        est._mb_state = MinibatchState()
    state = est._mb_state
    if state.lr0 is None and solver == "sgd" and est.learning_rate == "auto":
        state.lr0 = 1.0 / obj.lipschitz_bound()  # the bound over all blocks, as in memory
    seed = _seed_sequence(est.random_state, 0)
    rng = np.random.default_rng(seed)
    spec, S, N = obj.spec, obj.weight_sum, obj.n_rows
    validation = split_seed = None
    if est.early_stopping:
        split_seed = seed if seed is not None else [int(np.random.SeedSequence().entropy % 2**63)]
        validation, N, S = obj.validation_split(est.validation_fraction, split_seed)
        if N == 0 or validation.n_rows == 0:
            raise ValueError(f"early_stopping: validation_fraction={est.validation_fraction} leaves "
                             f"{validation.n_rows} validation and {N} training rows; both need rows")
    grad_norms = []  # each block's largest minibatch gradient (max-norm), as minibatch_epochs reports it
    quiet = Monitor(1, callback=lambda info: grad_norms.append(info.grad_norm) and False)
    w = w0
    for epoch in range(1, est.max_iter + 1):
        order = rng.permutation(len(obj.blocks))
        total, grad_norm = 0.0, 0.0
        for block, pos in _fetch_in_turn(obj.client, [obj.blocks[i] for i in order]):
            if validation is not None:  # the same rows split_block held out on the cluster
                block = _blocks.split_block(block, est.validation_fraction, split_seed, int(order[pos]), "train")
            X_b, y_b, s_b = block
            if X_b.shape[0] == 0:
                continue
            block_obj = LinearSoftmaxObjective(X_b, y_b, spec["n_classes"], s_b, alpha=spec["alpha"],
                                               l1_ratio=spec["l1_ratio"], fit_intercept=spec["fit_intercept"],
                                               weight_sum=S * X_b.shape[0] / N)
            w, _, _ = minibatch_epochs(block_obj, w, state, method=solver, n_epochs=1,
                                       batch_size=est.batch_size, learning_rate=est.learning_rate, tol=None,
                                       n_iter_no_change=est.n_iter_no_change, rng=rng, monitor=quiet)
            state.epoch -= 1  # one epoch is the pass over all blocks, not each block
            total += quiet.curve[-1] * X_b.shape[0]
            grad_norm = max(grad_norm, grad_norms[-1])
        state.epoch += 1
        score = validation.objective(w) if validation is not None else total / N
        stop = monitor.step(w, score, grad_norm)
        if _no_improvement(state, score, est.tol, est.n_iter_no_change) or stop:
            return w, epoch, True
    return w, est.max_iter, False


def _fetch_in_turn(client, blocks):
    """Yield ``(block as NumPy, index)`` for futures or delayed ``blocks`` in turn; the next block is computed
    on the cluster while the caller works on the current one, so at most two are on the client."""
    if not blocks:
        return
    from distributed import Future

    futures = [None] * len(blocks)

    def start(i):
        b = blocks[i]
        futures[i] = b if isinstance(b, Future) else client.compute(b)

    start(0)
    for i in range(len(blocks)):
        if i + 1 < len(blocks):
            start(i + 1)
        value = futures[i].result()
        futures[i] = None
        yield value, i


# ------------------------------------------------------------------------------------------ partial_fit
def partial_fit_dask(est, X, y, classes=None, sample_weight=None):
    """One ``partial_fit`` of ``est`` over each row block of dask ``X`` / ``y`` in turn (block order).

    Equivalent to ``for each block b: est.partial_fit(X_b, y_b, classes, sample_weight_b)`` on NumPy
    blocks; each block is computed when its turn comes (on the current ``distributed.Client`` when there
    is one, prefetching the next block, otherwise with dask's default scheduler).  A block with NaN/inf
    or with a label outside ``classes`` raises a ValueError that names the block.
    """
    X, y, sample_weight, _ = _as_arrays(X, y, sample_weight)
    X, y, sample_weight = check_dask_arrays(X, y, sample_weight)
    if X.numblocks[1] > 1:
        X = X.rechunk({1: -1})
    known = est.classes_ if hasattr(est, "classes_") else (None if classes is None else np.unique(np.asarray(classes)))
    xs, ys = X.to_delayed(optimize_graph=False).ravel(), y.to_delayed(optimize_graph=False).ravel()
    ss = [None] * len(xs) if sample_weight is None else list(sample_weight.to_delayed(optimize_graph=False).ravel())
    import dask

    dtype = np.float32 if X.dtype == np.float32 else np.float64
    load = dask.delayed(_blocks.load_block, pure=True)
    raw = [load(xb, yb, sb, dtype) for xb, yb, sb in zip(xs, ys, ss)]
    starts = np.concatenate([[0], np.cumsum(X.chunks[0])]).astype(int)
    client = current_client()
    blocks = _fetch_in_turn(client, raw) if client is not None else ((r.compute(), i) for i, r in enumerate(raw))
    for (X_b, y_b, s_b), i in blocks:
        where = f"block {i} (rows {starts[i]}..{starts[i + 1] - 1})"
        if X_b.shape[0] == 0:
            continue
        if not np.all(np.isfinite(X_b)):
            raise ValueError(f"Input X contains NaN or infinity in {where}; remove or impute them before fitting")
        if known is not None:
            unknown = np.setdiff1d(np.unique(y_b), known)
            if unknown.size:
                raise ValueError(f"y holds labels {unknown.tolist()} in {where} that are not in classes "
                                 f"{known.tolist()} given to the first partial_fit call")
        est.partial_fit(X_b, y_b, classes=classes if not hasattr(est, "classes_") else None, sample_weight=s_b)
        known = est.classes_
    return est


# ---------------------------------------------------------------------------------------------- predict
def predict_dask(est, method, X):
    """``est.<method>(X)`` for a dask array (or DataFrame) ``X``, lazily: a dask array of the NumPy
    method applied to each row block (``predict`` -> ``(N,)`` labels, ``predict_proba`` ->
    ``(N, K)`` ...)."""
    import dask.array as da
    from sklearn.utils.validation import check_is_fitted

    if method not in _PREDICT_METHODS:
        raise ValueError(f"method must be one of {_PREDICT_METHODS}; got {method!r}")
    check_is_fitted(est)
    if _is_dask_dataframe(X):
        cols = list(X.columns)
        names = getattr(est, "feature_names_in_", None)
        if names is not None and cols != list(names):
            raise ValueError(f"the feature names should match those that were passed during fit; got columns "
                             f"{cols[:10]}, expected {list(names)[:10]}")
        X = X.to_dask_array()
    if not isinstance(X, da.Array):
        raise TypeError(f"X must be a dask array or DataFrame here; got {type(X).__name__}")
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_samples, n_features); got a dask array of shape {X.shape}")
    if X.shape[1] != est.n_features_in_:
        raise ValueError(f"X has {X.shape[1]} features, but SoftmaxRegression is expecting "
                         f"{est.n_features_in_} features as input.")
    if X.numblocks[1] > 1:
        X = X.rechunk({1: -1})
    model = copy.copy(est)  # what the workers need: the fitted arrays, not the user's callback
    model.callback = None
    if hasattr(model, "feature_names_in_"):  # names were checked above; the blocks are plain arrays
        del model.feature_names_in_
    K = len(est.classes_)
    out_dtype = np.float32 if X.dtype == np.float32 else np.float64
    if method == "predict":
        return X.map_blocks(_blocks.predict_block, model, method, dtype=est.classes_.dtype, drop_axis=1,
                            meta=np.empty((0,), dtype=est.classes_.dtype))
    if method == "decision_function" and K == 2:
        return X.map_blocks(_blocks.predict_block, model, method, dtype=out_dtype, drop_axis=1,
                            meta=np.empty((0,), dtype=out_dtype))
    return X.map_blocks(_blocks.predict_block, model, method, dtype=out_dtype, chunks=(X.chunks[0], (K,)),
                        meta=np.empty((0, 0), dtype=out_dtype))

"""The softmax-regression objective over a Dask cluster: one map-reduce per evaluation.

:class:`DaskLinearSoftmaxObjective` has the interface of :class:`softxent.objective.LinearSoftmaxObjective`
(``loss_gradient``, ``loss``, ``hessp``, ``max_squared_row_norm``, ``lipschitz_bound``, ``l1_penalty``, ``prox_l1``, ``objective``,
``pack`` / ``unpack``, ``n_coef`` ...), so every full-batch solver of :mod:`softxent.solvers` runs on it
unchanged.  With the data in row blocks ``b = 1..B`` (each block holds all ``D`` columns)::

    E(w) = finish( sum_b L_b(w),  sum_b G_b(w) )       (L_b, G_b) = LinearSoftmaxObjective(block b).data_sums(w)
    H v  = (1/S) sum_b H_b(w) v  +  alpha (1 - rho) V_Theta

Each ``(L_b, G_b)`` is computed on the worker holding block ``b`` by the same LinearSoftmaxObjective code
as on one machine (:mod:`softxent.dask._blocks`).  An evaluation runs ONE task per worker, over the blocks
that worker holds (a task costs the scheduler milliseconds; a block's arithmetic can cost less), which
adds its blocks' sums; the client adds the per-worker sums and ``finish`` normalises by ``S = sum_i s_i``
and adds the L2 penalty.  What travels per evaluation is ``w`` (``K (D + 1)`` floats) out -- inlined into
each worker's one task (the default), or as one graph node that the tasks depend on (``coef_node=True``);
either way each worker receives ``w`` once -- and one vector of that size back per worker.  Each
evaluation's graph is built afresh from the block futures and released after it, so the scheduler's
graph does not grow with the iterations.

Two ways to hold the blocks (``persist``):

* persisted (the default when the prepared blocks take at most 30% of the workers' memory): the blocks are
  computed once and kept in the workers' memory as futures.  Their lineage stays with the scheduler, so
  a block lost with its worker is recomputed from the source (a seeded ``da.random`` array, ``from_array``,
  Parquet files ...) and the fit goes on with the same numbers.
* streamed (out of core): each evaluation recomputes every block from the source (e.g. reads the Parquet
  files again), so memory holds a few blocks per worker at a time, never the data set.
"""

from __future__ import annotations

import numpy as np

from ..objective import LinearSoftmaxObjective
from . import _blocks

__all__ = ["DaskLinearSoftmaxObjective", "DaskBlocks"]


def _is_nan(x) -> bool:
    return isinstance(x, float) and x != x


class DaskBlocks:
    """Validated row blocks of ``(X, y, sample_weight)`` on a cluster, and what one pass over them found.

    Built by :meth:`from_arrays`, which checks the chunk layout, then runs ONE pass over the blocks that
    finds the classes (with their counts) and checks every block for NaN/inf in ``X`` and negative or
    non-finite weights.  ``persist=True`` keeps the raw blocks in the workers' memory for the objective;
    ``False`` keeps only the recipe (the dask graph) and recomputes blocks when they are needed.

    Attributes: ``client``, ``n_rows``, ``n_features``, ``dtype``, ``chunks`` (rows per block),
    ``labels`` (sorted unique labels over all blocks), ``label_counts``, ``label_max_weight`` (the largest
    sample weight of each label), ``persisted``, ``has_weight``.
    """

    def __init__(self, client, raw, *, n_rows, n_features, dtype, chunks, labels, label_counts, label_max_weight,
                 persisted, has_weight):
        self.client = client
        self._raw = raw              # per block: a Future (persisted) or a Delayed (streamed) raw block
        self.n_rows = n_rows
        self.n_features = n_features
        self.dtype = dtype
        self.chunks = chunks
        self.labels = labels
        self.label_counts = label_counts
        self.label_max_weight = label_max_weight
        self.persisted = persisted
        self.has_weight = has_weight

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(cls, client, X, y, sample_weight=None, *, persist="auto"):
        """Validate dask arrays ``X`` ``(N, D)``, ``y`` ``(N,)``, ``sample_weight`` (None, scalar, NumPy or
        dask ``(N,)``) and scan them once.  ``persist``: True, False or 'auto' (persist when the blocks
        take at most 30% of the workers' total memory limit)."""
        import dask

        X, y, sample_weight = check_dask_arrays(X, y, sample_weight)
        dtype = np.float32 if X.dtype == np.float32 else np.float64
        if persist == "auto":
            persist = _fits_in_memory(client, X.shape[0] * (X.shape[1] + 2) * np.dtype(dtype).itemsize)
        elif persist not in (True, False):
            raise ValueError(f"persist must be True, False or 'auto'; got {persist!r}")
        if X.numblocks[1] > 1:  # a row block must hold every column: one chunk along axis 1
            X = X.rechunk({1: -1})
        xs, ys = X.to_delayed(optimize_graph=False).ravel(), y.to_delayed(optimize_graph=False).ravel()
        ss = [None] * len(xs) if sample_weight is None else list(sample_weight.to_delayed(optimize_graph=False).ravel())
        load = dask.delayed(_blocks.load_block, pure=True)
        raw = [load(xb, yb, sb, dtype) for xb, yb, sb in zip(xs, ys, ss)]
        scan = dask.delayed(_blocks.scan_block, pure=True)
        if persist:
            raw = client.compute(raw)
            stats = client.gather(client.map(_blocks.scan_block, raw, pure=False))
        else:
            stats = client.gather(client.compute([scan(r) for r in raw]))
        _raise_for_bad_blocks(stats, X.chunks[0])
        labels, counts, max_weight = _merge_label_counts(stats)
        return cls(client, raw, n_rows=int(X.shape[0]), n_features=int(X.shape[1]), dtype=np.dtype(dtype),
                   chunks=tuple(int(c) for c in X.chunks[0]), labels=labels, label_counts=counts,
                   label_max_weight=max_weight,
                   persisted=bool(persist), has_weight=sample_weight is not None)

    # ------------------------------------------------------------------------------ use
    def max_weight(self, classes, class_weight=None) -> float:
        """The largest sample weight once ``class_weight`` (``(K,)`` over ``classes``, or None) is folded in,
        in the blocks' dtype as the blocks fold it: from the per-label maxima of the scan, no pass over the
        data (rounding is monotone, so the largest product is the product of the largest weight)."""
        top = self.label_max_weight
        if class_weight is not None:
            cw = np.asarray(class_weight, dtype=np.float64)[np.searchsorted(classes, self.labels)]
            top = top * cw.astype(self.dtype)
        return float(np.max(top, initial=0.0))

    def objective(self, classes, class_weight=None, *, alpha=0.0, l1_ratio=0.0, fit_intercept=True,
                  coef_node=False, weight_divisor=1.0):
        """The :class:`DaskLinearSoftmaxObjective` of these blocks for ``classes`` (sorted, a superset of
        :attr:`labels`) and per-class weights ``class_weight`` (``(K,)`` or None), the weights divided by
        ``weight_divisor`` (see ``softxent.estimator._weight_divisor``); ``coef_node``: see
        :meth:`DaskLinearSoftmaxObjective._node`."""
        if self._raw is None:
            raise RuntimeError("DaskBlocks.objective was already called on these persisted blocks (they now "
                               "belong to that objective); build new DaskBlocks for another objective")
        classes = np.asarray(classes)
        cw = None if class_weight is None else np.asarray(class_weight, dtype=np.float64)
        client = self.client
        if self.persisted:
            prepared = client.map(_blocks.prepare_block, self._raw, classes=classes, class_weight=cw,
                                  weight_divisor=weight_divisor, pure=False)
            sums = client.gather(client.map(_blocks.block_weight_sum, prepared, pure=False))
            self._raw = None  # the prepared blocks share X with the raw ones; the raw ones go
        else:
            import dask

            prep = dask.delayed(_blocks.prepare_block, pure=True)
            prepared = [prep(r, classes, cw, weight_divisor) for r in self._raw]
            wsum = dask.delayed(_blocks.block_weight_sum, pure=True)
            sums = client.gather(client.compute([wsum(p) for p in prepared]))
        weight_sum = 0.0
        for s in sums:  # block order: the same sum on every run
            weight_sum += s
        return DaskLinearSoftmaxObjective(client, prepared, n_classes=len(classes), n_features=self.n_features,
                                          dtype=self.dtype, weight_sum=weight_sum, alpha=alpha, l1_ratio=l1_ratio,
                                          fit_intercept=fit_intercept, persisted=self.persisted,
                                          n_rows=self.n_rows, chunks=self.chunks, coef_node=coef_node)


class DaskLinearSoftmaxObjective:
    """:class:`~softxent.objective.LinearSoftmaxObjective`'s interface over prepared row blocks on a cluster.

    Built by :meth:`DaskBlocks.objective`.  ``blocks`` are futures of persisted prepared blocks, or delayed
    objects that recompute them (streamed).  Attributes as LinearSoftmaxObjective: ``n_classes``,
    ``n_features``, ``n_coef``, ``dtype``, ``alpha``, ``l1_ratio``, ``fit_intercept``, ``weight_sum``;
    plus ``n_rows``, ``chunks``, ``n_evaluations`` (map-reduces run so far) and ``persisted``.
    """

    def __init__(self, client, blocks, *, n_classes, n_features, dtype, weight_sum, alpha, l1_ratio,
                 fit_intercept, persisted, n_rows, chunks, coef_node=False):
        self.client = client
        self.blocks = list(blocks)
        self.persisted = persisted
        self.n_rows = n_rows
        self.chunks = chunks
        self.dtype = np.dtype(dtype)
        # The layout object: an objective over no rows, with this objective's K, D, penalty and S.  pack,
        # unpack, finish, l1_penalty and prox_l1 are its methods, so none of them is written twice.
        self._layout = LinearSoftmaxObjective(np.empty((0, n_features), dtype=self.dtype), np.empty(0, np.int64),
                                              n_classes, alpha=alpha, l1_ratio=l1_ratio,
                                              fit_intercept=fit_intercept, weight_sum=weight_sum)
        self.spec = {"n_classes": int(n_classes), "alpha": float(alpha), "l1_ratio": float(l1_ratio),
                     "fit_intercept": bool(fit_intercept)}
        self.coef_node = bool(coef_node)
        self.regroup_every = 16
        self.n_evaluations = 0
        self._groups = None if persisted else tuple((i,) for i in range(len(self.blocks)))
        self._grouped_at = 0
        self._hess_cache = None      # (w, groups, w's graph node, per-group futures of the softmax at w)
        self._previous_futures = ()  # the last evaluation's futures: released after the next submit
        self._max_sq = None

    # ------------------------------------------------------------------ LinearSoftmaxObjective's attributes
    n_classes = property(lambda self: self._layout.n_classes)
    n_features = property(lambda self: self._layout.n_features)
    n_coef = property(lambda self: self._layout.n_coef)
    alpha = property(lambda self: self._layout.alpha)
    l1_ratio = property(lambda self: self._layout.l1_ratio)
    fit_intercept = property(lambda self: self._layout.fit_intercept)
    weight_sum = property(lambda self: self._layout.weight_sum)

    def pack(self, theta, intercept=None):
        return self._layout.pack(theta, intercept)

    def unpack(self, w):
        return self._layout.unpack(w)

    def finish(self, loss_sum, grad_sum, w, weight_sum=None):
        return self._layout.finish(loss_sum, grad_sum, w, weight_sum)

    def l1_penalty(self, w) -> float:
        return self._layout.l1_penalty(w)

    def prox_l1(self, w, step):
        return self._layout.prox_l1(w, step)

    # ------------------------------------------------------------------ the map-reduce
    def _node(self, value):
        """``value`` (a small float64 array) as it goes into an evaluation's graph.

        ``coef_node=False``: the array itself, inlined into each group task -- one task per worker, so
        ``value`` reaches each worker once, as a node would.  ``coef_node=True``: ONE node of the same
        graph that every group task depends on (a delayed literal).  Either way the evaluation is one
        graph, sent to the scheduler in one message (see :meth:`_map`).
        """
        value = np.ascontiguousarray(value, dtype=np.float64)
        if not self.coef_node:
            return value
        import dask

        return dask.delayed(value, pure=True)

    def _current_groups(self):
        """Block indices grouped by the worker holding them (persisted), or one block per group (streamed).

        Scheduling costs per task, so an evaluation runs ONE task per worker over that worker's blocks.
        The grouping is asked of the scheduler (one ``who_has`` round trip) at the first evaluation and
        every ``regroup_every`` map-reduces after it: blocks recomputed after a worker was lost may land
        elsewhere.  A stale grouping costs speed only (a task fetches the blocks it lacks), never
        correctness, so it is not checked at every evaluation (``client.scheduler_info()`` would be a
        round trip too)."""
        if not self.persisted:
            return self._groups
        if self._groups is None or self.n_evaluations - self._grouped_at >= self.regroup_every:
            who_has = self.client.who_has(self.blocks)
            by_worker = {}
            for i, b in enumerate(self.blocks):
                holders = sorted(who_has.get(b.key, ()))
                by_worker.setdefault(holders[0] if holders else None, []).append(i)
            groups = tuple(tuple(g) for _, g in sorted(by_worker.items(), key=lambda kv: kv[1][0]))
            if groups != self._groups:
                self._hess_cache = None  # cached probabilities follow the grouping
            self._groups, self._grouped_at = groups, self.n_evaluations
        return self._groups

    def _map(self, func, *args, groups=None, per_group=None):
        """``func(*args, [per_group[g],] *blocks of group g)`` for each group ``g``: futures, in group order.

        Latency, not arithmetic, is what a small cluster pays per evaluation, so two things matter here:

        * the whole evaluation is ONE graph submitted by ONE ``client.compute`` call.  The client sends its
          messages to the scheduler in batches at most every 10 ms: a second message right after a first
          (a ``submit`` per worker, or a node for ``w`` and then the tasks) waits for the next batch.
        * the previous evaluation's futures are released only AFTER this one is submitted.  Releasing
          them first would put a message on the wire just before the new graph, and the graph would wait
          its 10 ms behind it (measured on 2 cores: a no-op map-reduce 12 ms -> see the benchmark).
        """
        import dask

        groups = self._current_groups() if groups is None else groups
        self.n_evaluations += 1
        extra = [()] * len(groups) if per_group is None else [(p,) for p in per_group]
        f = dask.delayed(func, pure=False)
        futures = self.client.compute([f(*args, *e, *[self.blocks[i] for i in g]) for g, e in zip(groups, extra)],
                                      optimize_graph=False)
        self._previous_futures = futures  # releases the previous evaluation's results, after the submit
        return futures

    def _gather_sum(self, futures):
        """Gather the groups' arrays and add them in group order."""
        parts = self.client.gather(futures)
        total = np.array(parts[0], dtype=np.float64, copy=True)
        for p in parts[1:]:
            total += p
        return total

    def data_sums(self, w, need_grad: bool = True):
        """``(sum_i s_i CE_i, its gradient)`` over all blocks: one map-reduce (``need_grad=False``: loss only)."""
        parts = self.client.gather(self._map(_blocks.group_sums, self.spec, self._node(w), need_grad))
        loss_sum = 0.0
        for loss_g, _ in parts:
            loss_sum += loss_g
        if not need_grad:
            return loss_sum, None
        grad_sum = np.array(parts[0][1], dtype=np.float64, copy=True)
        for _, grad_g in parts[1:]:
            grad_sum += grad_g
        return loss_sum, grad_sum

    def _proba_at(self, w):
        """``(groups, w's graph node, per-group futures of h at w)``, cached: a Newton iteration asks for
        many products at the same point.  The probabilities stay on the workers next to their blocks (as
        the in-memory objective caches them) until ``w`` or the grouping changes."""
        w = np.ascontiguousarray(w, dtype=np.float64)
        groups = self._current_groups()
        cache = self._hess_cache
        if cache is None or cache[0].shape != w.shape or not np.array_equal(cache[0], w) or cache[1] != groups:
            self._hess_cache = None  # release the old probabilities before computing new ones
            w_node = self._node(w)
            probas = self._map(_blocks.group_proba, self.spec, w_node, groups=groups)
            cache = self._hess_cache = (w.copy(), groups, w_node, probas)
        return cache[1], cache[2], cache[3]

    def data_hessp_sum(self, w, v, proba=None):
        """``sum_b`` of the blocks' ``data_hessp_sum(w, v)``: one map-reduce (``proba`` is not used: the
        probabilities at ``w`` live on the workers)."""
        groups, w_node, probas = self._proba_at(w)
        return self._gather_sum(self._map(_blocks.group_hessp_sum, self.spec, w_node, self._node(v),
                                          groups=groups, per_group=probas))

    def data_hessian_diag_sum(self, w, proba=None):
        """``sum_b`` of the blocks' ``data_hessian_diag_sum(w)``: one map-reduce."""
        groups, w_node, probas = self._proba_at(w)
        return self._gather_sum(self._map(_blocks.group_hessian_diag_sum, self.spec, w_node, groups=groups,
                                          per_group=probas))

    # ------------------------------------------------------------------ the objective
    def loss_gradient(self, w, keep_proba: bool = False):
        """``(E_smooth(w), grad E_smooth(w))``: one map-reduce, then ``finish``.  ``keep_proba`` is
        accepted for the solvers' sake; the probabilities at ``w`` are made on the workers on the first
        Hessian product (:meth:`_proba_at`)."""
        loss_sum, grad_sum = self.data_sums(w)
        return self.finish(loss_sum, grad_sum, w)

    def loss(self, w) -> float:
        """``E_smooth(w)`` without the gradient (one map-reduce)."""
        return self.finish(self.data_sums(w, need_grad=False)[0], None, w)[0]

    def hessp(self, w, v):
        """``H v`` of ``E_smooth`` at ``w``: one map-reduce of the blocks' data terms, then the penalty."""
        hv_sum = self.data_hessp_sum(w, v)
        # The L2 penalty is quadratic, so its Hessian times v is its gradient at v: finish(0, Hv_sum, v)
        # gives (1/S) Hv_sum + alpha (1 - rho) V_Theta without writing the penalty a second time.
        return self.finish(0.0, hv_sum, np.asarray(v, dtype=np.float64))[1]

    def hessian_diag(self, w):
        """Diagonal of the Hessian of ``E_smooth`` at ``w`` (Newton-CG's preconditioner): one map-reduce."""
        d_sum = self.data_hessian_diag_sum(w)
        # The L2 penalty's Hessian is alpha (1 - rho) on the Theta diagonal, which is its gradient at the
        # all-ones vector: finish(0, d_sum, ones) adds it without writing the penalty a second time.
        return self.finish(0.0, d_sum, np.ones(self.n_coef))[1]

    GRAM_MAX_ROWS = LinearSoftmaxObjective.GRAM_MAX_ROWS

    def data_gram_sum(self, max_rows=None):
        """``sum_b`` of the blocks' ``data_gram_sum`` (Newton-CG's preconditioner): one map-reduce, each
        block using its share of ``max_rows`` (all its rows when None).  None when a block has none."""
        groups = self._current_groups()
        share = [None if max_rows is None else max(1, -(-int(max_rows) * n // max(1, self.n_rows)))
                 for n in self.chunks]
        parts = self.client.gather(self._map(_blocks.group_gram_sum, self.spec, groups=groups,
                                             per_group=[[share[i] for i in g] for g in groups]))
        if any(p is None for p in parts):
            return None
        gram = np.array(parts[0][0], dtype=np.float64, copy=True)
        weight = parts[0][1]
        for g, w in parts[1:]:
            gram += g
            weight += w
        return gram, weight

    def max_squared_row_norm(self) -> float:
        """The largest of the blocks' :meth:`LinearSoftmaxObjective.max_squared_row_norm` (one map-reduce,
        once)."""
        if self._max_sq is None:
            self._max_sq = float(max(self.client.gather(self._map(_blocks.group_max_squared_row_norm, self.spec))))
        return self._max_sq

    lipschitz_bound = LinearSoftmaxObjective.lipschitz_bound  # the formula's one home, on max_squared_row_norm

    def objective(self, w) -> float:
        """The full objective ``E(w)``, L1 part included."""
        return self.loss(w) + self.l1_penalty(w)

    def validation_split(self, fraction: float, seed):
        """Hold out about ``fraction`` of the rows of every block (:func:`_blocks.split_block`).

        Returns ``(validation objective, n_train, train_weight_sum)``: the validation rows as a
        :class:`DaskLinearSoftmaxObjective` (normalised by their own weight, as in memory); the training
        rows are taken from each block where it is used, with the same ``split_block``.
        """
        seed = list(seed)
        client = self.client
        if self.persisted:
            val_blocks = [client.submit(_blocks.split_block, b, fraction, seed, i, "validation", pure=False)
                          for i, b in enumerate(self.blocks)]
            stats = client.gather([client.submit(_blocks.block_rows_and_weight, b, pure=False) for b in val_blocks])
        else:
            import dask

            split = dask.delayed(_blocks.split_block, pure=True)
            val_blocks = [split(b, fraction, seed, i, "validation") for i, b in enumerate(self.blocks)]
            stats = client.gather(client.compute([dask.delayed(_blocks.block_rows_and_weight, pure=True)(b)
                                                  for b in val_blocks]))
        n_val = sum(n for n, _ in stats)
        s_val = 0.0
        for _, s in stats:
            s_val += s
        validation = DaskLinearSoftmaxObjective(
            client, val_blocks, n_classes=self.n_classes, n_features=self.n_features, dtype=self.dtype,
            weight_sum=s_val, alpha=self.alpha, l1_ratio=self.l1_ratio, fit_intercept=self.fit_intercept,
            persisted=self.persisted, n_rows=n_val, chunks=tuple(n for n, _ in stats), coef_node=self.coef_node)
        return validation, self.n_rows - n_val, self.weight_sum - s_val

    def block_nbytes(self) -> int:
        """Bytes the prepared blocks hold on the workers (a map-reduce)."""
        return int(sum(self.client.gather(self._map(_blocks.group_nbytes))))


# ---------------------------------------------------------------------------------------- validation
def check_dask_arrays(X, y, sample_weight=None):
    """Check shapes and chunk layout of dask ``X`` ``(N, D)`` / ``y`` ``(N,)`` / ``sample_weight``.

    Returns ``(X, y, sample_weight)`` as dask arrays with the same row chunks (``sample_weight`` None, or
    a scalar turned into a constant array).  Raises ValueError/TypeError naming what is wrong.
    """
    import dask.array as da

    if not isinstance(X, da.Array):
        raise TypeError(f"X must be a dask.array.Array here; got {type(X).__name__}")
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_samples, n_features); got a dask array of shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)
            or X.dtype == np.bool_):
        raise TypeError(f"X must hold numbers (float32/float64, or integers cast to float64); got dtype {X.dtype}")
    _check_known_chunks("X", X)
    if isinstance(y, np.ndarray) or isinstance(y, (list, tuple)):
        y = np.asarray(y)
        if y.ndim != 1 or y.shape[0] != X.shape[0]:
            raise ValueError(f"y must have shape ({X.shape[0]},) to match X; got {y.shape}")
        y = da.from_array(y, chunks=(X.chunks[0],))
    if not isinstance(y, da.Array):
        raise TypeError(f"y must be a dask array or a NumPy array; got {type(y).__name__}")
    _check_known_chunks("y", y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.rechunk({1: -1})
    elif y.ndim != 1:
        raise ValueError(f"y must be 1-D (n_samples,); got a dask array of shape {y.shape}")
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"X and y have different numbers of rows: X has {X.shape[0]}, y has {y.shape[0]}")
    if y.chunks[0] != X.chunks[0]:
        raise ValueError(
            f"the row chunks of X and y do not line up: X has row chunks {_show_chunks(X.chunks[0])}, y has "
            f"{_show_chunks(y.chunks[0])}; rechunk one to the other, e.g. y = y.rechunk({{0: X.chunks[0]}})")
    if sample_weight is None:
        return X, y, None
    if np.isscalar(sample_weight):
        value = float(sample_weight)
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"sample_weight must be a finite non-negative number; got {sample_weight!r}")
        dtype = np.float32 if X.dtype == np.float32 else np.float64
        return X, y, da.full(X.shape[0], value, chunks=(X.chunks[0],), dtype=dtype)
    if isinstance(sample_weight, (np.ndarray, list, tuple)):
        sw = np.asarray(sample_weight)
        if sw.shape != (X.shape[0],):
            raise ValueError(f"sample_weight must have shape ({X.shape[0]},) to match X; got {sw.shape}")
        sample_weight = da.from_array(sw, chunks=(X.chunks[0],))
    if not isinstance(sample_weight, da.Array):
        raise TypeError(f"sample_weight must be None, a number, a NumPy or a dask array; got "
                        f"{type(sample_weight).__name__}")
    _check_known_chunks("sample_weight", sample_weight)
    if sample_weight.shape != (X.shape[0],):
        raise ValueError(f"sample_weight must have shape ({X.shape[0]},) to match X; got {sample_weight.shape}")
    if sample_weight.chunks[0] != X.chunks[0]:
        raise ValueError(
            f"the row chunks of X and sample_weight do not line up: X has {_show_chunks(X.chunks[0])}, "
            f"sample_weight has {_show_chunks(sample_weight.chunks[0])}; rechunk sample_weight to X's row chunks")
    return X, y, sample_weight


def _check_known_chunks(name, a):
    if any(_is_nan(c) for c in a.chunks[0]):
        raise ValueError(
            f"{name} has unknown chunk sizes (NaN rows per block, as after a dask.dataframe .values or a boolean "
            f"mask); compute them first: {name} = {name}.compute_chunk_sizes(), or build it with "
            f"df.to_dask_array(lengths=True)")


def _show_chunks(chunks, limit=8) -> str:
    shown = ", ".join(str(int(c)) for c in chunks[:limit])
    return f"({shown}{', ...' if len(chunks) > limit else ''})"


def _raise_for_bad_blocks(stats, row_chunks):
    starts = np.concatenate([[0], np.cumsum(row_chunks)])
    for i, st in enumerate(stats):
        where = f"block {i} (rows {int(starts[i])}..{int(starts[i + 1]) - 1})"
        if st["nonfinite_X"]:
            raise ValueError(f"Input X contains NaN or infinity: {st['nonfinite_X']} entries in {where}; "
                             "remove or impute them before fitting")
        if st["nonfinite_s"]:
            raise ValueError(f"sample_weight must be finite; got {st['nonfinite_s']} NaN or inf values in {where}")
        if st["negative_s"]:
            raise ValueError(f"Negative values in data passed to sample_weight: {st['negative_s']} in {where}")


def _merge_label_counts(stats):
    """Per-block ``(labels, counts, max_s)`` -> the sorted labels over all blocks, their total counts and
    their largest sample weights."""
    labels = np.unique(np.concatenate([st["labels"] for st in stats]))
    counts = np.zeros(len(labels), dtype=np.int64)
    max_s = np.full(len(labels), -np.inf, dtype=np.result_type(*[st["max_s"] for st in stats]))
    for st in stats:
        at = np.searchsorted(labels, st["labels"])
        counts[at] += st["counts"]
        max_s[at] = np.maximum(max_s[at], st["max_s"])
    return labels, counts, max_s


def _workers_info(client) -> dict:
    """``{address: info}`` of all workers, from the client's cached view of the scheduler (no round trip)."""
    info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else client.scheduler_info()
    return info.get("workers", {})


PERSIST_FRACTION = 0.3


def _fits_in_memory(client, nbytes: int) -> bool:
    """Whether ``nbytes`` take at most :data:`PERSIST_FRACTION` of the workers' total memory limit (no
    limit: yes).  The rest is for each worker's own footprint (~0.25 GiB), the copies a block goes through
    while it is read and prepared, and the probabilities Newton-CG keeps; at 0.5, 1 GiB workers holding
    0.5 GiB each were killed by their nanny while persisting from Parquet."""
    workers = _workers_info(client)
    limits = [w.get("memory_limit") or 0 for w in workers.values()]
    if not limits or any(lim == 0 for lim in limits):
        return True
    return nbytes <= PERSIST_FRACTION * sum(limits)


def _accepts_n_workers(client) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False

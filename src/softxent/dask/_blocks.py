"""Functions that run on the Dask workers, one row block at a time.

They live in the installed package (not in a test or a notebook) so that every worker can unpickle them,
and they import nothing from Dask: a block is plain NumPy.  Every number about the model is computed by
:class:`softxent.objective.LinearSoftmaxObjective` on the block -- the same code as on one machine --
and the client adds the blocks' *unnormalised* sums before ``finish`` normalises them.

Block layouts:

* a *raw* block ``(X, y, s)``: ``X`` ``(n, D)`` C-contiguous float32/float64, ``y`` ``(n,)`` the labels as
  given (any dtype), ``s`` ``(n,)`` sample weights in ``X``'s dtype or None;
* a *prepared* block ``(X, y_idx, s)``: the same ``X`` object, ``y_idx`` int64 class indices into the
  fit's ``classes``, ``s`` the sample weights with the class weights folded in (or None).

``spec`` is the dict ``{"n_classes", "alpha", "l1_ratio", "fit_intercept"}`` of the objective.
"""

from __future__ import annotations

import numpy as np

from ..objective import LinearSoftmaxObjective


ALIGNMENT = 16  # bytes: what NumPy's own allocations guarantee (and the width of an SSE load)


def aligned(a: np.ndarray) -> np.ndarray:
    """``a``, copied to a fresh array when its data does not start on an :data:`ALIGNMENT` boundary.

    Arrays a worker receives from another process (a transfer, a scatter) are views into the message's
    buffer and can start at any byte: measured at an offset of 5 bytes, the same objective evaluation
    ran ~1.5x slower than on a copy.  A block NumPy allocated itself (read from Parquet, converted,
    generated) is left alone: asking for more than NumPy's alignment would copy every block once more --
    in a streamed fit, at every evaluation -- for no measured gain (blocks at 16 and 48 bytes past a
    cache line ran as fast as the client's arrays)."""
    if a.ctypes.data % ALIGNMENT == 0 or a.size == 0:
        return a
    return a.copy()  # NumPy allocates the copy at its own (ALIGNMENT) alignment


def load_block(X, y, s, dtype):
    """Raw block from dask chunks: ``X`` as C-contiguous, :func:`aligned` ``dtype`` (all columns), ``y`` and
    ``s`` as 1-D."""
    X = aligned(np.ascontiguousarray(X, dtype=dtype))
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:  # a column vector, as read from a one-column table
        y = y[:, 0]
    if s is not None:
        s = np.ascontiguousarray(s, dtype=dtype).reshape(-1)
    return X, y, s


def frame_column_values(part, columns, dtype):
    """A pandas partition's ``columns`` (a list: 2-D; one name: 1-D) as a NumPy array of ``dtype``."""
    values = part[columns].to_numpy()
    return values if values.dtype == dtype else values.astype(dtype)


def scan_block(block) -> dict:
    """One pass over a raw block: its labels and their counts, and what is wrong with it, if anything.

    Returns ``{"n_rows", "labels" (sorted unique), "counts" (per label), "max_s" (the largest sample weight
    per label, 1 without weights), "nonfinite_X" (count of NaN/inf entries), "negative_s", "nonfinite_s"}``.
    """
    X, y, s = block
    labels, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    finite = np.isfinite(X)
    out = {"n_rows": int(X.shape[0]), "labels": labels, "counts": counts.astype(np.int64),
           "max_s": np.ones(len(labels), dtype=X.dtype),
           "nonfinite_X": int(finite.size - np.count_nonzero(finite)), "negative_s": 0, "nonfinite_s": 0}
    if s is not None:
        out["nonfinite_s"] = int(s.size - np.count_nonzero(np.isfinite(s)))
        out["negative_s"] = int(np.count_nonzero(s < 0))
        max_s = np.full(len(labels), -np.inf, dtype=s.dtype)
        np.maximum.at(max_s, inverse.reshape(-1), s)
        out["max_s"] = max_s
    return out


def prepare_block(block, classes, class_weight, weight_divisor=1.0):
    """Raw block -> prepared block: labels to indices into ``classes``, class weights folded into ``s``.

    ``class_weight`` is None or the ``(K,)`` weight per class, as the in-memory estimator folds it
    (``s * cw[y_idx]`` in ``X``'s dtype), and the weights are then divided by ``weight_divisor`` as the
    in-memory ``_tame_weights`` divides them.  ``X`` is passed through (no copy).
    """
    X, y, s = block
    y_idx = np.searchsorted(classes, y).astype(np.int64, copy=False)
    if class_weight is not None:
        base = np.ones(X.shape[0], dtype=X.dtype) if s is None else s
        s = base * np.asarray(class_weight)[y_idx].astype(X.dtype)
    if weight_divisor != 1.0:
        base = np.ones(X.shape[0], dtype=X.dtype) if s is None else s
        s = base / base.dtype.type(weight_divisor)
    return X, y_idx, s


def block_weight_sum(block) -> float:
    """``sum_i s_i`` of a prepared block in float64, as LinearSoftmaxObjective sums it (rows if no ``s``)."""
    return _objective(block, {"n_classes": 1, "alpha": 0.0, "l1_ratio": 0.0, "fit_intercept": True}).weight_sum


def split_block(block, fraction, seed, index, part):
    """The validation (``part='validation'``) or training rows of a prepared block: each row is a
    validation row with probability ``fraction``, drawn from ``default_rng([*seed, index])`` -- the same
    rows on a worker and on the client, and after a block is recomputed."""
    X, y_idx, s = block
    val = np.random.default_rng([*seed, index]).random(X.shape[0]) < fraction
    keep = val if part == "validation" else ~val
    return X[keep], y_idx[keep], None if s is None else s[keep]


def block_rows_and_weight(block):
    """``(rows, sum_i s_i)`` of a prepared block."""
    return block[0].shape[0], block_weight_sum(block)


def _objective(block, spec, weight_sum=None) -> LinearSoftmaxObjective:
    X, y_idx, s = block
    return LinearSoftmaxObjective(X, y_idx, spec["n_classes"], s, alpha=spec["alpha"], l1_ratio=spec["l1_ratio"],
                                  fit_intercept=spec["fit_intercept"], weight_sum=weight_sum)


def block_sums(block, w, spec, need_grad=True):
    """``LinearSoftmaxObjective.data_sums(w)`` of a prepared block: ``(sum_i s_i CE_i, its gradient)``."""
    return _objective(block, spec).data_sums(w, need_grad=need_grad)


def block_proba(block, w, spec):
    """``h = softmax(X Theta^T + b)`` of a prepared block at ``w`` (kept on the worker for Hessian products)."""
    from ..loss import softmax

    return softmax(_objective(block, spec).decision_function(w))


def block_hessp_sum(block, w, v, spec, proba=None):
    """``LinearSoftmaxObjective.data_hessp_sum(w, v, proba)`` of a prepared block."""
    return _objective(block, spec).data_hessp_sum(w, v, proba=proba)


def block_hessian_diag_sum(block, w, spec, proba=None):
    """``LinearSoftmaxObjective.data_hessian_diag_sum(w, proba)`` of a prepared block."""
    return _objective(block, spec).data_hessian_diag_sum(w, proba=proba)


def block_max_squared_row_norm(block, spec) -> float:
    """``LinearSoftmaxObjective.max_squared_row_norm()`` of a prepared block."""
    return _objective(block, spec).max_squared_row_norm()


def block_nbytes(block) -> int:
    """Bytes held by a block's arrays."""
    return int(sum(a.nbytes for a in block if a is not None))


# -------------------------------------------------------------------------------------------------
# Group functions: one task per worker and evaluation runs over all the blocks that worker holds (a
# task costs the scheduler far more than a block's arithmetic at small sizes).  Partial sums are added
# in the order of the blocks in the group.
def _add(total, part):
    return np.array(part, dtype=np.float64, copy=True) if total is None else total + part


def group_sums(spec, w, need_grad, *blocks):
    """``sum`` over ``blocks`` of :func:`block_sums`: ``(loss_sum, grad_sum or None)``."""
    loss_sum, grad_sum = 0.0, None
    for b in blocks:
        loss_b, grad_b = block_sums(b, w, spec, need_grad)
        loss_sum += loss_b
        if need_grad:
            grad_sum = _add(grad_sum, grad_b)
    return loss_sum, grad_sum


def group_proba(spec, w, *blocks):
    """:func:`block_proba` of each block, as a list (kept on the worker for Hessian products)."""
    return [block_proba(b, w, spec) for b in blocks]


def group_hessp_sum(spec, w, v, probas, *blocks):
    """``sum`` over ``blocks`` of :func:`block_hessp_sum` (``probas`` from :func:`group_proba`)."""
    total = None
    for b, p in zip(blocks, probas):
        total = _add(total, block_hessp_sum(b, w, v, spec, proba=p))
    return total


def group_hessian_diag_sum(spec, w, probas, *blocks):
    """``sum`` over ``blocks`` of :func:`block_hessian_diag_sum`."""
    total = None
    for b, p in zip(blocks, probas):
        total = _add(total, block_hessian_diag_sum(b, w, spec, proba=p))
    return total


def group_gram_sum(spec, max_rows, *blocks):
    """``sum`` over ``blocks`` of ``LinearSoftmaxObjective.data_gram_sum``: ``(gram_sum, weight_sum)`` or
    None (sparse / too wide).  ``max_rows``: the rows each block may use, in block order."""
    total, weight = None, 0.0
    for b, rows in zip(blocks, max_rows):
        out = _objective(b, spec).data_gram_sum(rows)
        if out is None:
            return None
        total = _add(total, out[0])
        weight += out[1]
    return total, weight


def group_max_squared_row_norm(spec, *blocks) -> float:
    """The largest :func:`block_max_squared_row_norm` over ``blocks``."""
    return max(block_max_squared_row_norm(b, spec) for b in blocks)


def group_nbytes(*blocks) -> int:
    return sum(block_nbytes(b) for b in blocks)


def predict_block(X, estimator, method):
    """``getattr(estimator, method)(X)`` on one NumPy block: the lazy predict of a dask array."""
    return getattr(estimator, method)(X)

"""The reference softmax cross-entropy, in NumPy: the seed's three formulas live here and only here.

For logits ``z`` of shape ``(..., K)`` (classes on the last axis)::

    h(z)_k      = softmax(z)_k = exp(z_k - lse(z))            # the hypothesis   -> softmax
    lse(z)      = log sum_k exp(z_k)                          #                  -> logsumexp
    E           = -(1/N) sum_i y_i . log h(z_i)               # the loss         -> cross_entropy
    delta       = dE/dz = (h(z) - y) / N                      # the seed's delta -> cross_entropy_with_grad

Every other layer of softxent (the linear objective, the solvers, the command line) calls these
functions; the torch / triton / dask back-ends are fast paths that are tested against them.

Dtypes: float32 and float64 are kept as they are (float32 in, float32 out, the scalar loss summed in
float64); integer and bool logits are cast to float64, float16 to float32; complex and object arrays are
rejected with a ``TypeError``.  Inputs are never modified (unless passed as ``out=`` explicitly).

NaN logits propagate to NaN results.  ``-inf`` logits are allowed (masked classes): they get probability
0 and contribute ``0 * log 0 = 0`` unless a target puts weight on them, in which case the loss is
``+inf``.  A row whose logits are all ``-inf`` has no softmax (NaN), as in every library.  A row that
carries no loss (ignored target, zero weight, zero ``grad_output``) contributes exactly 0 to the loss
and to the gradient whatever its logits hold (NaN / inf padding included; PyTorch's gradient is NaN
there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "logsumexp",
    "softmax",
    "log_softmax",
    "softmax_jvp",
    "cross_entropy",
    "cross_entropy_with_grad",
]

REDUCTIONS = ("none", "mean", "sum")


# --------------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------------
def _float_array(x, name: str) -> np.ndarray:
    """``x`` as a real floating array: float32/float64 kept, ints/bools -> float64, float16 -> float32."""
    a = np.asarray(x)
    kind = a.dtype.kind
    if kind == "f":
        if a.dtype.itemsize < 4:
            return a.astype(np.float32)
        return a
    if kind in "biu":
        return a.astype(np.float64)
    raise TypeError(
        f"{name} must be a real floating-point (or integer) array; got dtype {a.dtype}"
    )


def _check_class_axis(z: np.ndarray, name: str = "logits") -> None:
    if z.ndim == 0 or z.shape[-1] == 0:
        raise ValueError(
            f"{name} must have at least one class on the last axis, shape (..., K) with K >= 1; "
            f"got shape {z.shape}"
        )


def _shift(z: np.ndarray, axis: int) -> np.ndarray:
    """The per-row maximum used to shift logits, with non-finite maxima replaced by 0.

    Shifting by the maximum makes ``exp`` overflow-free for any finite logits (float32 logits of
    +-1e30 included); a row whose maximum is -inf (all classes masked) or +inf is shifted by 0 so that
    its log-sum-exp comes out as -inf / +inf rather than NaN.
    """
    if _is_few_classes_last_axis(z, axis):
        m = _row_max(z.reshape(-1, z.shape[-1])).reshape(z.shape[:-1] + (1,))
    else:
        m = np.max(z, axis=axis, keepdims=True)
    return np.where(np.isfinite(m), m, 0).astype(z.dtype, copy=False)


def _is_few_classes_last_axis(z: np.ndarray, axis: int) -> bool:
    return z.ndim >= 1 and axis in (-1, z.ndim - 1) and 0 < z.shape[-1] <= _FEW_CLASSES


def _class_sum(x: np.ndarray, axis: int) -> np.ndarray:
    """``np.sum(x, axis, keepdims=True)``, through :func:`_row_sum` for a few classes on the last axis."""
    if _is_few_classes_last_axis(x, axis):
        K = x.shape[-1]
        return _row_sum(x.reshape(-1, K), np.ones(K, x.dtype)).reshape(x.shape[:-1] + (1,))
    return np.sum(x, axis=axis, keepdims=True)


def logsumexp(logits, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """Stable ``log(sum(exp(logits), axis))``.

    .. math::  \\mathrm{lse}(z) = m + \\log \\sum_k e^{z_k - m},\\qquad m = \\max_k z_k

    Args:
        logits: array ``(..., K)``.
        axis: the class axis.
        keepdims: keep the reduced axis with size 1.

    Returns:
        ``(...)`` (or ``(..., 1)`` with ``keepdims``) in the dtype of the logits.

    >>> float(logsumexp([0.0, 0.0]))  # log 2
    0.6931471805599453
    >>> float(logsumexp(np.float32([1e30, -1e30])))
    1e+30
    """
    z = _float_array(logits, "logits")
    _check_class_axis(z) if axis in (-1, z.ndim - 1) else None
    m = _shift(z, axis)
    s = _class_sum(np.exp(z - m), axis)
    with np.errstate(divide="ignore"):  # all -inf row: log 0 = -inf is the right answer
        out = np.log(s) + m
    return out if keepdims else np.squeeze(out, axis=axis)


def softmax(logits, axis: int = -1, *, out: np.ndarray | None = None) -> np.ndarray:
    """The seed's hypothesis ``h(z) = exp(z) / sum_k exp(z_k)``, computed as ``exp(z - max z) / sum``.

    Args:
        logits: array ``(..., K)``.
        axis: the class axis.
        out: optional array of the same shape and dtype to write into (may be ``logits`` itself).

    Returns:
        probabilities, same shape and dtype as the logits; each row sums to 1.

    >>> softmax([0.0, np.log(3.0)]).round(4)
    array([0.25, 0.75])
    """
    z = _float_array(logits, "logits")
    _check_class_axis(z) if axis in (-1, z.ndim - 1) else None
    m = _shift(z, axis)
    out = _out_buffer(out, z, "out")
    np.subtract(z, m, out=out)
    np.exp(out, out=out)
    out /= _class_sum(out, axis)
    return out


def log_softmax(logits, axis: int = -1, *, out: np.ndarray | None = None) -> np.ndarray:
    """``log h(z) = z - lse(z)``, without forming ``h`` (so tiny probabilities keep their logs).

    Args:
        logits: array ``(..., K)``.
        axis: the class axis.
        out: optional array of the same shape and dtype to write into (may be ``logits`` itself).

    Returns:
        log-probabilities, same shape and dtype as the logits.

    >>> log_softmax([0.0, 0.0]).round(4)
    array([-0.6931, -0.6931])
    """
    z = _float_array(logits, "logits")
    lse = logsumexp(z, axis=axis, keepdims=True)
    out = _out_buffer(out, z, "out")
    np.subtract(z, lse, out=out)
    return out


def softmax_jvp(proba, v) -> np.ndarray:
    """Jacobian of the softmax times ``v``, row by row: ``(diag(p) - p p^T) v = p * (v - <p, v>)``.

    It is also the Hessian of the cross-entropy with respect to the logits applied to ``v`` (the
    Hessian of ``lse`` is the softmax Jacobian), which is what Newton solvers need.

    Args:
        proba: ``(..., K)`` softmax probabilities.
        v: ``(..., K)`` direction.

    Returns:
        ``(..., K)``.
    """
    p = _float_array(proba, "proba")
    v = np.asarray(v, dtype=p.dtype)
    if v.shape != p.shape:
        raise ValueError(f"v must have the shape of proba {p.shape}; got {v.shape}")
    return p * (v - np.sum(p * v, axis=-1, keepdims=True))


def _out_buffer(out, like: np.ndarray, name: str) -> np.ndarray:
    if out is None:
        return np.empty_like(like)
    if not isinstance(out, np.ndarray) or out.shape != like.shape or out.dtype != like.dtype:
        got = (getattr(out, "shape", None), getattr(out, "dtype", type(out).__name__))
        raise ValueError(
            f"{name} must be an ndarray of shape {like.shape} and dtype {like.dtype}; got {got}"
        )
    return out


# --------------------------------------------------------------------------------------------------
# cross-entropy
# --------------------------------------------------------------------------------------------------
@dataclass
class _Problem:
    """Validated, flattened arguments: logits ``(M, K)``, one of ``index`` ``(M,)`` / ``proba`` ``(M, K)``."""

    z: np.ndarray
    index: np.ndarray | None
    proba: np.ndarray | None
    weight: np.ndarray | None
    sample_weight: np.ndarray | None
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    lead_shape: tuple


def _check_options(reduction, label_smoothing, z_loss, softcap, allowed=REDUCTIONS):
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}; got {reduction!r}")
    if not (isinstance(label_smoothing, (int, float, np.floating, np.integer))
            and 0.0 <= float(label_smoothing) <= 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1]; got {label_smoothing!r}")
    if not (isinstance(z_loss, (int, float, np.floating, np.integer)) and float(z_loss) >= 0.0
            and np.isfinite(z_loss)):
        raise ValueError(f"z_loss must be a finite number >= 0; got {z_loss!r}")
    if softcap is not None and not (
        isinstance(softcap, (int, float, np.floating, np.integer)) and float(softcap) > 0.0
        and np.isfinite(softcap)
    ):
        raise ValueError(f"softcap must be None or a finite number > 0; got {softcap!r}")


def _check_weights(w, shape, name, dtype):
    w = np.asarray(w)
    if w.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real numeric array; got dtype {w.dtype}")
    if w.shape != shape:
        raise ValueError(f"{name} must have shape {shape}; got shape {w.shape}")
    w = w.astype(dtype, copy=False)
    if not np.all(w >= 0) or not np.all(np.isfinite(w)):
        bad = w[~((w >= 0) & np.isfinite(w))].ravel()[:3]
        raise ValueError(f"{name} must be finite and >= 0; got values such as {bad.tolist()}")
    return w


def _prepare(logits, target, weight, sample_weight, ignore_index, label_smoothing, z_loss,
             softcap) -> _Problem:
    z = _float_array(logits, "logits")
    _check_class_axis(z)
    K = z.shape[-1]
    t = np.asarray(target)
    lead = z.shape[:-1]
    if t.dtype.kind in "iu":
        if t.shape != lead:
            raise ValueError(
                f"target of class indices must have shape {lead} (logits {z.shape} without the class "
                f"axis); got shape {t.shape}"
            )
        index = t.reshape(-1).astype(np.int64, copy=False)
        if not isinstance(ignore_index, (int, np.integer)):
            raise TypeError(f"ignore_index must be an int; got {ignore_index!r}")
        bad = ((index < 0) | (index >= K)) & (index != ignore_index)
        if bad.any():
            raise ValueError(
                f"target holds class index {int(index[bad][0])}, outside [0, {K}) for logits with "
                f"K={K} classes (and not ignore_index={ignore_index})"
            )
        proba = None
    elif t.dtype.kind == "f":
        if t.shape != z.shape and t.ndim == z.ndim:
            raise ValueError(
                f"target probabilities must have the logits' shape {z.shape}; got shape {t.shape}"
            )
        if t.shape != z.shape:
            raise TypeError(
                f"target must hold integer class indices of shape {lead}, or class probabilities "
                f"(floating) of shape {z.shape}; got dtype {t.dtype} and shape {t.shape}"
            )
        if isinstance(ignore_index, (int, np.integer)) and ignore_index >= 0:
            raise ValueError(PROBA_IGNORE_INDEX_MESSAGE.format(ignore_index=ignore_index))
        proba = t.reshape(-1, K).astype(z.dtype, copy=False)
        if not np.all(proba >= 0):  # also catches NaN
            bad = proba[~(proba >= 0)][:3]
            raise ValueError(
                f"target probabilities must be >= 0 and not NaN; got values such as {bad.tolist()}"
            )
        index = None
    else:
        raise TypeError(
            f"target must hold integer class indices of shape {lead}, or class probabilities "
            f"(floating) of shape {z.shape}; got dtype {t.dtype}"
        )
    w = None if weight is None else _check_weights(weight, (K,), "weight", z.dtype)
    s = None
    if sample_weight is not None:
        s = _check_weights(sample_weight, lead, "sample_weight", z.dtype).reshape(-1)
    _check_options("mean", label_smoothing, z_loss, softcap)
    return _Problem(z.reshape(-1, K), index, proba, w, s, int(ignore_index), float(label_smoothing),
                    float(z_loss), None if softcap is None else float(softcap), lead)


# PyTorch's rule (and message): an ignore_index >= 0 names a class, which a probability target has no
# way to ignore; a negative one (the default -100) matches no class and is accepted.
PROBA_IGNORE_INDEX_MESSAGE = (
    "ignore_index is not supported for floating point target (class probabilities); got "
    "ignore_index={ignore_index}. Leave it at its default -100, or zero the rows' sample_weight")


def _safe_mul(coef, x):
    """``coef * x`` with ``0 * (+-inf or NaN) = 0``: a zero weight means the term is absent."""
    with np.errstate(invalid="ignore"):
        return np.where(coef == 0, 0, coef * x)


# The cross-entropy runs over blocks of about this many bytes of logits (whole rows), so that its passes
# over a block (exp, row sum, scale, and the target's gather / scatter) stay in the L2 cache: each logit
# is read from memory once and each gradient entry written once, and ``cross_entropy`` needs no (N, K)
# buffer at all.  (Measured on a 1 MiB-L2 core: 256 KiB blocks cost ~30% more, 2 MiB ones 2x.)
_BLOCK_BYTES = 1 << 20
# Up to this many classes, NumPy's reductions along the short class axis pay a call per row; a loop over
# the K columns (each an operation on all rows) for the maximum, and BLAS for sums, are several times
# faster.
_FEW_CLASSES = 32


# Where sum_k exp(z_ik) lies in [lo, hi] the unshifted exponentials are used as they are: no term
# overflows, terms that underflow are below lo * eps of the sum, and the gradient's factor a_i / sum
# keeps a normal exponent for any a_i >= lo.
_UNSHIFTED_RANGE = {
    t: (float(np.sqrt(np.finfo(t).tiny)), float(1 / np.sqrt(np.finfo(t).tiny)))
    for t in (np.float32, np.float64)
}


def _row_max(z: np.ndarray) -> np.ndarray:
    """``max_k z_ik`` of an ``(R, K)`` block, shape ``(R,)``; NaN propagates as in ``np.max``."""
    if z.shape[1] > _FEW_CLASSES:
        return np.max(z, axis=1)
    m = z[:, 0].copy()
    for j in range(1, z.shape[1]):
        np.maximum(m, z[:, j], out=m)
    return m


def _take_rowwise(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``x[i, index[i]]`` for each row of an ``(R, K)`` block (flat indices: ~2x faster than x[arange, index])."""
    R, K = x.shape
    if x.flags.c_contiguous:
        return x.reshape(-1).take(np.arange(0, R * K, K) + index)
    return x[np.arange(R), index]


def _row_sum(x: np.ndarray, ones: np.ndarray) -> np.ndarray:
    """``sum_k x_ik`` of an ``(R, K)`` block, shape ``(R,)``, accumulated in the block's dtype.

    Long rows use NumPy's pairwise summation (about 1 eps of relative error in float32 where BLAS's
    ``x @ 1`` measures up to ~8 eps, for ~10% more time); for a few classes, where ``np.sum(axis=1)``
    pays a call per row, the matrix-vector product ``x @ 1`` is several times faster and as accurate.
    """
    if x.shape[1] > _FEW_CLASSES:
        return np.add.reduce(x, axis=1)
    # OpenBLAS's short-row kernels raise the invalid flag on rows holding inf (padding lanes), though
    # the sums come out right (inf); NaN from inf - inf still propagates into the result.
    with np.errstate(invalid="ignore"):
        return x @ ones


@dataclass
class _Coefficients:
    """What the targets and weights fix before any logit is read (per-row arrays have shape ``(M,)``)."""

    omega: np.ndarray                 # weight of row i in the 'mean' denominator
    ones: np.ndarray                  # (K,) ones, for row sums
    class_weight: np.ndarray | None   # (K,) w, or None for w = 1
    index: np.ndarray | None          # index targets: y_i, with ignored rows pointed at class 0 ...
    coef_y: np.ndarray | None         # ... whose one-hot weight coef_y_i = omega_i (1 - eps) is 0
    coef_u: np.ndarray | None         # index targets with smoothing: weight of the uniform part
    b_sum: np.ndarray | None          # index targets: sum_k B_ik
    kept_classes: np.ndarray | None   # smoothing with class weights: the classes with w_k > 0


def _coefficients(pb: _Problem) -> _Coefficients:
    """The parts of ``B`` and ``omega`` (see :func:`_forward`) that do not depend on the logits."""
    M, K = pb.z.shape
    dt = pb.z.dtype
    eps = pb.label_smoothing
    s = np.ones(M, dt) if pb.sample_weight is None else pb.sample_weight
    co = _Coefficients(omega=s, ones=np.ones(K, dt), class_weight=pb.weight, index=None, coef_y=None,
                       coef_u=None, b_sum=None, kept_classes=None)
    if pb.index is None:
        return co
    valid = pb.index != pb.ignore_index
    co.index = np.where(valid, pb.index, 0)
    wy = 1 if pb.weight is None else pb.weight[co.index]
    co.omega = np.where(valid, s * wy, 0).astype(dt, copy=False)
    if K == 1:
        # One class: h = 1 and lse = z, so the target term sum_k B_ik (lse_i - z_ik) vanishes for any
        # target weights; dropping it (rather than forming b_i h - B_i, whose float sums need not cancel)
        # gives an exact 0 loss and gradient, as PyTorch does.  The z-loss term remains.
        co.coef_y = np.zeros(M, dt)
        co.b_sum = co.coef_y
        return co
    co.coef_y = co.omega * dt.type(1 - eps)
    co.b_sum = co.coef_y
    if eps > 0:
        co.coef_u = np.where(valid, s, 0).astype(dt, copy=False) * dt.type(eps / K)
        w_sum = dt.type(K) if pb.weight is None else pb.weight.sum(dtype=dt)
        co.b_sum = co.coef_y + co.coef_u * w_sum
        if pb.weight is not None and np.count_nonzero(pb.weight) < K:
            co.kept_classes = np.flatnonzero(pb.weight)
    return co


def _class_weighted_row_sum(z: np.ndarray, co: _Coefficients) -> np.ndarray:
    """``sum_k w_k z_ik`` with zero-weight classes left out, so that ``-inf`` there is harmless."""
    if co.class_weight is None:
        return _row_sum(z, co.ones)
    if co.kept_classes is None:
        return z @ co.class_weight
    return z[:, co.kept_classes] @ co.class_weight[co.kept_classes]


@dataclass
class _Forward:
    """One block of ``R`` rows after the forward pass; ``e_ik = exp(z_ik - m_i)`` is in the caller's buffer
    (``m_i`` = 0, or the row maximum on the rows that need a shift; see :func:`_forward`)."""

    row_loss: np.ndarray       # (R,)   loss_i
    a: np.ndarray              # (R,)   coefficient of h(z_i) in dloss_i/dz_i
    ssum: np.ndarray           # (R,)   sum_k e_ik
    B: np.ndarray | None       # (R, K) probability targets: the full target weights
    tanh_c: np.ndarray | None  # (R, K) softcap: tanh(z / c)


def _forward(pb: _Problem, co: _Coefficients, rows: slice, e: np.ndarray,
             z_copy: np.ndarray | None = None) -> _Forward:
    """Per-row losses of the block ``rows`` and what its gradient needs; writes ``exp(z - m)`` into ``e``.

    ``rows`` selects rows of the flattened ``(M, K)`` problem; ``e`` is an ``(R, K)`` buffer.

    Write the (smoothed, weighted) target of row i as per-class weights ``B_i``: for class-index targets
    ``B_ik = s_i ((1 - eps) w_k [k = y_i] + eps/K w_k)`` (0 for an ignored row), for probability targets
    ``B_ik = s_i w_k ((1 - eps) y_ik + eps/K)``.  Then every option reduces to::

        loss_i    = sum_k B_ik (lse_i - z_ik)  +  z_loss * omega_i * lse_i**2
        dloss_i/dz_i = a_i h(z_i) - B_i,   a_i = sum_k B_ik + 2 z_loss omega_i lse_i

    (times ``1 - tanh(z/c)**2`` with a softcap, where ``z`` above is the capped ``c tanh(z/c)``).  With
    one-hot targets and no options this is the seed's ``delta = h(z) - y``.  For index targets ``B`` is
    never materialised.  ``omega_i`` is ``s_i w_{y_i}`` for index targets (0 when ignored) and ``s_i``
    for probability targets, which is how PyTorch normalises ``'mean'``.

    ``lse_i`` comes from ``sum_k exp(z_ik)`` unshifted where that sum lies safely inside the dtype's range
    (``exp(z)`` is as accurate as ``exp(z - m)``, and skipping the row maximum and the subtraction saves
    two of five passes); the other rows (large or very negative logits, -inf / NaN rows) are redone with
    the usual shift by the row maximum ``m_i``.  ``z_copy`` is scratch space for the block's logits, given
    when ``e`` is the logits themselves (``out=logits``), so that those rows can still be redone.
    """
    z = pb.z[rows]
    dt = z.dtype
    R = z.shape[0]
    tanh_c = None
    if pb.softcap is not None:
        c = dt.type(pb.softcap)
        tanh_c = np.divide(z, c)
        np.tanh(tanh_c, out=tanh_c)
        z = tanh_c * c
    elif z_copy is not None:
        z = z_copy[:R]
        z[...] = pb.z[rows]
    # Everything that reads the logits comes before ``e`` (which may be the logits) is written.
    B = None
    if co.index is not None:
        lin = _safe_mul(co.coef_y[rows], _take_rowwise(z, co.index[rows]))  # sum_k B_ik z_ik, one-hot
        if co.coef_u is not None:
            lin += _safe_mul(co.coef_u[rows], _class_weighted_row_sum(z, co))
        b_sum = co.b_sum[rows]
    else:
        eps = pb.label_smoothing
        y = pb.proba[rows]
        y = y * dt.type(1 - eps) + dt.type(eps / pb.z.shape[1]) if eps > 0 else y
        s = co.omega[rows]
        B = y * s[:, None] if co.class_weight is None else y * (s[:, None] * co.class_weight[None, :])
        b_sum = _row_sum(B, co.ones)
        with np.errstate(invalid="ignore"):
            lin = _row_sum(B * z, co.ones)
        bad = ~np.isfinite(lin)      # 0 * (-inf) at a masked class: redo those rows term by term
        if bad.any():
            lin[bad] = _safe_mul(B[bad], z[bad]).sum(axis=-1)

    with np.errstate(over="ignore"):      # overflowing rows are redone below
        np.exp(z, out=e)
        ssum = _row_sum(e, co.ones)
    lo, hi = _UNSHIFTED_RANGE[dt.type]
    redo = np.flatnonzero(~((ssum >= lo) & (ssum <= hi)))    # NaN sums too
    if z.shape[1] == 1:     # one class: shifted, h = 1 and loss = lse - z = 0 come out exactly
        redo = np.arange(R)
    with np.errstate(divide="ignore"):  # all -inf row: log 0 = -inf
        lse = np.log(ssum)
    if redo.size:
        zr = z[redo]
        m = _row_max(zr)
        m = np.where(np.isfinite(m), m, 0).astype(dt, copy=False)  # as in _shift
        er = np.exp(zr - m[:, None])
        e[redo] = er
        ssum[redo] = _row_sum(er, co.ones)
        with np.errstate(divide="ignore"):
            lse[redo] = np.log(ssum[redo]) + m

    row_loss = _safe_mul(b_sum, lse) - lin
    a = b_sum
    if pb.z_loss > 0:
        zl = co.omega[rows] * dt.type(pb.z_loss)
        row_loss += _safe_mul(zl, lse * lse)
        a = a + _safe_mul(zl, 2 * lse)
    return _Forward(row_loss.astype(dt, copy=False), a.astype(dt, copy=False), ssum, B, tanh_c)


def _backward(co: _Coefficients, fw: _Forward, rows: slice, row_scale: np.ndarray,
              g: np.ndarray) -> None:
    """``g_i <- row_scale_i dloss_i/dz_i = row_scale_i (a_i h(z_i) - B_i)``, in place over ``g = e``."""
    R = g.shape[0]
    dt = g.dtype
    with np.errstate(invalid="ignore"):
        ar = np.where(row_scale == 0, 0, fw.a * row_scale)   # a zero upstream factor: no gradient
    # A row that carries no loss (ignored, zero weight, zero grad_output, a mean over nothing) gets an
    # exact 0, even where its softmax is 0/0 (all -inf) ...
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(ar == 0, 0, ar / fw.ssum).astype(dt, copy=False)
    # Where a_i r_i / sum_i would be subnormal (tiny grad_output or weights over a large unshifted sum),
    # normalise first (e / sum <= 1) and scale after, so that the gradient keeps its precision.
    small = np.flatnonzero((np.abs(factor) < np.finfo(dt).tiny) & (factor != 0))
    if small.size:
        g_small = g[small] / fw.ssum[small, None] * ar[small, None]
    g *= factor[:, None]
    if small.size:
        g[small] = g_small
    if fw.B is not None:
        fw.B *= row_scale[:, None]
        g -= fw.B
    else:
        at = np.arange(0, R * g.shape[1], g.shape[1]) + co.index[rows]   # g[i, y_i] in the flat block
        g_flat = g.reshape(-1)
        g_flat[at] -= co.coef_y[rows] * row_scale
        if co.coef_u is not None:
            u = co.coef_u[rows] * row_scale
            g -= u[:, None] if co.class_weight is None else np.multiply.outer(u, co.class_weight)
    if fw.tanh_c is not None:
        dcap = fw.tanh_c
        np.multiply(dcap, dcap, out=dcap)
        np.subtract(1, dcap, out=dcap)     # d(c tanh(z/c))/dz = 1 - tanh(z/c)**2
        g *= dcap
    # ... and where such a row's logits hold NaN / +inf (padding), 0 * NaN would still be NaN.
    absent = np.flatnonzero((ar == 0) & ~np.isfinite(fw.ssum))
    if absent.size:
        g[absent] = 0


def _row_blocks(M: int, K: int, itemsize: int) -> tuple[int, list[slice]]:
    """Rows per block and the blocks' row slices covering ``range(M)``."""
    rows = max(1, _BLOCK_BYTES // (K * itemsize))
    return rows, [slice(i, min(i + rows, M)) for i in range(0, M, rows)]


def _unalias(pb: _Problem, g: np.ndarray) -> bool:
    """Copy the inputs that overlap the gradient buffer ``g``, except logits that *are* ``g``.

    Block by block, the logits of a block are read before its gradient is written over them, so
    ``out=logits`` needs no full copy (True is returned: :func:`_forward` then keeps one block's copy);
    any other overlap would let one block overwrite inputs of the next.
    """
    same = (pb.z.__array_interface__["data"][0] == g.__array_interface__["data"][0]
            and pb.z.strides == g.strides)
    if np.may_share_memory(pb.z, g) and not same:
        pb.z = pb.z.copy()
    for name in ("proba", "weight", "sample_weight"):
        v = getattr(pb, name)
        if v is not None and np.may_share_memory(v, g):
            setattr(pb, name, v.copy())
    return same


def _cross_entropy(pb: _Problem, reduction: str, *, with_grad: bool, grad_output=1.0,
                   out: np.ndarray | None = None):
    """The reduced loss and, ``with_grad``, ``grad_output * dloss/dz`` of shape ``(M, K)``.

    The reduction puts a per-row factor ``row_scale_i`` in front of each row's gradient: 1 for 'sum',
    ``1 / sum_i omega_i`` for 'mean' (0 when that sum is 0), times ``grad_output`` (per row for 'none').
    ``omega`` depends only on the targets and weights, so the factor is known before the logits are
    read and the loss and gradient come out of one blocked pass.
    """
    M, K = pb.z.shape
    dt = pb.z.dtype
    co = _coefficients(pb)
    denom = float(np.sum(co.omega, dtype=np.float64)) if reduction == "mean" else 1.0
    g = row_scale = None
    logits_are_out = False
    if with_grad:
        go = np.asarray(grad_output, dtype=dt)
        if reduction == "none":
            if go.shape not in ((), pb.lead_shape):
                raise ValueError(
                    f"grad_output must be a scalar or have the loss's shape {pb.lead_shape} for "
                    f"reduction='none'; got shape {go.shape}"
                )
            row_scale = np.broadcast_to(go, pb.lead_shape).reshape(-1)
        else:
            if go.shape != ():
                raise ValueError(
                    f"grad_output must be a scalar for reduction={reduction!r}; got shape {go.shape}"
                )
            # nothing to average (all ignored, empty batch, zero total weight): a zero gradient
            scale = 0.0 if denom == 0 else float(go) / denom
            row_scale = np.broadcast_to(dt.type(scale), (M,))
        if out is None:
            g = np.empty((M, K), dt)
        else:
            g = out.reshape(M, K)
            logits_are_out = _unalias(pb, g)
    block_rows, blocks = _row_blocks(M, K, dt.itemsize)
    scratch = None if with_grad else np.empty((min(block_rows, M), K), dt)
    z_copy = np.empty((min(block_rows, M), K), dt) if logits_are_out else None
    row_loss = np.empty(M, dt)
    for rows in blocks:
        e = g[rows] if with_grad else scratch[: rows.stop - rows.start]
        fw = _forward(pb, co, rows, e, z_copy)
        row_loss[rows] = fw.row_loss
        if with_grad:
            _backward(co, fw, rows, row_scale[rows], e)

    if reduction == "none":
        loss = row_loss.reshape(pb.lead_shape)
    else:
        total = np.sum(row_loss, dtype=np.float64)
        if reduction == "sum":
            loss = dt.type(total)
        else:   # a mean over nothing is 0, not NaN
            loss = dt.type(0.0) if denom == 0 else dt.type(total / denom)
    return loss, g


_CE_ARGS_DOC = """
    Args:
        logits: ``(..., K)`` unnormalised scores, classes on the last axis.
        target: integer class indices of shape ``(...)``, or class probabilities of shape ``(..., K)``
            (floating; rows need not sum to 1: the gradient is then ``h * sum(y) - y``).
        weight: ``(K,)`` non-negative per-class weights ``w`` (PyTorch's ``weight``).
        sample_weight: ``(...)`` non-negative per-row weights ``s``; multiplies each row's loss and its
            weight in the 'mean' denominator (composes with ``weight``).
        ignore_index: index targets equal to it contribute nothing (may lie inside ``[0, K)``; that
            class stays in the softmax).  With probability targets it must be negative (PyTorch's
            rule: ``ValueError`` otherwise).
        label_smoothing: ``eps`` in [0, 1]; the target becomes ``(1 - eps) y + eps / K`` (PyTorch).
        reduction: ``'none'`` (per-row losses, shape ``(...)``, 0 where ignored), ``'sum'`` or ``'mean'``.
        z_loss: adds ``z_loss * lse(z)**2`` per target (PaLM), weighted like the target.
        softcap: ``c > 0`` replaces the logits by ``c * tanh(z / c)`` before the softmax (Gemma 2).

    The 'mean' divides the sum of row losses by ``sum_i omega_i`` where ``omega_i = s_i w_{y_i}`` over
    non-ignored rows for index targets and ``omega_i = s_i`` for probability targets -- PyTorch's
    ``F.cross_entropy`` semantics.  Where that sum is 0 (every target ignored, an empty batch, all
    weights 0) the mean is 0 with a zero gradient, where PyTorch gives NaN.
"""


def cross_entropy(logits, target, *, weight=None, sample_weight=None, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean", z_loss: float = 0.0,
                  softcap: float | None = None):
    """Softmax cross-entropy ``E = -(1/N) sum_i y_i . log h(z_i)`` with PyTorch's options.

    .. math::  E = \\frac{1}{\\sum_i \\omega_i} \\sum_i \\sum_k B_{ik} (\\mathrm{lse}(z_i) - z_{ik})
{args}
    Returns:
        a scalar of the logits' dtype (summed in float64), or ``(...)`` for ``reduction='none'``.

    Equivalent to ``torch.nn.functional.cross_entropy(torch.moveaxis(z, -1, 1), target, ...)`` except
    for the empty-mean case above and the extra ``sample_weight``, ``z_loss`` and ``softcap``.

    >>> float(cross_entropy(np.array([[2.0, 0.0, 0.0]]), np.array([0])))
    0.23954476622...
    """
    _check_options(reduction, label_smoothing, z_loss, softcap)
    pb = _prepare(logits, target, weight, sample_weight, ignore_index, label_smoothing, z_loss, softcap)
    loss, _ = _cross_entropy(pb, reduction, with_grad=False)
    return loss


def cross_entropy_with_grad(logits, target, *, weight=None, sample_weight=None,
                            ignore_index: int = -100, label_smoothing: float = 0.0,
                            reduction: str = "mean", z_loss: float = 0.0,
                            softcap: float | None = None, grad_output=1.0,
                            out: np.ndarray | None = None):
    """The loss and its gradient with respect to the logits, in one pass: ``(E, dE/dz)``.

    ``dE/dz`` is the seed's ``delta = (h(z) - y) / N`` generalised to every option::

        delta_i = (a_i h(z_i) - B_i) / sum_i omega_i       ('mean'; no division for 'sum')

    (see :func:`cross_entropy` for ``B``, ``omega``).
{args}
        grad_output: the upstream gradient ``dL/dE``: a scalar for 'mean' / 'sum', or an array of shape
            ``(...)`` for 'none' (the result is then the vector-Jacobian product).
        out: optional ``(..., K)`` array of the logits' dtype to hold the gradient; it may be the logits
            array itself (it is then overwritten), which saves a buffer in the linear model.

    Returns:
        ``(loss, dlogits)``: loss as in :func:`cross_entropy`, dlogits with the shape and dtype of the
        logits (the ``out`` array itself when one is given).

    The logits are processed in row blocks that fit the L2 cache, each read from memory once; rows whose
    ``sum_k exp(z_ik)`` stays in the dtype's safe range skip the max shift (see ``_forward``).

    >>> loss, d = cross_entropy_with_grad(np.array([[0.0, 0.0]]), np.array([1]))
    >>> d   # (h - y) / N with h = (1/2, 1/2), y = (0, 1), N = 1
    array([[ 0.5, -0.5]])
    """
    _check_options(reduction, label_smoothing, z_loss, softcap)
    pb = _prepare(logits, target, weight, sample_weight, ignore_index, label_smoothing, z_loss, softcap)
    full_shape = pb.lead_shape + pb.z.shape[-1:]
    if out is not None and (not isinstance(out, np.ndarray) or out.shape != full_shape
                            or out.dtype != pb.z.dtype or not out.flags.c_contiguous
                            or not out.flags.writeable):
        got = (getattr(out, "shape", None), getattr(out, "dtype", type(out).__name__))
        if isinstance(out, np.ndarray):
            got += ("C-contiguous" if out.flags.c_contiguous else "not C-contiguous",
                    "writeable" if out.flags.writeable else "read-only")
        raise ValueError(
            f"out must be a writeable C-contiguous ndarray of shape {full_shape} and dtype "
            f"{pb.z.dtype}; got {got}"
        )
    loss, grad = _cross_entropy(pb, reduction, with_grad=True, grad_output=grad_output, out=out)
    return loss, (out if out is not None else grad.reshape(full_shape))


cross_entropy.__doc__ = cross_entropy.__doc__.replace("{args}", _CE_ARGS_DOC)
cross_entropy_with_grad.__doc__ = cross_entropy_with_grad.__doc__.replace("{args}", _CE_ARGS_DOC)

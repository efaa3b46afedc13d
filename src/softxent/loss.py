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
``+inf``.  A row whose logits are all ``-inf`` has no softmax (NaN), as in every library.
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
    m = np.max(z, axis=axis, keepdims=True)
    return np.where(np.isfinite(m), m, 0).astype(z.dtype, copy=False)


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
    s = np.sum(np.exp(z - m), axis=axis, keepdims=True)
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
    out /= np.sum(out, axis=axis, keepdims=True)
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
        if t.shape != z.shape:
            raise TypeError(
                f"target must hold integer class indices of shape {lead}, or class probabilities "
                f"(floating) of shape {z.shape}; got dtype {t.dtype} and shape {t.shape}"
            )
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


def _safe_mul(coef, x):
    """``coef * x`` with ``0 * (+-inf or NaN) = 0``: a zero weight means the term is absent."""
    with np.errstate(invalid="ignore"):
        return np.where(coef == 0, 0, coef * x)


def _masked_row_sum(z, w):
    """``sum_k w_k z_ik`` (``w = 1`` if None) with zero-weight classes left out, so ``-inf`` there is harmless."""
    if w is None:
        return z.sum(axis=-1)
    keep = np.flatnonzero(w)
    return z @ w if keep.size == w.size else z[:, keep] @ w[keep]


@dataclass
class _Forward:
    row_loss: np.ndarray      # (M,)   loss_i
    omega: np.ndarray         # (M,)   weight of row i in the 'mean' denominator
    e: np.ndarray             # (M, K) exp(z - m), the unnormalised softmax (becomes the gradient)
    ssum: np.ndarray          # (M,)   sum_k e_ik
    a: np.ndarray             # (M,)   coefficient of h(z_i) in dloss_i/dz_i
    coef_y: np.ndarray | None  # (M,)  index targets: weight of the one-hot part at y_i
    coef_u: np.ndarray | None  # (M,)  index targets with smoothing: weight of the uniform part
    B: np.ndarray | None       # (M, K) probability targets: the full target weights
    tanh_c: np.ndarray | None  # (M, K) softcap: tanh(z / c)


def _forward(pb: _Problem, out: np.ndarray | None) -> _Forward:
    """Per-row losses and what the gradient needs, in one pass over the logits.

    Write the (smoothed, weighted) target of row i as per-class weights ``B_i``: for class-index targets
    ``B_ik = s_i ((1 - eps) w_k [k = y_i] + eps/K w_k)`` (0 for an ignored row), for probability targets
    ``B_ik = s_i w_k ((1 - eps) y_ik + eps/K)``.  Then every option reduces to::

        loss_i    = sum_k B_ik (lse_i - z_ik)  +  z_loss * omega_i * lse_i**2
        dloss_i/dz_i = a_i h(z_i) - B_i,   a_i = sum_k B_ik + 2 z_loss omega_i lse_i

    (times ``1 - tanh(z/c)**2`` with a softcap, where ``z`` above is the capped ``c tanh(z/c)``).  With
    one-hot targets and no options this is the seed's ``delta = h(z) - y``.  For index targets ``B`` is
    never materialised.  ``omega_i`` is ``s_i w_{y_i}`` for index targets (0 when ignored) and ``s_i``
    for probability targets, which is how PyTorch normalises ``'mean'``.
    """
    z, (M, K) = pb.z, pb.z.shape
    dt = z.dtype
    eps = pb.label_smoothing
    s = np.ones(M, dt) if pb.sample_weight is None else pb.sample_weight
    tanh_c = None
    if pb.softcap is not None:
        c = dt.type(pb.softcap)
        tanh_c = np.tanh(z / c)
        z = tanh_c * c

    m = _shift(z, -1)
    # Read everything that needs the logits before ``e`` (which may alias them via ``out``) is written.
    coef_y = coef_u = B = None
    if pb.index is not None:
        valid = pb.index != pb.ignore_index
        idx = np.where(valid, pb.index, 0)
        wy = 1 if pb.weight is None else pb.weight[idx]
        omega = np.where(valid, s * wy, 0).astype(dt, copy=False)
        coef_y = omega * dt.type(1 - eps)
        lin = _safe_mul(coef_y, z[np.arange(M), idx])               # sum_k B_ik z_ik, one-hot part
        b_sum = coef_y
        if eps > 0:
            coef_u = np.where(valid, s, 0).astype(dt, copy=False) * dt.type(eps / K)
            w_sum = dt.type(K) if pb.weight is None else pb.weight.sum(dtype=dt)
            lin = lin + _safe_mul(coef_u, _masked_row_sum(z, pb.weight))
            b_sum = b_sum + coef_u * w_sum
    else:
        y = pb.proba if eps == 0 else pb.proba * dt.type(1 - eps) + dt.type(eps / K)
        B = y * s[:, None] if pb.weight is None else y * (s[:, None] * pb.weight[None, :])
        omega = s
        b_sum = B.sum(axis=-1)
        lin = _safe_mul(B, z).sum(axis=-1)

    e = np.empty_like(z) if out is None else out
    np.subtract(z, m, out=e)
    np.exp(e, out=e)
    ssum = e.sum(axis=-1)
    with np.errstate(divide="ignore"):
        lse = np.log(ssum) + m[:, 0]

    row_loss = _safe_mul(b_sum, lse) - lin
    a = b_sum
    if pb.z_loss > 0:
        zl = omega * dt.type(pb.z_loss)
        row_loss = row_loss + _safe_mul(zl, lse * lse)
        a = a + _safe_mul(zl, 2 * lse)
    return _Forward(row_loss.astype(dt, copy=False), omega, e, ssum, a.astype(dt, copy=False),
                    coef_y, coef_u, B, tanh_c)


def _backward(pb: _Problem, fw: _Forward, row_scale) -> np.ndarray:
    """``row_scale_i * dloss_i/dz_i = row_scale_i (a_i h(z_i) - B_i)``, written over ``fw.e``."""
    g, (M, K) = fw.e, fw.e.shape
    dt = g.dtype
    r = np.broadcast_to(np.asarray(row_scale, dtype=dt), (M,))
    ar = fw.a * r
    # A row that carries no loss (ignored, zero weight) gets an exact 0, even where its softmax is NaN.
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(ar == 0, 0, ar / fw.ssum).astype(dt, copy=False)
    g *= factor[:, None]
    if fw.B is not None:
        g -= fw.B * r[:, None]
    else:
        g[np.arange(M), np.where(pb.index != pb.ignore_index, pb.index, 0)] -= fw.coef_y * r
        if fw.coef_u is not None:
            w = np.ones(K, dt) if pb.weight is None else pb.weight
            g -= (fw.coef_u * r)[:, None] * w[None, :]
    if fw.tanh_c is not None:
        g *= 1 - fw.tanh_c * fw.tanh_c
    return g


def _reduce(fw: _Forward, reduction: str, lead_shape, dtype):
    """The reduced loss and the per-row factor that the reduction puts in front of each row's gradient."""
    if reduction == "none":
        return fw.row_loss.reshape(lead_shape), 1
    total = np.sum(fw.row_loss, dtype=np.float64)
    if reduction == "sum":
        return dtype.type(total), 1
    denom = np.sum(fw.omega, dtype=np.float64)
    if denom == 0:  # nothing to average (all ignored, empty batch, zero total weight): 0, not NaN
        return dtype.type(0.0), 0
    return dtype.type(total / denom), 1.0 / denom


_CE_ARGS_DOC = """
    Args:
        logits: ``(..., K)`` unnormalised scores, classes on the last axis.
        target: integer class indices of shape ``(...)``, or class probabilities of shape ``(..., K)``
            (floating; rows need not sum to 1: the gradient is then ``h * sum(y) - y``).
        weight: ``(K,)`` non-negative per-class weights ``w`` (PyTorch's ``weight``).
        sample_weight: ``(...)`` non-negative per-row weights ``s``; multiplies each row's loss and its
            weight in the 'mean' denominator (composes with ``weight``).
        ignore_index: index targets equal to it contribute nothing (may lie inside ``[0, K)``; that
            class stays in the softmax).
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
    0.2395447281...
    """
    _check_options(reduction, label_smoothing, z_loss, softcap)
    pb = _prepare(logits, target, weight, sample_weight, ignore_index, label_smoothing, z_loss, softcap)
    fw = _forward(pb, None)
    loss, _ = _reduce(fw, reduction, pb.lead_shape, pb.z.dtype)
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
        logits.

    >>> loss, d = cross_entropy_with_grad(np.array([[0.0, 0.0]]), np.array([1]))
    >>> d   # (h - y) / N with h = (1/2, 1/2), y = (0, 1), N = 1
    array([[ 0.5, -0.5]])
    """
    _check_options(reduction, label_smoothing, z_loss, softcap)
    pb = _prepare(logits, target, weight, sample_weight, ignore_index, label_smoothing, z_loss, softcap)
    flat_out = None
    if out is not None:
        full_shape = pb.lead_shape + pb.z.shape[-1:]
        if (not isinstance(out, np.ndarray) or out.shape != full_shape or out.dtype != pb.z.dtype
                or not out.flags.c_contiguous):
            got = (getattr(out, "shape", None), getattr(out, "dtype", type(out).__name__))
            raise ValueError(
                f"out must be a C-contiguous ndarray of shape {full_shape} and dtype {pb.z.dtype}; "
                f"got {got}"
            )
        flat_out = out.reshape(pb.z.shape)
    fw = _forward(pb, flat_out)
    loss, factor = _reduce(fw, reduction, pb.lead_shape, pb.z.dtype)
    go = np.asarray(grad_output, dtype=pb.z.dtype)
    if reduction == "none":
        if go.shape not in ((), pb.lead_shape):
            raise ValueError(
                f"grad_output must be a scalar or have the loss's shape {pb.lead_shape} for "
                f"reduction='none'; got shape {go.shape}"
            )
        row_scale = np.broadcast_to(go, pb.lead_shape).reshape(-1)
    else:
        if go.shape != ():
            raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}; got shape {go.shape}")
        row_scale = go * factor
    grad = _backward(pb, fw, row_scale)
    return loss, grad.reshape(pb.lead_shape + (pb.z.shape[-1],))


cross_entropy.__doc__ = cross_entropy.__doc__.replace("{args}", _CE_ARGS_DOC)
cross_entropy_with_grad.__doc__ = cross_entropy_with_grad.__doc__.replace("{args}", _CE_ARGS_DOC)

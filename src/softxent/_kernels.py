"""The row kernels of one objective evaluation: compiled (``softxent._fused``) when built, NumPy otherwise.

:class:`softxent.objective.LinearSoftmaxObjective` takes ``X`` in row blocks; for each block a BLAS product
gives the logits, one of these kernels turns them into the block's loss and ``delta`` (or its Hessian
product's ``R``), and a second BLAS product gives ``delta^T x``.  The NumPy versions call the reference
functions of :mod:`softxent.loss` -- the one home of ``h``, ``E`` and ``delta`` -- and are both the fallback
(no C compiler at install time) and the oracle of the compiled ones (``tests/test_kernels.py``, to 1e-12).

Every kernel takes the block's logits as ``(n, K)`` C-ordered, or ``(K, n)`` C-ordered when ``transposed``.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .loss import cross_entropy, cross_entropy_with_grad, softmax, softmax_jvp

try:  # built by the normal install (setup.py); missing where no C compiler was found
    from . import _fused
except ImportError:  # pragma: no cover - depends on the install
    _fused = None

__all__ = ["available", "backend", "use", "ce_grad_rows", "ce_rows", "softmax_rows", "softmax_jvp_rows"]

#: the kernels :func:`backend` can name
BACKENDS = ("cython", "numpy")

_backend = "cython" if _fused is not None else "numpy"


def available() -> tuple[str, ...]:
    """The backends this install has (``'numpy'`` always; ``'cython'`` when the extension was built)."""
    return BACKENDS if _fused is not None else ("numpy",)


def backend() -> str:
    """The backend in use: ``'cython'`` (compiled, the default when built) or ``'numpy'``."""
    return _backend


@contextlib.contextmanager
def use(name: str):
    """Run the enclosed evaluations with the kernels ``name`` (``'cython'`` or ``'numpy'``); for tests and
    benchmarks that compare the two on the same data."""
    global _backend
    if name not in available():
        raise ValueError(f"kernels must be one of {available()} in this install; got {name!r}"
                         + ("" if _fused is not None else " (softxent._fused was not built: no C compiler "
                                                          "when softxent was installed?)"))
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def _rows(z, transposed):
    """The ``(n, K)`` view of a block's logits."""
    return z.T if transposed else z


def _labels(y):
    return np.ascontiguousarray(y, dtype=np.int64)


def ce_grad_rows(z, transposed, y, sw=None, gb=None, p_out=None) -> float:
    """Overwrite the logits ``z`` with ``delta_i = s_i (h(z_i) - e_{y_i})``, add the column sums of
    ``delta`` to ``gb`` (``(K,)`` float64, or None), write ``h(z)`` to ``p_out`` (``(n, K)``, or None),
    and return ``sum_i s_i CE_i`` in float64."""
    if _backend == "cython":
        return _fused.ce_grad_rows(z, transposed, _labels(y), sw, gb, p_out)
    zr = _rows(z, transposed)
    if p_out is not None:
        softmax(zr, out=p_out)
    row_loss, dz = cross_entropy_with_grad(zr, y, sample_weight=sw, reduction="none",
                                           out=None if transposed else z)
    if transposed:
        zr[...] = dz
    if gb is not None:
        gb += dz.sum(axis=0, dtype=np.float64)
    return float(np.sum(row_loss, dtype=np.float64))


def ce_rows(z, transposed, y, sw=None) -> float:
    """``sum_i s_i CE_i`` in float64; ``z`` is left as it was."""
    if _backend == "cython":
        return _fused.ce_rows(z, transposed, _labels(y), sw)
    row_loss = cross_entropy(_rows(z, transposed), y, sample_weight=sw, reduction="none")
    return float(np.sum(row_loss, dtype=np.float64))


def softmax_rows(z, transposed, p_out) -> None:
    """Write ``h(z_i)`` to ``p_out`` ``(n, K)`` C-ordered; ``z`` is left as it was."""
    if _backend == "cython":
        _fused.softmax_rows(z, transposed, p_out)
    else:
        softmax(_rows(z, transposed), out=p_out)


def softmax_jvp_rows(p, v, transposed, sw=None, gb=None) -> None:
    """Overwrite the direction's logits ``v`` with ``R_i = s_i (diag(p_i) - p_i p_i^T) v_i`` (``p`` is
    ``(n, K)`` C-ordered) and add the column sums of ``R`` to ``gb`` (or None)."""
    if _backend == "cython":
        _fused.softmax_jvp_rows(p, v, transposed, sw, gb)
        return
    vr = _rows(v, transposed)
    r = softmax_jvp(p, vr)
    if sw is not None:
        r *= sw[:, None]
    vr[...] = r
    if gb is not None:
        gb += r.sum(axis=0, dtype=np.float64)

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled row kernels of :class:`softxent.objective.LinearSoftmaxObjective` (built by the normal install).

The objective evaluates row block by row block: a BLAS product for the block's logits ``z = x Theta^T + b``,
then one of these kernels over the block's rows while they are in cache, then a BLAS product for
``delta^T x``.  NumPy needs five to eight passes with temporaries for the row step (max, subtract, exp,
sum, log, the target's gather, the gradient); these do it in two passes per row with no temporaries and
without the GIL, so the objective's thread pool runs them side by side.

The formulas are those of :mod:`softxent.loss` (the reference, and the fallback when this extension is
missing: :mod:`softxent._kernels`); ``tests/test_kernels.py`` compares the two on the same data to 1e-12.
Arithmetic is in float64 for float32 logits as well (the results are stored in the logits' dtype).

Layout: a block's logits are ``(n, K)`` C-ordered, or ``(K, n)`` C-ordered when ``transposed`` (the
float64 products are taken transposed, see ``LinearSoftmaxObjective._x_theta_t``).
"""

from libc.math cimport exp, log
from cython cimport floating


cdef inline double _row_max(const floating* row, Py_ssize_t K, Py_ssize_t cs) noexcept nogil:
    cdef Py_ssize_t k
    cdef double m = row[0]
    for k in range(1, K):
        if row[k * cs] > m:
            m = row[k * cs]
    return m


cdef double _ce_grad_rows(floating* z, Py_ssize_t n, Py_ssize_t K, Py_ssize_t rs, Py_ssize_t cs,
                          const long long* y, const floating* sw, double* gb, floating* p_out) noexcept nogil:
    # per row: loss s_i (lse(z_i) - z_iy) summed in float64, then z_i <- s_i (h(z_i) - e_y)
    cdef Py_ssize_t i, k
    cdef floating* row
    cdef double m, s, zy, wi, inv, h, d, total = 0.0
    cdef long long yi
    for i in range(n):
        row = z + i * rs
        m = _row_max(row, K, cs)
        yi = y[i]
        zy = row[yi * cs]
        s = 0.0
        for k in range(K):
            h = exp(row[k * cs] - m)
            s += h
            row[k * cs] = <floating>h
        wi = 1.0 if sw == NULL else sw[i]
        # (m - z_y) + log s: the shift keeps log's argument in [1, K] and the difference exact
        total += wi * ((m - zy) + log(s))
        inv = 1.0 / s
        for k in range(K):
            h = row[k * cs] * inv
            if p_out != NULL:
                p_out[i * K + k] = <floating>h
            d = wi * h
            if k == yi:
                d -= wi
            row[k * cs] = <floating>d
            if gb != NULL:
                gb[k] += d
    return total


cdef double _ce_rows(floating* z, Py_ssize_t n, Py_ssize_t K, Py_ssize_t rs, Py_ssize_t cs,
                     const long long* y, const floating* sw) noexcept nogil:
    # the loss alone (line searches ask for it): z is left as it was
    cdef Py_ssize_t i, k
    cdef floating* row
    cdef double m, s, wi, total = 0.0
    for i in range(n):
        row = z + i * rs
        m = _row_max(row, K, cs)
        s = 0.0
        for k in range(K):
            s += exp(row[k * cs] - m)
        wi = 1.0 if sw == NULL else sw[i]
        total += wi * ((m - row[y[i] * cs]) + log(s))
    return total


cdef void _softmax_jvp_rows(const floating* p, floating* v, Py_ssize_t n, Py_ssize_t K, Py_ssize_t rs,
                            Py_ssize_t cs, const floating* sw, double* gb) noexcept nogil:
    # v_i <- s_i p_i * (v_i - <p_i, v_i>): the CE Hessian on the logits times v (p is (n, K) C-ordered)
    cdef Py_ssize_t i, k
    cdef floating* row
    cdef const floating* pr
    cdef double dot, wi, r
    for i in range(n):
        row = v + i * rs
        pr = p + i * K
        dot = 0.0
        for k in range(K):
            dot += pr[k] * <double>row[k * cs]
        wi = 1.0 if sw == NULL else sw[i]
        for k in range(K):
            r = wi * pr[k] * (row[k * cs] - dot)
            row[k * cs] = <floating>r
            if gb != NULL:
                gb[k] += r


cdef void _softmax_rows(floating* z, Py_ssize_t n, Py_ssize_t K, Py_ssize_t rs, Py_ssize_t cs,
                        floating* p_out) noexcept nogil:
    # p_out (n, K) C-ordered <- h(z_i); z is left as it was
    cdef Py_ssize_t i, k
    cdef floating* row
    cdef double m, s, inv, e
    for i in range(n):
        row = z + i * rs
        m = _row_max(row, K, cs)
        s = 0.0
        for k in range(K):
            e = exp(row[k * cs] - m)
            p_out[i * K + k] = <floating>e
            s += e
        inv = 1.0 / s
        for k in range(K):
            p_out[i * K + k] = <floating>(p_out[i * K + k] * inv)


cdef inline void _layout(Py_ssize_t r0, Py_ssize_t r1, bint transposed, Py_ssize_t* n, Py_ssize_t* K,
                         Py_ssize_t* rs, Py_ssize_t* cs) noexcept nogil:
    if transposed:  # (K, n): row i of the block is column i
        n[0], K[0], rs[0], cs[0] = r1, r0, 1, r1
    else:
        n[0], K[0], rs[0], cs[0] = r0, r1, r1, 1


def ce_grad_rows(floating[:, ::1] z, bint transposed, const long long[::1] y, floating[::1] sw,
                 double[::1] gb, floating[:, ::1] p_out):
    """Overwrite the block's logits with ``s_i (h(z_i) - e_{y_i})``; add their column sums to ``gb``
    (``(K,)`` float64, or None); write ``h`` to ``p_out`` (``(n, K)``, or None); return
    ``sum_i s_i (lse(z_i) - z_{i, y_i})`` (float64).  ``sw`` None: every ``s_i = 1``."""
    cdef Py_ssize_t n, K, rs, cs
    _layout(z.shape[0], z.shape[1], transposed, &n, &K, &rs, &cs)
    if y.shape[0] != n or (sw is not None and sw.shape[0] != n) or (gb is not None and gb.shape[0] != K) \
            or (p_out is not None and (p_out.shape[0] != n or p_out.shape[1] != K)):
        raise ValueError("ce_grad_rows: mismatched shapes")
    cdef double total
    cdef const floating* swp = NULL if sw is None else &sw[0]
    cdef double* gbp = NULL if gb is None else &gb[0]
    cdef floating* pp = NULL if p_out is None else &p_out[0, 0]
    if n == 0 or K == 0:
        return 0.0
    with nogil:
        total = _ce_grad_rows(&z[0, 0], n, K, rs, cs, &y[0], swp, gbp, pp)
    return total


def ce_rows(floating[:, ::1] z, bint transposed, const long long[::1] y, floating[::1] sw):
    """``sum_i s_i (lse(z_i) - z_{i, y_i})`` (float64); ``z`` is not modified."""
    cdef Py_ssize_t n, K, rs, cs
    _layout(z.shape[0], z.shape[1], transposed, &n, &K, &rs, &cs)
    if y.shape[0] != n or (sw is not None and sw.shape[0] != n):
        raise ValueError("ce_rows: mismatched shapes")
    cdef double total
    cdef const floating* swp = NULL if sw is None else &sw[0]
    if n == 0 or K == 0:
        return 0.0
    with nogil:
        total = _ce_rows(&z[0, 0], n, K, rs, cs, &y[0], swp)
    return total


def softmax_jvp_rows(floating[:, ::1] p, floating[:, ::1] v, bint transposed, floating[::1] sw,
                     double[::1] gb):
    """Overwrite ``v`` with ``s_i (diag(p_i) - p_i p_i^T) v_i``; add its column sums to ``gb`` (or None)."""
    cdef Py_ssize_t n, K, rs, cs
    _layout(v.shape[0], v.shape[1], transposed, &n, &K, &rs, &cs)
    if p.shape[0] != n or p.shape[1] != K or (sw is not None and sw.shape[0] != n) \
            or (gb is not None and gb.shape[0] != K):
        raise ValueError("softmax_jvp_rows: mismatched shapes")
    cdef const floating* swp = NULL if sw is None else &sw[0]
    cdef double* gbp = NULL if gb is None else &gb[0]
    if n == 0 or K == 0:
        return
    with nogil:
        _softmax_jvp_rows(&p[0, 0], &v[0, 0], n, K, rs, cs, swp, gbp)


def softmax_rows(floating[:, ::1] z, bint transposed, floating[:, ::1] p_out):
    """Write ``h(z_i)`` to ``p_out`` ``(n, K)``; ``z`` is not modified."""
    cdef Py_ssize_t n, K, rs, cs
    _layout(z.shape[0], z.shape[1], transposed, &n, &K, &rs, &cs)
    if p_out.shape[0] != n or p_out.shape[1] != K:
        raise ValueError("softmax_rows: mismatched shapes")
    if n == 0 or K == 0:
        return
    with nogil:
        _softmax_rows(&z[0, 0], n, K, rs, cs, &p_out[0, 0])

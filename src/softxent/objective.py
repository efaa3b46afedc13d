"""The softmax-regression objective: one home for the loss, gradient and Hessian-vector product of the
linear model ``z = X Theta^T + b`` trained on the cross-entropy of :mod:`softxent.loss`.

Notation (that of the code): ``X`` is ``(N, D)`` (dense or scipy.sparse CSR), ``y`` holds class indices
in ``[0, K)``, ``s`` the sample weights (class weights already folded in), ``S = sum_i s_i``, ``Theta`` the
``(K, D)`` coefficients and ``b`` the ``(K,)`` intercept::

    E(Theta, b) = (1/S) sum_i s_i CE_i  +  alpha ((1 - rho)/2 ||Theta||^2 + rho ||Theta||_1)
    CE_i        = lse(z_i) - z_{i, y_i},        z_i = Theta x_i + b

    dE/dTheta   = delta^T X + alpha (1 - rho) Theta        (+ the L1 subgradient, handled by a prox)
    dE/db       = sum_i delta_i,           delta_i = s_i (h(z_i) - e_{y_i}) / S   -- the seed's delta
    H v         : V_z = X V_Theta^T + v_b,  R_i = (s_i/S) (diag(h_i) - h_i h_i^T) V_z,i
                  (H v)_Theta = R^T X + alpha (1 - rho) V_Theta,   (H v)_b = sum_i R_i

The intercept is not penalised.  Coefficients travel as one flat vector ``w = [Theta.ravel(), b]`` (``b``
only with ``fit_intercept``), which is what scipy's optimisers and the solvers use.

The data terms are exposed as *unnormalised sums* (:meth:`data_sums`, :meth:`data_hessp_sum`) so that a
data set split in row blocks (softxent.dask) computes each block's sums with this same code and the
client adds them up before :meth:`finish` normalises and adds the penalty.

float32 ``X`` keeps float32 matrix products (the coefficients are cast to float32 for them); the scalar
loss is accumulated in float64.  Sparse ``X`` is never densified.
"""

from __future__ import annotations

import contextlib

import numpy as np
import scipy.sparse as sp
from scipy.linalg.blas import get_blas_funcs

from . import _kernels
from ._parallel import blas_single_thread, check_n_jobs, effective_n_jobs, ordered_map
from .loss import softmax

__all__ = ["LinearSoftmaxObjective"]


def _rows(z, transposed):
    """The ``(n, K)`` view of a block's logits held ``(K, n)`` when ``transposed``."""
    return z.T if transposed else z


@contextlib.contextmanager
def _holding(value, context):
    with context:
        yield value


def _axpy(a: float, x, y):
    """``y += a x`` in place, in one pass with no temporary (BLAS ``saxpy`` / ``daxpy``) when ``x`` and
    ``y`` are contiguous and of the same float dtype; NumPy otherwise."""
    if (x.dtype == y.dtype and y.dtype in (np.float32, np.float64) and y.flags.c_contiguous
            and x.flags.c_contiguous):
        get_blas_funcs("axpy", (y,))(x, y, a=a)
    else:
        y += a * x


class LinearSoftmaxObjective:
    """Loss, gradient and Hessian-vector product of L2/L1-penalised softmax regression.

    Args:
        X: ``(N, D)`` float32/float64 ndarray or CSR matrix (validated by the caller).
        y: ``(N,)`` integer class indices in ``[0, n_classes)``.
        n_classes: ``K``.
        sample_weight: ``(N,)`` non-negative weights ``s`` (None = ones).
        alpha: penalty strength ``alpha >= 0``.
        l1_ratio: ``rho`` in [0, 1]: 0 = L2 (ridge), 1 = L1 (lasso), between = elastic net.
        fit_intercept: whether ``w`` carries the intercept ``b``.
        weight_sum: the normaliser ``S``; defaults to ``sum(s)`` of this data.  A block of a larger data
            set passes the total so that :meth:`loss_gradient` on the block is its share.
        n_jobs: threads over the row blocks of dense ``X`` (:mod:`softxent._parallel`): None or -1 = every
            core this process may use, BLAS at one thread meanwhile.  The default 1 is one thread with
            BLAS left as it is (a Dask worker's block, a minibatch).
    """

    def __init__(self, X, y, n_classes: int, sample_weight=None, *, alpha: float = 0.0,
                 l1_ratio: float = 0.0, fit_intercept: bool = True, weight_sum: float | None = None,
                 n_jobs: int | None = 1):
        self.X = X
        self.y = np.asarray(y, dtype=np.int64)
        self.n_classes = int(n_classes)
        self.n_features = X.shape[1]
        self.dtype = X.dtype
        self.sample_weight = None if sample_weight is None else np.asarray(sample_weight, dtype=X.dtype)
        self.alpha = float(alpha)
        self.l1_ratio = float(l1_ratio)
        self.fit_intercept = bool(fit_intercept)
        if weight_sum is None:
            weight_sum = (X.shape[0] if self.sample_weight is None
                          else float(np.sum(self.sample_weight, dtype=np.float64)))
        self.weight_sum = float(weight_sum)
        self.n_jobs = check_n_jobs(n_jobs)
        self._hess_cache = None
        self._xt_csr = None  # sparse X only: X^T in CSR, made on first use
        self._xt_sq_csr = None  # sparse X only: X^T with its entries squared (shares X^T's index arrays)

    # ---------------------------------------------------------------- coefficient layout
    @property
    def n_coef(self) -> int:
        """Length of the flat coefficient vector ``w``."""
        return self.n_classes * (self.n_features + int(self.fit_intercept))

    def unpack(self, w):
        """``w`` -> ``(Theta (K, D), b (K,) or None)`` as views."""
        K, D = self.n_classes, self.n_features
        theta = w[: K * D].reshape(K, D)
        return theta, (w[K * D:] if self.fit_intercept else None)

    def pack(self, theta, intercept=None, dtype=np.float64) -> np.ndarray:
        """``(Theta, b)`` -> the flat vector ``w`` (float64 unless ``dtype`` says; ``b`` None: zeros).

        ``theta`` may be any ``(K, D)`` array (float32, a transposed view): it is cast and laid out in one
        copy straight into ``w`` -- for a sparse ``X`` the gradient arrives as a transposed view, and
        a ravel then a concatenate would copy its 2M entries twice at 20 x 100000.
        """
        K, D = self.n_classes, self.n_features
        w = np.empty(self.n_coef, dtype=dtype)
        w[: K * D].reshape(K, D)[...] = np.reshape(theta, (K, D))
        if self.fit_intercept:
            w[K * D:] = 0.0 if intercept is None else np.ravel(intercept)
        return w

    # ---------------------------------------------------------------- data terms (sums over rows)
    def decision_function(self, w) -> np.ndarray:
        """``z = X Theta^T + b``, ``(N, K)`` in the dtype of ``X`` (for float64 dense ``X``, F-ordered: see
        :meth:`_x_theta_t`)."""
        theta, b = self.unpack(w)
        theta = np.ascontiguousarray(theta, dtype=self.dtype)
        return _rows(*self._logits(self.X, theta, None if b is None else b.astype(self.dtype)))

    #: Dense float64 ``X``: the products are taken transposed (see :meth:`_x_theta_t`).
    TRANSPOSED_DTYPES = (np.dtype(np.float64),)

    def _x_theta_t(self, xb, theta) -> np.ndarray:
        """``xb Theta^T`` for a dense block ``xb`` ``(n, D)`` and ``theta`` ``(K, D)`` C-contiguous in X's dtype.

        For dense float64 the product is computed as ``(Theta xb^T)^T``: the same numbers, but OpenBLAS's
        dgemm runs the ``K x n`` output ~1.5x faster than the ``n x K`` one when ``K`` is small (measured
        on the 60000 x 784, K = 10 set: 62 vs 100 ms; float32's sgemm shows no such gap, so float32 keeps
        the direct product).  The result is then an F-ordered ``(n, K)`` view, which every consumer
        here accepts (the row kernels take its C-ordered ``(K, n)`` base).  Each thread's block gets its own
        result array, so no buffer is shared between the pool's threads.
        """
        if xb.dtype in self.TRANSPOSED_DTYPES:
            return (theta @ xb.T).T
        return xb @ theta.T

    @staticmethod
    def _dz_t_x(dz, xb) -> np.ndarray:
        """``dz^T xb`` ``(K, D)`` for dense ``xb``: with ``dz^T`` made C-contiguous first (a copy of ``n K``
        elements), OpenBLAS takes its faster path for the skinny product (49 vs 54 ms at 60000 x 784)."""
        return np.ascontiguousarray(dz.T) @ xb

    def data_sums(self, w, need_grad: bool = True, keep_proba: bool = False):
        """``(sum_i s_i CE_i, d/dw of that sum)``: the unnormalised data term, no penalty.

        Per block of rows (:meth:`row_blocks`): one matrix product for the block's ``z``, one pass of the
        row kernel (:func:`softxent._kernels.ce_grad_rows`: the loss and ``s_i (h_i - e_{y_i})`` written
        over ``z``), one product for ``delta^T x`` while the block is still in cache.  X streams through
        memory once per evaluation, the ``(N, K)`` logits never exist whole, and the blocks run on
        ``n_jobs`` threads, their partial sums added in block order (the same numbers for any ``n_jobs``).

        ``keep_proba``: keep ``h(z)`` at ``w`` for the Hessian products that follow at the same point
        (Newton-CG asks for them at each accepted iterate): written by the same row pass, it spares them
        a product ``X Theta^T``.
        """
        X, K = self.X, self.n_classes
        theta, b = self.unpack(w)
        theta = np.ascontiguousarray(theta, dtype=self.dtype)
        b = None if b is None else b.astype(self.dtype)
        proba = np.empty((X.shape[0], K), dtype=self.dtype) if keep_proba else None
        if sp.issparse(X):
            zc, transposed = self._logits(X, theta, b)
            gb = np.zeros(K) if need_grad else None
            loss_sum = self._row_pass(zc, transposed, self.y, self.sample_weight, gb, proba, need_grad)
            grad = None
            if need_grad:
                # X^T as its own CSR matrix, made once: the product then writes each output row in turn
                # instead of scattering into it (3-4x faster than the CSC view X.T at 0.1% density)
                grad = self.pack((self._x_transposed() @ _rows(zc, transposed)).T,
                                 gb if self.fit_intercept else None)
        else:
            def block(rows):
                xb = X[rows]
                zc, transposed = self._logits(xb, theta, b)
                gb = np.zeros(K) if need_grad else None
                loss = self._row_pass(zc, transposed, self.y[rows], self._weights(rows), gb,
                                      None if proba is None else proba[rows], need_grad)
                return loss, (self._dz_t_x(_rows(zc, transposed), xb) if need_grad else None), gb

            loss_sum = 0.0
            g_theta = np.zeros((K, self.n_features)) if need_grad else None
            g_b = np.zeros(K) if need_grad else None
            blocks = self.row_blocks()
            with self._threads(len(blocks)) as n_jobs:
                for loss, gt, gb in ordered_map(block, blocks, n_jobs):
                    loss_sum += loss
                    if need_grad:
                        g_theta += gt
                        g_b += gb
            grad = self.pack(g_theta, g_b if self.fit_intercept else None) if need_grad else None
        if keep_proba:
            self._remember_proba(w, proba)
        return loss_sum, grad

    @staticmethod
    def _row_pass(zc, transposed, y, sw, gb, proba, need_grad) -> float:
        if need_grad:
            return _kernels.ce_grad_rows(zc, transposed, y, sw, gb, proba)
        if proba is not None:
            _kernels.softmax_rows(zc, transposed, proba)
        return _kernels.ce_rows(zc, transposed, y, sw)

    def _weights(self, rows):
        return None if self.sample_weight is None else self.sample_weight[rows]

    def _logits(self, xb, theta, b):
        """The block's ``z = xb Theta^T + b`` as ``(C-contiguous array, transposed)`` for the row kernels:
        ``(n, K)``, or ``(K, n)`` when ``transposed`` (see :meth:`_x_theta_t`)."""
        if sp.issparse(xb):
            # X as the CSC view of the cached X^T (CSR): the product then reads Theta^T's rows in order
            # and scatters into the (N, K) result, which is smaller than Theta^T and stays in cache --
            # 19.6 vs 27-33 ms at 20000 x 100000, 0.1% density, K = 20 (CSR reads Theta^T's rows at random)
            z = np.ascontiguousarray(self._x_transposed().T @ theta.T)
        else:
            z = self._x_theta_t(xb, theta)
        if b is not None:
            z += b
        transposed = not z.flags.c_contiguous
        return (z.T if transposed else z), transposed

    #: bytes of dense X per row block (a few times the L2 cache: the second product reads it from cache)
    BLOCK_BYTES = 4 << 20
    #: at least this many blocks when X is large, so that a thread on a busy core takes fewer of them
    #: instead of holding the others up; fixed (not a function of ``n_jobs``) so the sums' order is too
    MIN_BLOCKS = 16
    #: ... but no block under this many bytes, where Python's per-block cost would show
    MIN_BLOCK_BYTES = 256 << 10

    def row_blocks(self) -> list:
        """The dense row blocks of one evaluation, as slices: about ``BLOCK_BYTES`` of ``X`` each, and at
        least ``MIN_BLOCKS`` of them where blocks of ``MIN_BLOCK_BYTES`` allow it."""
        N = self.X.shape[0]
        row_bytes = max(1, self.n_features * self.X.dtype.itemsize)
        rows = max(64, self.BLOCK_BYTES // row_bytes)
        rows = min(rows, max(64, self.MIN_BLOCK_BYTES // row_bytes, -(-N // self.MIN_BLOCKS)))
        return [slice(start, min(start + rows, N)) for start in range(0, N, rows)]

    def _threads(self, n_blocks: int):
        """``with obj._threads(len(blocks)) as n: ...``: the blocks' thread count, BLAS at one thread
        meanwhile when there is a pool (one block, e.g. a minibatch, runs inline with BLAS as it is)."""
        n = min(effective_n_jobs(self.n_jobs), n_blocks)
        return _holding(n, blas_single_thread() if n > 1 else contextlib.nullcontext())

    def _x_transposed(self):
        """Sparse ``X^T`` as its own CSR matrix, made on first use and kept (one copy of ``X``)."""
        if self._xt_csr is None:
            self._xt_csr = self.X.T.tocsr()
        return self._xt_csr

    def _x_squared_transposed(self):
        """Sparse ``(X * X)^T`` in CSR, made on first use and kept: ``X^T``'s index arrays with the data
        squared (one more array of ``nnz`` values, not another copy of the structure).  Newton-CG asks
        for the Hessian diagonal at every iteration; squaring ``X`` each time cost 54 against 14 ms."""
        if self._xt_sq_csr is None:
            xt = self._x_transposed()
            self._xt_sq_csr = sp.csr_matrix((xt.data * xt.data, xt.indices, xt.indptr), shape=xt.shape)
        return self._xt_sq_csr

    def data_hessp_sum(self, w, v, proba=None) -> np.ndarray:
        """``sum_i J_i^T s_i (diag(h_i) - h_i h_i^T) J_i v``: the unnormalised data Hessian times ``v``.

        Per row block: the direction's logits ``V_z = x V_Theta^T + v_b`` (one product), the row kernel
        :func:`softxent._kernels.softmax_jvp_rows` over them, and ``R^T x`` (one product).  ``proba``
        (``h`` at ``w``, ``(N, K)`` C-ordered) spares each block a product ``x Theta^T``.  A float32 ``v``
        gets a float32 product (Newton-CG's CG on float32 data works in float32), anything else float64.
        """
        X, K = self.X, self.n_classes
        out_dtype = np.float32 if v.dtype == np.float32 else np.float64
        theta_v, b_v = self.unpack(v)
        theta_v = np.ascontiguousarray(theta_v, dtype=self.dtype)
        b_v = None if b_v is None else b_v.astype(self.dtype)
        if proba is not None:  # the row kernels read it C-ordered (a Dask block's may come F-ordered)
            proba = np.ascontiguousarray(proba, dtype=self.dtype)
        else:
            theta, b = self.unpack(w)
            theta = np.ascontiguousarray(theta, dtype=self.dtype)
            b = None if b is None else b.astype(self.dtype)

        def proba_of(xb, rows):
            if proba is not None:
                return proba[rows]
            zc, transposed = self._logits(xb, theta, b)
            p = np.empty((xb.shape[0], K), dtype=self.dtype)
            _kernels.softmax_rows(zc, transposed, p)
            return p

        if sp.issparse(X):
            all_rows = slice(0, X.shape[0])
            vc, transposed = self._logits(X, theta_v, b_v)
            gb = np.zeros(K)
            _kernels.softmax_jvp_rows(proba_of(X, all_rows), vc, transposed, self.sample_weight, gb)
            return self.pack((self._x_transposed() @ _rows(vc, transposed)).T,
                             gb if self.fit_intercept else None, out_dtype)

        def block(rows):
            xb = X[rows]
            vc, transposed = self._logits(xb, theta_v, b_v)
            gb = np.zeros(K)
            _kernels.softmax_jvp_rows(proba_of(xb, rows), vc, transposed, self._weights(rows), gb)
            return self._dz_t_x(_rows(vc, transposed), xb), gb

        g_theta = np.zeros((K, self.n_features))
        g_b = np.zeros(K)
        blocks = self.row_blocks()
        with self._threads(len(blocks)) as n_jobs:
            for gt, gb in ordered_map(block, blocks, n_jobs):
                g_theta += gt
                g_b += gb
        return self.pack(g_theta, g_b if self.fit_intercept else None, out_dtype)

    # ---------------------------------------------------------------- the objective
    def finish(self, loss_sum: float, grad_sum, w, weight_sum: float | None = None):
        """Normalise summed data terms by ``S`` and add the smooth (L2) part of the penalty.

        Returns ``(E_smooth, gradient)`` (gradient None if ``grad_sum`` is None).  The L1 part is not
        added here: it is non-smooth and solvers treat it with :meth:`prox_l1` (see :meth:`objective`).
        """
        S = self.weight_sum if weight_sum is None else float(weight_sum)
        inv = 1.0 / S if S > 0 else 0.0
        theta = w[: self.n_classes * self.n_features]
        l2 = self.alpha * (1.0 - self.l1_ratio)
        value = loss_sum * inv + 0.5 * l2 * float(theta @ theta)
        if grad_sum is None:
            return value, None
        g = grad_sum * inv
        if l2:
            g[: theta.size] += l2 * theta
        return value, g

    def loss_gradient(self, w, keep_proba: bool = False):
        """``(E_smooth(w), grad E_smooth(w))``: the data term over ``S`` plus the L2 penalty.

        ``keep_proba``: Hessian products at ``w`` will follow (see :meth:`data_sums`)."""
        loss_sum, grad_sum = self.data_sums(w, keep_proba=keep_proba)
        return self.finish(loss_sum, grad_sum, w)

    def loss(self, w) -> float:
        """``E_smooth(w)`` without the gradient."""
        return self.finish(self.data_sums(w, need_grad=False)[0], None, w)[0]

    def _remember_proba(self, w, proba: np.ndarray) -> np.ndarray:
        """Keep ``h(z)`` at (a copy of) ``w`` for the Hessian products that follow at that point."""
        self._hess_cache = (np.array(w, copy=True), proba)
        return proba

    def _proba_at(self, w) -> np.ndarray:
        """``h(z)`` at ``w``, cached: a Newton iteration asks for many products at the same point."""
        cache = self._hess_cache
        if cache is None or cache[0].shape != w.shape or not np.array_equal(cache[0], w):
            return self._remember_proba(w, np.ascontiguousarray(softmax(self.decision_function(w))))
        return cache[1]

    def data_hessian_diag_sum(self, w, proba=None) -> np.ndarray:
        """The diagonal of the unnormalised data Hessian, ``sum_i s_i h_ik (1 - h_ik) x_ij^2`` (and
        ``sum_i s_i h_ik (1 - h_ik)`` for ``b_k``): a Jacobi preconditioner for Newton-CG."""
        p = softmax(self.decision_function(w)) if proba is None else proba
        a = p * (1 - p)
        if self.sample_weight is not None:
            a *= self.sample_weight[:, None]
        X = self.X
        if sp.issparse(X):
            d_theta = (self._x_squared_transposed() @ a).T
        else:  # row blocks keep the squared copy of X small
            d_theta = np.zeros((self.n_classes, self.n_features), dtype=np.float64)
            step = max(1, (1 << 22) // max(1, self.n_features))
            for start in range(0, X.shape[0], step):
                xb = X[start:start + step]
                d_theta += (a[start:start + step].T @ (xb * xb)).astype(np.float64)
        return self.pack(d_theta, a.sum(axis=0, dtype=np.float64) if self.fit_intercept else None)

    def hessian_diag(self, w) -> np.ndarray:
        """Diagonal of the Hessian of ``E_smooth`` at ``w`` (uses the cached probabilities)."""
        S = self.weight_sum
        d = self.data_hessian_diag_sum(w, proba=self._proba_at(w)) * (1.0 / S if S > 0 else 0.0)
        l2 = self.alpha * (1.0 - self.l1_ratio)
        d[: self.n_classes * self.n_features] += l2
        return d

    #: Newton-CG's Gram preconditioner: at most this many coefficients per class (D, +1 with the
    #: intercept) -- its eigendecomposition costs ~D^3 once -- and at most this many rows, strided.
    GRAM_MAX_FEATURES = 4096
    GRAM_MAX_ROWS = 8192

    def data_gram_sum(self, max_rows: int | None = None):
        """``(sum_i s_i xt_i xt_i^T, sum_i s_i)`` over every ``ceil(N / max_rows)``-th row (all rows when
        ``max_rows`` is None), with ``xt_i = [x_i, 1]`` when fitting an intercept: float64, ``(Dt, Dt)``.

        Unnormalised, so that row blocks can add theirs (softxent.dask).  Used only to precondition
        Newton-CG, so a strided subsample is enough: the Gram of ``GRAM_MAX_ROWS`` rows costs ~0.1 s
        where all 60000 x 784 cost 0.8 s.  Returns None for sparse ``X`` or more than
        ``GRAM_MAX_FEATURES`` columns (Newton-CG then keeps the diagonal preconditioner).
        """
        X = self.X
        Dt = self.n_features + int(self.fit_intercept)
        if sp.issparse(X) or Dt > self.GRAM_MAX_FEATURES:
            return None
        N = X.shape[0]
        stride = 1 if max_rows is None or N <= max_rows else -(-N // max_rows)
        rows = np.arange(0, N, stride)
        s = None if self.sample_weight is None else self.sample_weight[rows].astype(np.float64)
        gram = np.zeros((Dt, Dt))
        D = self.n_features
        for start in range(0, len(rows), 2048):
            idx = rows[start:start + 2048]
            xb = np.asarray(X[idx] if stride > 1 else X[idx[0]:idx[-1] + 1], dtype=np.float64)
            sb = None if s is None else s[start:start + 2048]
            xs = xb if sb is None else xb * sb[:, None]
            gram[:D, :D] += xs.T @ xb
            if self.fit_intercept:
                col = xs.sum(axis=0)
                gram[:D, D] += col
                gram[D, :D] += col
                gram[D, D] += len(idx) if sb is None else float(sb.sum())
        weight = float(len(rows)) if s is None else float(np.sum(s))
        return gram, weight

    def hessp(self, w, v) -> np.ndarray:
        """``H v`` of ``E_smooth`` at ``w`` (the softmax probabilities at ``w`` are cached between calls);
        float32 for a float32 ``v`` (see :meth:`data_hessp_sum`), float64 otherwise."""
        S = self.weight_sum
        hv = self.data_hessp_sum(w, v, proba=self._proba_at(w))
        hv *= 1.0 / S if S > 0 else 0.0
        l2 = self.alpha * (1.0 - self.l1_ratio)
        if l2:
            k = self.n_classes * self.n_features
            _axpy(l2, v[:k], hv[:k])
        return hv

    def max_squared_row_norm(self) -> float:
        """``max_i ||x_i||^2`` over the rows with ``s_i > 0`` (a row of weight zero is no part of ``E``), in
        float64 whatever the dtype of ``X``.  Computed once per objective (a pass over X): the estimator's
        scale check and the solvers' first steps (:meth:`lipschitz_bound`) share it."""
        cached = self.__dict__.get("_max_squared_row_norm")
        if cached is not None:
            return cached
        X = self.X
        if sp.issparse(X):  # row sums of X*X: column sums of the cached squared X^T
            sq = np.asarray(self._x_squared_transposed().sum(axis=0)).ravel()
        else:
            sq = np.einsum("ij,ij->i", X, X, dtype=np.float64)
        if self.sample_weight is not None:
            sq = sq[self.sample_weight > 0]
        self._max_squared_row_norm = float(np.max(sq, initial=0.0))
        return self._max_squared_row_norm

    def lipschitz_bound(self) -> float:
        """A bound on the Lipschitz constant of a single row's gradient, for first step sizes.

        The softmax Hessian has eigenvalues <= 1/2, so ``L <= 1/2 max_i (||x_i||^2 + 1) + alpha``, the max
        over the rows with ``s_i > 0`` (:meth:`max_squared_row_norm`: the bound is then the same for weighted
        rows as for the same rows repeated).
        """
        return 0.5 * (self.max_squared_row_norm() + 1.0) + self.alpha

    def l1_penalty(self, w) -> float:
        """``alpha rho ||Theta||_1`` (the intercept is not penalised)."""
        if not (self.alpha and self.l1_ratio):
            return 0.0
        return self.alpha * self.l1_ratio * float(np.abs(w[: self.n_classes * self.n_features]).sum())

    def prox_l1(self, w, step) -> np.ndarray:
        """Proximal map of ``step * alpha rho ||Theta||_1``: soft-thresholding, which makes exact zeros.

        ``step``: a scalar, or one step per coordinate of ``w`` (a diagonally scaled step such as Adam's,
        whose prox thresholds coordinate ``j`` at ``step_j alpha rho``)."""
        k = self.n_classes * self.n_features
        t = np.asarray(step, dtype=np.float64) * (self.alpha * self.l1_ratio)
        t = t[:k] if t.ndim else t
        out = w.copy()
        if np.any(t > 0):
            out[:k] = np.sign(w[:k]) * np.maximum(np.abs(w[:k]) - t, 0.0)
        return out

    def objective(self, w) -> float:
        """The full objective ``E(w)``, L1 part included."""
        return self.loss(w) + self.l1_penalty(w)

    def subset(self, rows, weight_sum: float | None = None) -> "LinearSoftmaxObjective":
        """The same objective on a subset of rows: a minibatch, or a validation split.

        ``weight_sum`` sets the normaliser (default: the subset's own total weight).  A minibatch passes
        ``S * |B| / N`` so that its gradient is an unbiased estimate of the full gradient, and a batch that
        happens to hold only low-weight rows takes a correspondingly small step.
        """
        return LinearSoftmaxObjective(
            self.X[rows], self.y[rows], self.n_classes,
            None if self.sample_weight is None else self.sample_weight[rows],
            alpha=self.alpha, l1_ratio=self.l1_ratio, fit_intercept=self.fit_intercept,
            weight_sum=weight_sum, n_jobs=self.n_jobs,
        )

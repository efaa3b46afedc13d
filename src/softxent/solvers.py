"""Solvers for softmax regression.  Every solver minimises the same objective object
(:class:`softxent.objective.LinearSoftmaxObjective`, or anything with its interface, e.g. the Dask one):

==============  ==================================================================================
solver          when to use it
==============  ==================================================================================
``lbfgs``       the default for L2: quasi-Newton (scipy's L-BFGS-B); one objective+gradient per step.
``newton-cg``   trust-region Newton with the exact Hessian-vector product and CG preconditioned by the
                features' Gram (dense X) or the Hessian's diagonal: ill-conditioned, unscaled or
                correlated features, where L-BFGS needs many iterations.
``gd``          the seed's plain full-batch gradient descent, with Armijo backtracking or a fixed
                ``learning_rate``: for teaching and as a baseline; slow on ill-conditioned data.
``proximal``    accelerated proximal gradient (FISTA with backtracking and adaptive restart) for L1 /
                elastic net (``l1_ratio > 0``): soft-thresholding gives exact zeros in ``coef_``.
``sgd``         shuffled minibatches, proximal steps for L1.  ``fit``: SVRG with heavy-ball momentum
                (:func:`svrg_epochs`), which reaches the optimum like the full-batch solvers, each epoch
                costing about three passes over the data.  ``partial_fit``: plain steps
                ``lr0 / sqrt(1 + epoch)`` (:func:`minibatch_epochs`) on streaming data.
``adam``        the same with Adam's per-coordinate steps: features of very different scales.  Not
                rotation invariant, so slower than sgd on correlated or collinear features.
==============  ==================================================================================

Convergence is judged by one criterion for every solver (:func:`converged`): full-batch solvers, and sgd /
adam in ``fit``, have converged when the gradient (with L1: the gradient mapping) is at most ``tol`` in
max-norm, or when they stalled at the objective's rounding (no step changes it by more than a few ulps:
L-BFGS-B's ``ftol`` stop or failed line search, a collapsed trust region, ``MAX_BACKTRACKS`` halvings of
gd's step without a decrease),
where no solver can do better in the data's precision; a solver that used up ``max_iter`` before either has
not.  The plain minibatch epochs of ``partial_fit`` stop when the epoch loss has not improved by ``tol`` for
``n_iter_no_change`` epochs.  Each reports every iteration to a
:class:`Monitor`, which keeps the last completed iterate (an interrupted fit keeps it) and the curve.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg.blas import get_blas_funcs
from scipy.optimize import minimize

__all__ = ["IterationInfo", "Monitor", "SolverResult", "SOLVERS", "converged", "FULL_BATCH_SOLVERS",
           "MINIBATCH_SOLVERS", "NonFiniteObjectiveError", "run_solver", "minibatch_epochs", "svrg_epochs"]

FULL_BATCH_SOLVERS = ("lbfgs", "newton-cg", "gd", "proximal")
MINIBATCH_SOLVERS = ("sgd", "adam")
SOLVERS = FULL_BATCH_SOLVERS + MINIBATCH_SOLVERS


@dataclass
class IterationInfo:
    """What a solver reports after each iteration (epoch for the minibatch solvers)."""

    iteration: int
    max_iter: int
    objective: float
    grad_norm: float
    elapsed: float
    w: np.ndarray = field(repr=False)


class Monitor:
    """Collects the objective curve, keeps the last completed iterate, calls the user's callback.

    ``callback(info)`` receives an :class:`IterationInfo` (plus whatever ``decorate`` adds, e.g. the
    estimator's ``coef``/``intercept`` views); returning True stops the solver.
    """

    def __init__(self, max_iter: int, callback=None, decorate=None):
        self.max_iter = max_iter
        self.callback = callback
        self.decorate = decorate
        self.curve: list[float] = []
        self.last_w = None
        self.last_grad_norm = math.nan  # the optimality measure at the last iterate (for the warnings)
        self.t0 = time.perf_counter()

    def step(self, w, objective: float, grad_norm: float) -> bool:
        self.last_w = np.array(w, dtype=np.float64, copy=True)
        self.last_grad_norm = float(grad_norm)
        self.curve.append(float(objective))
        if self.callback is None:
            return False
        info = IterationInfo(len(self.curve), self.max_iter, float(objective), float(grad_norm),
                             time.perf_counter() - self.t0, self.last_w)
        if self.decorate is not None:
            self.decorate(info)
        return bool(self.callback(info))


@dataclass
class SolverResult:
    w: np.ndarray
    n_iter: int
    converged: bool
    message: str = ""


def _rounding(obj, f: float) -> float:
    """How much an objective value near ``f`` can be off by rounding: a few ulps of the data's dtype
    (float32 data computes its logits and losses in float32)."""
    return 8 * float(np.finfo(getattr(obj, "dtype", np.float64)).eps) * abs(f)


def converged(optimality: float, tol: float, *, stalled: bool = False) -> bool:
    """The convergence criterion of every solver: the max-norm of the gradient (with L1: of the gradient
    mapping) is at most ``tol``, or the solver ``stalled`` at the objective's rounding."""
    return bool(stalled or optimality <= tol)


def _inf_norm(g) -> float:
    return float(np.max(np.abs(g), initial=0.0))


#: Backtracking line searches give up after this many halvings (doublings of L): from a step that a
#: bound of the Lipschitz constant makes safe, 2**-200 is far below any step a finite objective needs.
MAX_BACKTRACKS = 200


class NonFiniteObjectiveError(ValueError):
    """The objective or its gradient became infinite or NaN during a fit: the data's scale overflows the
    floating-point range of its dtype (a ValueError, so that callers treat it as bad input)."""

    def __init__(self, solver: str, value, where: str):
        super().__init__(
            f"solver {solver!r}: {where} gave a non-finite value ({value}); the data's scale overflows the "
            "floating-point range (features or sample weights too large). Scale the features (e.g. "
            "sklearn.preprocessing.StandardScaler) and keep sample weights within a sane range")


def _check_finite(f: float, g, solver: str) -> None:
    """Raise :class:`NonFiniteObjectiveError` unless ``f`` and the gradient ``g`` are finite."""
    if not math.isfinite(f):
        raise NonFiniteObjectiveError(solver, f, "the objective")
    if not np.all(np.isfinite(g)):
        raise NonFiniteObjectiveError(solver, "a gradient entry of " + str(g[~np.isfinite(g)][0]), "the gradient")


# ------------------------------------------------------------------------------------------- lbfgs
def _lbfgs(obj, w0, *, max_iter, tol, monitor, **_):
    last = {}

    def fun(w):
        f, g = obj.loss_gradient(w)
        if "g" not in last:  # at w0; later non-finite trial points only make scipy's line search back off
            _check_finite(f, g, "lbfgs")
        last["w"], last["g"] = w.copy(), g
        return f, g

    def cb(intermediate_result):
        x = intermediate_result.x
        g = last["g"] if np.array_equal(last.get("w"), x) else obj.loss_gradient(x)[1]
        if monitor.step(x, intermediate_result.fun, _inf_norm(g)):
            raise StopIteration

    res = minimize(fun, w0, jac=True, method="L-BFGS-B", callback=cb,
                   options={"maxiter": max_iter, "maxfun": max(15000, 2 * max_iter), "gtol": tol,
                            "ftol": 64 * np.finfo(float).eps, "maxls": 50})
    g_norm = _inf_norm(last["g"]) if "g" in last else np.inf
    # status 0: the projected gradient's max-norm <= gtol = tol, or the relative decrease <= ftol = 64 eps
    # (stalled at rounding); 2: no line-search step decreases f (stalled); 99: stopped by the callback;
    # 1: max_iter used up.
    ok = res.status == 99 or converged(g_norm, tol, stalled=res.status in (0, 2))
    return SolverResult(res.x, int(res.nit), ok, str(res.message))


# --------------------------------------------------------------------------------------- newton-cg
class _DiagonalPreconditioner:
    """``M = diag(m)``: Jacobi, from the Hessian's diagonal."""

    def __init__(self, m):
        self.m = m

    def solve(self, r):
        return r / self.m

    def apply(self, p):
        return self.m * p


class _GramPreconditioner:
    """``M = blockdiag_k (c_k Gt + l2 I)``: the Hessian with each row's softmax curvature replaced by its
    class average and the cross-class blocks dropped.

    The data Hessian's ``(k, k)`` block is ``sum_i (s_i/S) a_ik xt_i xt_i^T`` with ``a_ik = h_ik (1 - h_ik)``
    (``xt_i = [x_i, 1]``); with ``a_ik`` replaced by ``c_k`` it is ``c_k Gt``, ``Gt`` the weighted Gram of
    ``xt``.  ``Gt = U diag(lam) U^T`` is factored once per fit, so ``M^-1`` costs two ``(K, Dt) x (Dt, Dt)``
    products.  Unlike the diagonal it sees correlated and collinear features: on the 60000 x 784 set
    (make_classification, which adds exactly collinear "redundant" features) Newton-CG reached 1e-6 of
    the optimum in 27 Hessian products instead of 154.  ``c_k`` comes from the Hessian diagonal ``m``:
    ``c_k = (sum_j m_kj - l2 D) / trace(Gt)``, the ``xt``-norm-weighted mean of ``a_ik``.
    """

    def __init__(self, eig, m, l2: float, n_classes: int, n_features: int, fit_intercept: bool):
        lam, U, trace = eig
        K, D = n_classes, n_features
        self.K, self.D, self.fit_intercept, self.U = K, D, fit_intercept, U
        data_diag = m[: K * D].reshape(K, D).sum(axis=1) - l2 * D
        if fit_intercept:
            data_diag = data_diag + m[K * D:]
        c = np.maximum(data_diag / trace, 1e-12)
        # the intercept is not penalised; a floor keeps M positive definite along an all-zero column
        self.den = np.maximum(c[:, None] * lam[None, :] + l2, 1e-12 * max(1.0, float(c.max() * lam.max())))

    def _as_matrix(self, v):
        K, D = self.K, self.D
        theta = v[: K * D].reshape(K, D)
        return np.concatenate([theta, v[K * D:, None]], axis=1) if self.fit_intercept else theta

    def _as_vector(self, M):
        D = self.D
        return np.concatenate([M[:, :D].ravel(), M[:, D]]) if self.fit_intercept else M.ravel()

    def solve(self, r):
        return self._as_vector(((self._as_matrix(r) @ self.U) / self.den) @ self.U.T)

    def apply(self, p):
        return self._as_vector(((self._as_matrix(p) @ self.U) * self.den) @ self.U.T)


def _gram_eig(obj):
    """``(lam, U, trace)`` of ``Gt`` (see :class:`_GramPreconditioner`), or None when the objective has
    no Gram to offer (sparse or very wide ``X``)."""
    gram_sum = getattr(obj, "data_gram_sum", None)
    out = None if gram_sum is None else gram_sum(getattr(obj, "GRAM_MAX_ROWS", None))
    if out is None or out[1] <= 0:
        return None
    gram = out[0] / out[1]
    if not np.all(np.isfinite(gram)):  # features so large that their products overflow: no Gram
        return None
    lam, U = np.linalg.eigh(gram)
    return np.maximum(lam, 0.0), U, float(np.trace(gram))


def _steihaug_cg(hessp, g, precond, radius, tol, max_cg):
    """Approximately minimise ``q(p) = g.p + 1/2 p.Hp`` subject to ``||p||_M <= radius`` (Steihaug-Toint
    CG, preconditioned by ``M``: ``precond.solve`` applies ``M^-1``, ``precond.apply`` ``M``).

    Returns ``(p, r, on_boundary)`` with ``r = g + H p`` the model's gradient at ``p`` (so that
    ``q(p) = (g.p + r.p) / 2`` needs no ``H p`` of its own).  Every vector has ``g``'s dtype (float32 on
    float32 data: the CG's own traffic halves, and an inexact Newton step needs no more) and is updated
    in place (BLAS ``axpy``, scaling): at 20 classes x 100000 features each is 16 MB, and a fresh array
    per operation made the CG's own arithmetic cost as much as its Hessian products.  ``M p`` is kept
    alongside ``p`` for the trust-region norm, and ``||p + s d||_M^2`` is expanded instead of formed.
    """
    work = g.dtype
    n = g.shape[0]
    p = np.zeros(n, dtype=work)
    mp = np.zeros(n, dtype=work)  # M p
    r = g.copy()
    axpy = get_blas_funcs("axpy", (p,))  # in place only while x and y share p's dtype
    y = precond.solve(r).astype(work, copy=False)
    d = -y
    md = -r  # M d = -M M^-1 r
    ry = float(r @ y)
    p_mp = 0.0  # ||p||_M^2
    radius2 = radius * radius
    for _ in range(max_cg):
        hd = np.asarray(hessp(d), dtype=work)
        dhd = float(d @ hd)
        d_mp, d_md = float(d @ mp), float(d @ md)  # M symmetric: p.(M d) = d.(M p)
        if not math.isfinite(dhd):
            raise NonFiniteObjectiveError("newton-cg", dhd, "a Hessian-vector product")
        if dhd > 0:
            step = ry / dhd
            p_mp_next = p_mp + 2.0 * step * d_mp + step * step * d_md
        if dhd <= 0 or p_mp_next >= radius2:
            if not d_md > 0:  # d has no length in the M-norm (float32 underflow on extreme features)
                return p, r, True
            # tau >= 0 with ||p + tau d||_M = radius
            b, c = 2.0 * d_mp, p_mp - radius2
            tau = (-b + math.sqrt(max(b * b - 4.0 * d_md * c, 0.0))) / (2.0 * d_md)
            axpy(d, p, a=tau)
            axpy(hd, r, a=tau)
            return p, r, True
        axpy(d, p, a=step)
        axpy(md, mp, a=step)
        axpy(hd, r, a=step)
        p_mp = p_mp_next
        if float(np.linalg.norm(r)) <= tol:
            break
        y = precond.solve(r).astype(work, copy=False)
        ry_next = float(r @ y)
        beta = ry_next / ry
        d *= beta
        d -= y
        md *= beta  # M d = -M y + beta M d_old, and M y = r
        md -= r
        ry = ry_next
    return p, r, False


def _newton_cg(obj, w0, *, max_iter, tol, monitor, **_):
    """Trust-region Newton with the exact Hessian-vector product and a preconditioned Steihaug CG.

    Preconditioner: :class:`_GramPreconditioner` when the objective offers its features' Gram (dense
    ``X`` of at most ``GRAM_MAX_FEATURES`` columns), else the Hessian's diagonal.  The trust region is
    measured in the preconditioner's norm ``||p||_M = sqrt(p.(M p))``, which makes the method insensitive
    to the scale of the features (unscaled pixels, counts).  Inner CG stops at
    ``min(0.5, sqrt(||g||)) ||g||`` (superlinear convergence); the radius follows the usual ratio test.
    On float32 data the CG runs in float32 (as the data's own products do); the iterate, gradient and
    objective stay float64.
    """
    work = np.float32 if np.dtype(getattr(obj, "dtype", np.float64)) == np.float32 else np.float64
    w = w0.copy()
    f, g = obj.loss_gradient(w, keep_proba=True)
    _check_finite(f, g, "newton-cg")
    radius = None
    eig = None
    for it in range(1, max_iter + 1):
        if _inf_norm(g) <= tol:
            return SolverResult(w, it - 1, True)
        if it == 1:
            eig = _gram_eig(obj)  # after the first gradient test: a fit that starts converged skips it
        m = np.maximum(obj.hessian_diag(w), 1e-12)
        precond = (_DiagonalPreconditioner(m.astype(work)) if eig is None else
                   _GramPreconditioner(eig, m, obj.alpha * (1.0 - obj.l1_ratio), obj.n_classes, obj.n_features,
                                       obj.fit_intercept))
        gnorm = float(np.linalg.norm(g))
        if radius is None:
            radius = max(1.0, math.sqrt(float(g @ precond.solve(g))))
        # Forcing term sqrt(|g|) gives superlinear convergence; solving past half the final tolerance
        # (the next gradient is about the CG residual) would only polish digits nobody asked for.
        cg_tol = max(min(0.5, math.sqrt(gnorm)) * gnorm, 0.5 * tol)
        g_work = g.astype(work, copy=False)
        p, r, boundary = _steihaug_cg(lambda v: obj.hessp(w, v), g_work, precond, radius, cg_tol,
                                      max_cg=max(10, min(obj.n_coef, 500)))
        predicted = -0.5 * (float(g_work @ p) + float(r @ p))  # -q(p), with r = g + H p
        w_new = w + p
        f_new, g_new = obj.loss_gradient(w_new, keep_proba=True)  # h(z) kept for the next Hessian
        actual = f - f_new
        rho = actual / predicted if predicted > 0 else -1.0
        p_norm = math.sqrt(max(float(p @ precond.apply(p)), 0.0))
        if rho < 0.25:
            radius = 0.25 * p_norm
        elif rho > 0.75 and boundary:
            radius = 2.0 * radius
        # accept descent steps; near the optimum both reductions fall to rounding level, accept those too
        noise = _rounding(obj, f)
        if rho > 1e-4 or (predicted <= noise and f_new <= f + noise):
            _check_finite(f_new, g_new, "newton-cg")
            w, f, g = w_new, f_new, g_new
        if monitor.step(w, f, _inf_norm(g)):
            return SolverResult(w, it, True, "stopped by callback")
        if radius < 1e-14:
            return SolverResult(w, it, converged(_inf_norm(g), tol, stalled=True), "trust region collapsed")
    return SolverResult(w, max_iter, converged(_inf_norm(g), tol))


# ---------------------------------------------------------------------------------------------- gd
def _lipschitz_guess(obj) -> float:
    """The objective's bound on its gradient's Lipschitz constant, used for the first step."""
    return obj.lipschitz_bound()


def _gd(obj, w0, *, max_iter, tol, monitor, learning_rate=None, **_):
    w = w0.copy()
    f, g = obj.loss_gradient(w)
    _check_finite(f, g, "gd")
    fixed = learning_rate is not None
    step = float(learning_rate) if fixed else 1.0 / _lipschitz_guess(obj)
    for it in range(1, max_iter + 1):
        if converged(_inf_norm(g), tol):
            return SolverResult(w, it - 1, True)
        if fixed:
            w = w - step * g
            f, g = obj.loss_gradient(w)
        else:  # Armijo backtracking: f(w - t g) <= f(w) - t/2 ||g||^2, trying a longer step first
            gg = float(g @ g)
            # Near the optimum the promised decrease falls below the rounding of f: there the search
            # allows that much slack and keeps the last accepted step instead of growing it, or it would
            # either shrink the step to nothing or accept ever longer steps that are not descent steps.
            slack = _rounding(obj, f)
            if 0.5 * step * gg > 100 * slack:
                step *= 1.5
            # A bounded number of halvings, each measured against the first step 1/L, not an absolute
            # floor: on features of 1e150 every step is below 1e-20, and that floor accepted ascent steps.
            for _ in range(MAX_BACKTRACKS):
                w_new = w - step * g
                f_new, g_new = obj.loss_gradient(w_new)
                if f_new <= f - 0.5 * step * gg + slack:
                    break
                step *= 0.5
            else:  # no step decreases f beyond its rounding: stalled at w, the last accepted iterate
                return SolverResult(w, it - 1, converged(_inf_norm(g), tol, stalled=True),
                                    "stalled: the line search found no descent step")
            w, f, g = w_new, f_new, g_new
        if not np.isfinite(f):
            raise FloatingPointError(
                f"gradient descent diverged (objective {f}) with learning_rate={step}; use a smaller "
                "learning_rate or learning_rate=None (backtracking)")
        if monitor.step(w, f, _inf_norm(g)):
            return SolverResult(w, it, True, "stopped by callback")
    return SolverResult(w, max_iter, converged(_inf_norm(g), tol))


# ---------------------------------------------------------------------------------------- proximal
def _proximal(obj, w0, *, max_iter, tol, monitor, **_):
    """FISTA with backtracking on the smooth part and function-value restart (O'Donoghue & Candes)."""
    x = obj.prox_l1(w0, 0.0)
    y, t = x.copy(), 1.0
    L = _lipschitz_guess(obj) * 0.1
    F_x = obj.loss(x) + obj.l1_penalty(x)
    f_y, g_y = obj.loss_gradient(y)
    _check_finite(F_x, g_y, "proximal")
    for it in range(1, max_iter + 1):
        for _ in range(MAX_BACKTRACKS):
            x_new = obj.prox_l1(y - g_y / L, 1.0 / L)
            d = x_new - y
            f_new = obj.loss(x_new)
            if f_new <= f_y + float(g_y @ d) + 0.5 * L * float(d @ d) * (1 + 1e-12) + 1e-15 * abs(f_y):
                break
            L *= 2.0
        else:  # L grew by 2**MAX_BACKTRACKS past a bound of the Lipschitz constant: f is not finite there
            raise NonFiniteObjectiveError("proximal", f_new, "the backtracking line search")
        grad_map = _inf_norm(d) * L     # the composite gradient mapping at y
        F_new = f_new + obj.l1_penalty(x_new)
        if F_new > F_x and t > 1.0:      # momentum overshot: restart from x with a plain prox step
            t, y = 1.0, x.copy()         # (at t = 1 the step is a descent step up to rounding: take it)
            f_y, g_y = obj.loss_gradient(y)
            continue
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        y = x_new + ((t - 1.0) / t_new) * (x_new - x)
        x, F_x, t = x_new, F_new, t_new
        if monitor.step(x, F_x, grad_map):
            return SolverResult(x, it, True, "stopped by callback")
        if converged(grad_map, tol):
            return SolverResult(x, it, True)
        f_y, g_y = obj.loss_gradient(y)
        _check_finite(f_y, g_y, "proximal")
        L *= 0.9                          # let the step grow again
    return SolverResult(x, max_iter, False)


_FULL_BATCH = {"lbfgs": _lbfgs, "newton-cg": _newton_cg, "gd": _gd, "proximal": _proximal}


def run_solver(name: str, obj, w0, *, max_iter: int, tol: float, monitor: Monitor,
               learning_rate=None) -> SolverResult:
    """Minimise ``obj`` from ``w0`` with the full-batch solver ``name``."""
    return _FULL_BATCH[name](obj, w0, max_iter=max_iter, tol=tol, monitor=monitor,
                             learning_rate=learning_rate)


# ------------------------------------------------------------------------------------- minibatches
@dataclass
class MinibatchState:
    """What persists between epochs, ``partial_fit`` calls and warm-started fits: step counter, Adam
    moments, best loss; for :func:`svrg_epochs` also the adapted ``step`` and whether its scale is found."""

    t: int = 0
    t_m: int = 0  # steps since Adam's first moment m was (re)started from zero: its bias correction
    epoch: int = 0
    m: np.ndarray | None = None
    v: np.ndarray | None = None
    lr0: float | None = None
    best_loss: float = np.inf
    no_improvement: int = 0
    step: float | None = None
    step_scale_found: bool = False


_ADAM_BETA1, _ADAM_BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8


def _start_minibatches(obj, w, state: MinibatchState, method: str, learning_rate):
    """Set the first step ``lr0`` ('auto': ``1 / L`` of a single row for sgd, Adam's ``1e-3``) and zero
    Adam's moments, once per state."""
    if state.lr0 is None:
        if learning_rate is None or learning_rate == "auto":
            state.lr0 = 1.0 / _lipschitz_guess(obj) if method == "sgd" else 1e-3
        else:
            state.lr0 = float(learning_rate)
    if method == "adam" and state.m is None:
        state.m, state.v = np.zeros_like(w), np.zeros_like(w)


def _adam_step(state: MinibatchState, g, lr: float, g_scale=None):
    """Update Adam's first moment with the gradient estimate ``g`` and its second moment with
    ``g_scale`` (default ``g``); returns ``(d, steps)``: the step is ``w - d`` with ``d = steps * mhat``
    and ``steps = lr / (sqrt(vhat) + eps)`` per coordinate, which is also the scale of the L1 prox that
    follows (a diagonally scaled step needs a diagonally scaled prox, or its fixed point is not the
    optimum)."""
    g_scale = g if g_scale is None else g_scale
    state.t += 1
    state.t_m += 1
    state.m = _ADAM_BETA1 * state.m + (1 - _ADAM_BETA1) * g
    state.v = _ADAM_BETA2 * state.v + (1 - _ADAM_BETA2) * g_scale * g_scale
    mhat = state.m / (1 - _ADAM_BETA1 ** state.t_m)
    steps = lr / (np.sqrt(state.v / (1 - _ADAM_BETA2 ** state.t)) + _ADAM_EPS)
    return steps * mhat, steps


def _has_l1(obj) -> bool:
    return bool(obj.l1_ratio and obj.alpha)


def _batch(obj, rows, N):
    """The minibatch objective on ``rows``, normalised by the batch's expected weight ``S |B| / N`` so
    that its gradient is an unbiased estimate of the full gradient."""
    return obj.subset(rows, weight_sum=obj.weight_sum * len(rows) / N)


def minibatch_epochs(obj, w, state: MinibatchState, *, method: str, n_epochs: int, batch_size: int,
                     learning_rate, tol: float | None, n_iter_no_change: int, rng, monitor: Monitor,
                     validation=None):
    """Run up to ``n_epochs`` plain shuffled-minibatch epochs of ``method`` ('sgd' or 'adam') over ``obj``:
    the streaming solver of ``partial_fit`` (and of the Dask fit, which streams row blocks).

    Each minibatch step uses the gradient of the batch's objective normalised by the batch's expected
    weight ``S |B| / N`` (an unbiased estimate of the full gradient) plus the L2 penalty, then the L1
    prox when ``l1_ratio > 0``.  sgd's step is ``lr0 / sqrt(1 + epoch)``.  The steps carry sampling
    noise, so the iterates hover around the optimum at a distance set by the step (use
    :func:`svrg_epochs` when all the data are at hand).  The epoch's objective is the
    mean of the batch objectives (or, with ``validation``, the validation objective, which drives
    early stopping).  Returns ``(w, epochs_run, converged)``.
    """
    N = obj.X.shape[0]
    _start_minibatches(obj, w, state, method, learning_rate)
    bs = max(1, min(int(batch_size), N))
    for e in range(n_epochs):
        order = rng.permutation(N)
        total, weight = 0.0, 0.0
        grad_norm = 0.0
        for start in range(0, N, bs):
            rows = np.sort(order[start:start + bs])
            f, g = _batch(obj, rows, N).loss_gradient(w)
            if method == "sgd":
                lr = state.lr0 / math.sqrt(1.0 + state.epoch)
                w = w - lr * g
            else:
                d, lr = _adam_step(state, g, state.lr0)
                w = w - d
            w = obj.prox_l1(w, lr) if _has_l1(obj) else w
            total += f * len(rows)
            weight += len(rows)
            grad_norm = max(grad_norm, _inf_norm(g))
        if not np.all(np.isfinite(w)):
            raise FloatingPointError(
                f"{method} diverged with learning_rate={state.lr0}; use a smaller learning_rate or "
                "scale the features (e.g. StandardScaler)")
        state.epoch += 1
        epoch_loss = total / weight if weight else 0.0
        score = validation.objective(w) if validation is not None else epoch_loss
        stop = monitor.step(w, score, grad_norm)
        if tol is not None and _no_improvement(state, score, tol, n_iter_no_change):
            return w, e + 1, True
        if stop:
            return w, e + 1, True
    return w, n_epochs, False


def _no_improvement(state: MinibatchState, score: float, tol: float, n_iter_no_change: int) -> bool:
    """Count the epochs whose ``score`` has not improved on the best by ``tol``; True after
    ``n_iter_no_change`` of them in a row."""
    if score > state.best_loss - tol:
        state.no_improvement += 1
    else:
        state.no_improvement = 0
    state.best_loss = min(state.best_loss, score)
    return state.no_improvement >= n_iter_no_change


#: sgd in fit: Polyak's heavy-ball momentum on the variance-reduced gradient.  On digits and a
#: 10-class make_classification set it cut the epochs to 1e-6 of the optimum 2-3x (velocity 0 -> 0.9).
SVRG_MOMENTUM = 0.9
#: The epoch-level step control of :func:`svrg_epochs`: an accepted epoch multiplies the step by
#: ``STEP_RAMP`` until the first rejected epoch (that finds the scale of the largest stable step in a few
#: epochs from the safe ``1 / L`` of a single row), then by ``STEP_GROW``; a rejected epoch by ``STEP_SHRINK``.
STEP_RAMP, STEP_GROW, STEP_SHRINK = 2.0, 1.1, 0.5


def _optimality(obj, w, g, step: float) -> float:
    """Max-norm of the gradient mapping ``(w - prox(w - step g, step)) / step``: the gradient itself
    without L1 (the stopping test of the full-batch solvers)."""
    if not _has_l1(obj):
        return _inf_norm(g)
    return _inf_norm(w - obj.prox_l1(w - step * g, step)) / step


def svrg_epochs(obj, w, state: MinibatchState, *, method: str, n_epochs: int, batch_size: int,
                learning_rate, tol: float, n_iter_no_change: int, rng, monitor: Monitor, validation=None):
    """Shuffled-minibatch epochs of ``method`` ('sgd' or 'adam') on the SVRG gradient, with an epoch-level
    step control: the minibatch solver of ``fit``, which reaches the optimum as the full-batch ones do.

    SVRG (Johnson & Zhang 2013; proximal: Xiao & Zhang 2014).  Each epoch starts at a snapshot
    ``w~`` with the full gradient ``G~ = grad E(w~)`` (one pass over the data), then steps through
    shuffled minibatches ``B`` with ``v = grad E_B(w) - grad E_B(w~) + G~``: unbiased like the plain
    minibatch gradient, but its variance vanishes as ``w`` and ``w~`` approach the optimum, so a constant
    step converges linearly where plain SGD needs a decaying one and stalls at the sampling noise.
    (At the first batch ``w = w~`` and ``v = G~``: sgd skips its batch gradients.)  Steps, then the L1 prox:

    * sgd:  ``w+ = prox(w - step v + beta (w - w-), step)``, heavy-ball ``beta = SVRG_MOMENTUM``;
    * adam: Adam's first moment fed with ``v``, its second moment with the plain minibatch gradient
      ``grad E_B(w)``, and ``w+ = prox(w - steps * mhat, steps)`` (``steps`` per coordinate, see
      :func:`_adam_step`).  The second moment is Adam's per-coordinate scale; fed with ``v`` it would
      vanish at the optimum and turn the steps into sign steps of size ``step`` (measured: the L1 fit of
      the generated set then stalled at 2e-8 of the optimum), while the minibatch gradients' second
      moment tends to their sampling variance, a fixed diagonal preconditioner.

    Cost per epoch: about three passes over the data (two minibatch gradients per step, one full).

    Step control: the full objective ``F`` at the end of an epoch (computed with the next snapshot's
    gradient, so for free) decides.  ``F`` not above the lowest accepted so far (up to the rounding of
    the data's dtype): the epoch is accepted, and if ``F`` fell by more than that rounding the step
    grows (``STEP_RAMP``, then ``STEP_GROW``); else the epoch is undone (back to ``w~``), the momentum
    (heavy-ball velocity, Adam's first moment) restarts from zero and the step halves (``STEP_SHRINK``).
    Within the rounding the objective cannot tell a good epoch from a bad one, so it neither grows the
    step nor raises the reference: with float32 data (rounding ~1e-6 relative) growing there took sgd's
    step past stability and left it wandering at 1e-6 of the optimum instead of converging.
    So ``F`` never rises above its lowest by more than rounding, a too large ``learning_rate`` cannot
    diverge, and the step settles just below the largest stable one.  The first step is ``learning_rate`` ('auto':
    ``1 / L`` of a single row for sgd, ``1e-3`` for adam).

    Convergence, as for the full-batch solvers: the max-norm of the full gradient at a snapshot (the
    gradient mapping at step ``1 / L`` with L1) is at most ``tol``.  With ``validation``, also when the
    validation objective has not improved by ``tol`` for ``n_iter_no_change`` epochs (early stopping).
    Every epoch, accepted or undone, is one iteration for ``n_epochs`` and the monitor, which sees the
    current snapshot, its objective (or the validation objective) and optimality.  Returns
    ``(w, epochs_run, converged)``.
    """
    N = obj.X.shape[0]
    _start_minibatches(obj, w, state, method, learning_rate)
    if state.step is None:
        state.step = state.lr0
    bs = max(1, min(int(batch_size), N))
    map_step = 1.0 / _lipschitz_guess(obj)
    l1 = _has_l1(obj)
    f, g = obj.loss_gradient(w)
    _check_finite(f, g, method)
    F = F_low = f + obj.l1_penalty(w)
    velocity = np.zeros_like(w)
    optimality = _optimality(obj, w, g, map_step)
    for e in range(n_epochs):
        if optimality <= tol:
            return w, e, True
        w_snap, g_snap = w, g
        order = rng.permutation(N)
        for start in range(0, N, bs):
            # at the first batch w = w~, so v = G~ (adam still needs the batch gradient's scale)
            batch = None if start == 0 and method == "sgd" else _batch(obj, np.sort(order[start:start + bs]), N)
            g_batch = None if batch is None else batch.loss_gradient(w)[1]
            v = g_snap if start == 0 else g_batch - batch.loss_gradient(w_snap)[1] + g_snap
            if method == "sgd":
                steps = state.step
                w_next = w - steps * v + SVRG_MOMENTUM * velocity
            else:
                d, steps = _adam_step(state, v, state.step, g_scale=g_batch)
                w_next = w - d
            w_next = obj.prox_l1(w_next, steps) if l1 else w_next
            velocity, w = w_next - w, w_next
        state.epoch += 1
        f, g_new = obj.loss_gradient(w)
        F_new = f + obj.l1_penalty(w)
        slack = _rounding(obj, F_low)
        if np.isfinite(F_new) and F_new <= F_low + slack:
            if F_new < F_low - slack:
                state.step *= STEP_GROW if state.step_scale_found else STEP_RAMP
            F, g, F_low = F_new, g_new, min(F_low, F_new)
            optimality = _optimality(obj, w, g, map_step)
        else:  # undo the epoch, restart the momentum, halve the step
            w = w_snap
            velocity = np.zeros_like(w)
            if method == "adam":  # with its bias correction, or mhat would start at 0.1 v while the
                state.m, state.t_m = np.zeros_like(w), 0  # L1 prox takes full steps: an ascent direction
            state.step *= STEP_SHRINK
            state.step_scale_found = True
        score = validation.objective(w) if validation is not None else F
        if monitor.step(w, score, optimality):
            return w, e + 1, True
        if validation is not None and _no_improvement(state, score, tol, n_iter_no_change):
            return w, e + 1, True
    return w, n_epochs, converged(optimality, tol)

"""Solvers for softmax regression.  Every solver minimises the same objective object
(:class:`softxent.objective.LinearSoftmaxObjective`, or anything with its interface, e.g. the Dask one):

==============  ==================================================================================
solver          when to use it
==============  ==================================================================================
``lbfgs``       the default for L2: quasi-Newton (scipy's L-BFGS-B); one objective+gradient per step.
``newton-cg``   trust-region Newton with the exact Hessian-vector product and Jacobi-preconditioned
                CG: ill-conditioned or unscaled problems, where L-BFGS needs many iterations.
``gd``          the seed's plain full-batch gradient descent, with Armijo backtracking or a fixed
                ``learning_rate``: for teaching and as a baseline; slow on ill-conditioned data.
``proximal``    accelerated proximal gradient (FISTA with backtracking and adaptive restart) for L1 /
                elastic net (``l1_ratio > 0``): soft-thresholding gives exact zeros in ``coef_``.
``sgd``         shuffled minibatches (step ``lr0 / sqrt(1 + epoch)``, proximal steps for L1): streaming
                data via ``partial_fit``, or data too large for full-batch passes.
``adam``        shuffled minibatches with Adam moments: streaming, poorly scaled features.
==============  ==================================================================================

Full-batch solvers stop when the gradient (for ``proximal``: the gradient mapping) is at most ``tol`` in
max-norm; minibatch solvers when the epoch loss has not
improved by ``tol`` for ``n_iter_no_change`` epochs.  Each reports every iteration to a
:class:`Monitor`, which keeps the last completed iterate (an interrupted fit keeps it) and the curve.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

__all__ = ["IterationInfo", "Monitor", "SolverResult", "SOLVERS", "FULL_BATCH_SOLVERS",
           "MINIBATCH_SOLVERS", "run_solver", "minibatch_epochs"]

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
        self.t0 = time.perf_counter()

    def step(self, w, objective: float, grad_norm: float) -> bool:
        self.last_w = np.array(w, dtype=np.float64, copy=True)
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


def _inf_norm(g) -> float:
    return float(np.max(np.abs(g), initial=0.0))


# ------------------------------------------------------------------------------------------- lbfgs
def _lbfgs(obj, w0, *, max_iter, tol, monitor, **_):
    last = {}

    def fun(w):
        f, g = obj.loss_gradient(w)
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
    # status 0: converged; 99: stopped by the callback; 2 (abnormal line search) counts as converged
    # only when the gradient is small anyway (the line search ran into rounding at the optimum).
    converged = res.status in (0, 99) or g_norm <= 10 * tol
    return SolverResult(res.x, int(res.nit), bool(converged), str(res.message))


# --------------------------------------------------------------------------------------- newton-cg
def _steihaug_cg(hessp, g, m, radius, tol, max_cg):
    """Approximately minimise ``g.p + 1/2 p.Hp`` subject to ``||p||_M <= radius`` (Steihaug-Toint CG,
    preconditioned by the diagonal ``m``).  Returns ``(p, Hp, on_boundary)``."""
    p = np.zeros_like(g)
    hp = np.zeros_like(g)
    r = g.copy()
    y = r / m
    d = -y
    ry = float(r @ y)
    for _ in range(max_cg):
        hd = hessp(d)
        dhd = float(d @ hd)

        def to_boundary():
            # tau >= 0 with ||p + tau d||_M = radius
            a, b, c = float(d @ (m * d)), 2 * float(p @ (m * d)), float(p @ (m * p)) - radius**2
            tau = (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)
            return p + tau * d, hp + tau * hd, True

        if dhd <= 0:
            return to_boundary()
        step = ry / dhd
        p_next = p + step * d
        if float(p_next @ (m * p_next)) >= radius**2:
            return to_boundary()
        p, hp = p_next, hp + step * hd
        r = r + step * hd
        if float(np.linalg.norm(r)) <= tol:
            break
        y = r / m
        ry_next = float(r @ y)
        d = -y + (ry_next / ry) * d
        ry = ry_next
    return p, hp, False


def _newton_cg(obj, w0, *, max_iter, tol, monitor, **_):
    """Trust-region Newton with the exact Hessian-vector product and a Jacobi-preconditioned Steihaug CG.

    The trust region is measured in the norm of the Hessian's diagonal ``||p||_M = sqrt(p.(M p))``, which
    makes the method insensitive to the scale of the features (unscaled pixels, counts).  Inner CG stops
    at ``min(0.5, sqrt(||g||)) ||g||`` (superlinear convergence); the radius follows the usual ratio test.
    """
    w = w0.copy()
    f, g = obj.loss_gradient(w)
    radius = None
    for it in range(1, max_iter + 1):
        if _inf_norm(g) <= tol:
            return SolverResult(w, it - 1, True)
        m = np.maximum(obj.hessian_diag(w), 1e-12)
        gnorm = float(np.linalg.norm(g))
        if radius is None:
            radius = max(1.0, math.sqrt(float(g @ (g / m))))
        # Forcing term sqrt(|g|) gives superlinear convergence; solving past half the final tolerance
        # (the next gradient is about the CG residual) would only polish digits nobody asked for.
        cg_tol = max(min(0.5, math.sqrt(gnorm)) * gnorm, 0.5 * tol)
        p, hp, boundary = _steihaug_cg(lambda v: obj.hessp(w, v), g, m, radius, cg_tol,
                                       max_cg=max(10, min(obj.n_coef, 500)))
        predicted = -(float(g @ p) + 0.5 * float(p @ hp))
        f_new, g_new = obj.loss_gradient(w + p)
        actual = f - f_new
        rho = actual / predicted if predicted > 0 else -1.0
        p_norm = math.sqrt(float(p @ (m * p)))
        if rho < 0.25:
            radius = 0.25 * p_norm
        elif rho > 0.75 and boundary:
            radius = 2.0 * radius
        # accept descent steps; near the optimum both reductions fall to rounding level, accept those too
        noise = _rounding(obj, f)
        if rho > 1e-4 or (predicted <= noise and f_new <= f + noise):
            w, f, g = w + p, f_new, g_new
        if monitor.step(w, f, _inf_norm(g)):
            return SolverResult(w, it, True, "stopped by callback")
        if radius < 1e-14:
            return SolverResult(w, it, _inf_norm(g) <= 10 * tol, "trust region collapsed")
    return SolverResult(w, max_iter, _inf_norm(g) <= tol)


# ---------------------------------------------------------------------------------------------- gd
def _lipschitz_guess(obj) -> float:
    """The objective's bound on its gradient's Lipschitz constant, used for the first step."""
    return obj.lipschitz_bound()


def _gd(obj, w0, *, max_iter, tol, monitor, learning_rate=None, **_):
    w = w0.copy()
    f, g = obj.loss_gradient(w)
    fixed = learning_rate is not None
    step = float(learning_rate) if fixed else 1.0 / _lipschitz_guess(obj)
    for it in range(1, max_iter + 1):
        if _inf_norm(g) <= tol:
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
            while True:
                w_new = w - step * g
                f_new, g_new = obj.loss_gradient(w_new)
                if f_new <= f - 0.5 * step * gg + slack or step < 1e-20:
                    break
                step *= 0.5
            w, f, g = w_new, f_new, g_new
        if not np.isfinite(f):
            raise FloatingPointError(
                f"gradient descent diverged (objective {f}) with learning_rate={step}; use a smaller "
                "learning_rate or learning_rate=None (backtracking)")
        if monitor.step(w, f, _inf_norm(g)):
            return SolverResult(w, it, True, "stopped by callback")
    return SolverResult(w, max_iter, _inf_norm(g) <= tol)


# ---------------------------------------------------------------------------------------- proximal
def _proximal(obj, w0, *, max_iter, tol, monitor, **_):
    """FISTA with backtracking on the smooth part and function-value restart (O'Donoghue & Candes)."""
    x = obj.prox_l1(w0, 0.0)
    y, t = x.copy(), 1.0
    L = _lipschitz_guess(obj) * 0.1
    F_x = obj.loss(x) + obj.l1_penalty(x)
    f_y, g_y = obj.loss_gradient(y)
    for it in range(1, max_iter + 1):
        while True:
            x_new = obj.prox_l1(y - g_y / L, 1.0 / L)
            d = x_new - y
            f_new = obj.loss(x_new)
            if f_new <= f_y + float(g_y @ d) + 0.5 * L * float(d @ d) * (1 + 1e-12) + 1e-15 * abs(f_y):
                break
            L *= 2.0
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
        if grad_map <= tol:
            return SolverResult(x, it, True)
        f_y, g_y = obj.loss_gradient(y)
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
    """What persists between epochs and ``partial_fit`` calls: step counter, Adam moments, best loss."""

    t: int = 0
    epoch: int = 0
    m: np.ndarray | None = None
    v: np.ndarray | None = None
    lr0: float | None = None
    best_loss: float = np.inf
    no_improvement: int = 0


def minibatch_epochs(obj, w, state: MinibatchState, *, method: str, n_epochs: int, batch_size: int,
                     learning_rate, tol: float | None, n_iter_no_change: int, rng, monitor: Monitor,
                     validation=None):
    """Run up to ``n_epochs`` shuffled-minibatch epochs of ``method`` ('sgd' or 'adam') over ``obj``.

    Each minibatch step uses the gradient of the batch's objective normalised by the batch's expected
    weight ``S |B| / N`` (an unbiased estimate of the full gradient) plus the L2 penalty, then the L1
    prox when ``l1_ratio > 0``.  The epoch's objective is the
    mean of the batch objectives (or, with ``validation``, the validation objective, which drives
    early stopping).  Returns ``(w, epochs_run, converged)``.
    """
    N = obj.X.shape[0]
    if state.lr0 is None:
        if learning_rate is None or learning_rate == "auto":
            state.lr0 = 1.0 / _lipschitz_guess(obj) if method == "sgd" else 1e-3
        else:
            state.lr0 = float(learning_rate)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    if method == "adam" and state.m is None:
        state.m, state.v = np.zeros_like(w), np.zeros_like(w)
    bs = max(1, min(int(batch_size), N))
    for e in range(n_epochs):
        order = rng.permutation(N)
        total, weight = 0.0, 0.0
        grad_norm = 0.0
        for start in range(0, N, bs):
            rows = np.sort(order[start:start + bs])
            batch = obj.subset(rows, weight_sum=obj.weight_sum * len(rows) / N)
            f, g = batch.loss_gradient(w)
            state.t += 1
            if method == "sgd":
                lr = state.lr0 / math.sqrt(1.0 + state.epoch)
                w = w - lr * g
            else:
                state.m = beta1 * state.m + (1 - beta1) * g
                state.v = beta2 * state.v + (1 - beta2) * g * g
                mhat = state.m / (1 - beta1 ** state.t)
                vhat = state.v / (1 - beta2 ** state.t)
                lr = state.lr0
                w = w - lr * mhat / (np.sqrt(vhat) + eps)
            w = obj.prox_l1(w, lr) if obj.l1_ratio and obj.alpha else w
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
        if tol is not None:
            if score > state.best_loss - tol:
                state.no_improvement += 1
            else:
                state.no_improvement = 0
            state.best_loss = min(state.best_loss, score)
            if state.no_improvement >= n_iter_no_change:
                return w, e + 1, True
        if stop:
            return w, e + 1, True
    return w, n_epochs, False

"""``SoftmaxRegression``: the seed's model ``h(x) = softmax(Theta x + b)`` as a scikit-learn classifier.

It validates the data, builds one :class:`~softxent.objective.LinearSoftmaxObjective` and hands it to a
solver of :mod:`softxent.solvers`.  Needs scikit-learn (the ``sklearn`` extra).

Relation to scikit-learn's ``LogisticRegression`` (multinomial, ``penalty='l2'``)::

    softxent:  (1/S) sum_i s_i CE_i + alpha/2 ||Theta||^2
    sklearn:   C sum_i s_i CE_i + 1/2 ||Theta||^2      ==>   C = 1 / (alpha * S)

with ``S = sum_i s_i`` (``n_samples`` without sample weights).  For elastic net, sklearn's
``l1_ratio`` is our ``l1_ratio`` and the same ``C`` mapping holds.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, Options, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from .loss import log_softmax, softmax
from .objective import LinearSoftmaxObjective
from .solvers import (
    FULL_BATCH_SOLVERS,
    MINIBATCH_SOLVERS,
    SOLVERS,
    MinibatchState,
    Monitor,
    NonFiniteObjectiveError,
    minibatch_epochs,
    run_solver,
    svrg_epochs,
)

__all__ = ["SoftmaxRegression"]

# Below this many multiply-adds per matrix product, BLAS threads cost more than they save: OpenBLAS's
# threads spin-wait, and on a busy 2-core machine a digits-sized fit ran 10x slower with 2 threads.
_SINGLE_THREAD_FLOPS = 2e7


def _blas_threads(X, n_classes):
    """Limit BLAS to one thread for small products (threadpoolctl, when installed)."""
    if X.shape[0] * X.shape[1] * n_classes >= _SINGLE_THREAD_FLOPS:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


_CONVERGENCE_ADVICE = (
    "Try: increasing max_iter (warm_start=True continues this fit), another solver (lbfgs and newton-cg need "
    "far fewer iterations than gd, sgd and adam; newton-cg copes best with ill-conditioned data), or, if the "
    "features are not scaled, scaling them (e.g. sklearn.preprocessing.StandardScaler)."
)


def _weight_divisor(top: float) -> float:
    """What the sample weights are divided by, given their largest entry ``top``: ``top`` when it lies outside
    [1e-100, 1e100], else 1.  The objective divides by ``S = sum(s)`` and so depends only on the weights'
    ratios, but ``S`` (or ``s_i CE_i``) overflows for weights near 1e308 and loses digits for weights near
    1e-308.  The in-memory fit (:func:`_tame_weights`) and the Dask fit (which finds ``top`` in its scan of
    the blocks) both divide by it."""
    return top if top > 0 and not 1e-100 <= top <= 1e100 else 1.0


def _tame_weights(sw):
    """``sw`` divided by :func:`_weight_divisor` of its largest entry."""
    divisor = _weight_divisor(float(np.max(sw, initial=0.0)))
    return sw if divisor == 1.0 else sw / sw.dtype.type(divisor)


#: The largest row norm ``||x_i||`` a fit accepts: 1 / eps of float64, about 4.5e15.  The curvature of the
#: objective along the features grows as ``||x_i||^2`` while the intercept's stays below 1/2; beyond this
#: norm the two differ by more than 1/eps^2 and no solver moves the intercept any more (measured on iris and
#: a 4-class make_classification set: newton-cg stops at the model without intercept from ||x|| ~ 1e12-1e14,
#: lbfgs from ~1e8); further up L-BFGS-B's line search cannot even take a first step (digits at
#: ||x|| ~ 5e27: the uniform model after 0 iterations), and from 1.3e154 the squared norms overflow.
#: Below it every solver still returns a model (1e6-scale features fit; raw timestamps in seconds, 1.7e9,
#: too), with a ConvergenceWarning where the scale slows it; scaling the features is the cure either way.
MAX_ROW_NORM = 1.0 / float(np.finfo(np.float64).eps)


def _check_scale(obj, X=None) -> None:
    """A ValueError when a row of the features is longer than :data:`MAX_ROW_NORM` (or its squared norm
    overflows): the fit would return a model without intercept, a uniform model or NaN.  ``obj`` is the fit's
    objective (in memory or on Dask); ``X``, when at hand, locates the largest value for the message."""
    sq = obj.max_squared_row_norm()
    if np.isfinite(sq) and sq <= MAX_ROW_NORM**2:
        return
    norm = (f"of norm up to {np.sqrt(sq):.3g}" if np.isfinite(sq)
            else "whose norms exceed 1.3e154 (their squares overflow float64)")
    at = ""
    if X is not None:
        values = X.data if sp.issparse(X) else X
        top = float(np.max(np.abs(values)))
        if sp.issparse(X):
            at = f"; values up to {top:.3g}"
        else:
            i, j = np.unravel_index(np.argmax(np.abs(values)), values.shape)
            at = f"; values up to {top:.3g} (at row {i}, column {j})"
    raise ValueError(
        f"X has rows {norm}{at}: beyond {MAX_ROW_NORM:.3g} (1/float64 eps) the features' scale "
        "leaves the intercept's curvature below rounding, and the fit would be meaningless (a model without "
        "intercept, or the uniform one); scale the features (e.g. sklearn.preprocessing.StandardScaler, or "
        "divide them by their magnitude)")


def _overflow_free_logits(X, coef, intercept, dtype):
    """The logits of the rows ``X`` shifted by their row maximum, ``z_i - max_k z_ik``, for rows whose
    ``z = X Theta^T + b`` overflows (a 1e308 feature, or 1e308 coefficients).

    With ``xt_i = [x_i, 1]`` and ``Tt = [Theta, b]`` scaled by their max-abs ``m_i >= 1`` and ``c``,
    ``t_i = (xt_i / m_i) (Tt / c)^T`` is bounded by ``D + 1`` and ``z_i = m_i c t_i``, so
    ``z_i - max z_i = m_i c (t_i - max t_i)``: zero for the top class, negative for the others, at worst
    overflowing to -inf, which is clipped to the most negative float of ``dtype`` so that ``log_softmax``
    stays finite too.  Softmax and argmax see the same numbers as from the exact logits."""
    xt = X.toarray() if sp.issparse(X) else np.asarray(X)
    xt = np.hstack([xt.astype(np.float64), np.ones((xt.shape[0], 1))])
    m = np.max(np.abs(xt), axis=1, keepdims=True)
    tt = np.hstack([np.asarray(coef, dtype=np.float64), np.asarray(intercept, dtype=np.float64)[:, None]])
    c = float(np.max(np.abs(tt), initial=0.0)) or 1.0
    t = (xt / m) @ (tt / c).T
    with np.errstate(over="ignore"):
        shifted = ((t - t.max(axis=1, keepdims=True)) * c) * m
    return np.maximum(shifted, -np.finfo(dtype).max).astype(dtype)


def _is_dask(X) -> bool:
    """A dask collection (array, DataFrame), recognised without importing dask (the core does not need it)."""
    return type(X).__module__.split(".", 1)[0] == "dask"


def _seed_sequence(random_state, epoch: int):
    """A NumPy seed from scikit-learn's ``random_state`` (None, int or RandomState) and an epoch count."""
    if random_state is None:
        return None
    if isinstance(random_state, np.random.RandomState):
        return [int(random_state.randint(2**31)), epoch]
    return [int(random_state), epoch]


class SoftmaxRegression(ClassifierMixin, BaseEstimator):
    """Multinomial logistic (softmax) regression trained on the mean cross-entropy.

    Minimises, over ``coef_`` (``Theta``, ``K x D``) and ``intercept_`` (``b``, not penalised)::

        E = (1/S) sum_i s_i CE(Theta x_i + b, y_i) + alpha ((1 - l1_ratio)/2 ||Theta||^2 + l1_ratio ||Theta||_1)

    where ``s_i`` is ``sample_weight`` times the class weight of ``y_i``.  scikit-learn's
    ``LogisticRegression(C=...)`` minimises the same function for ``C = 1 / (alpha * S)``.

    Parameters:
        alpha: penalty strength (>= 0).
        l1_ratio: 0 = L2, 1 = L1, between = elastic net (needs solver 'proximal', 'sgd' or 'adam').
        fit_intercept: learn ``b``.
        solver: 'auto', 'lbfgs', 'newton-cg', 'gd', 'proximal', 'sgd', 'adam' (see
            :mod:`softxent.solvers` for when to use which).  'auto' picks 'proximal' when
            ``l1_ratio > 0``, else 'lbfgs'.
        max_iter: iterations of a full-batch solver, epochs of a minibatch one.
        tol: stop when the gradient's max-norm (with L1: the gradient mapping's) is at most ``tol``.
            'sgd' / 'adam' in ``fit`` test it at each epoch's snapshot, where they compute the full
            gradient anyway (:func:`softxent.solvers.svrg_epochs`), so they stop where the full-batch
            solvers do.  With ``early_stopping``, they also stop when the validation objective has not
            improved by ``tol`` for ``n_iter_no_change`` epochs.  (The Dask fit's streamed minibatches
            stop when the epoch loss has not improved by ``tol`` for ``n_iter_no_change`` epochs;
            ``partial_fit`` runs one epoch and never tests ``tol``.)
        class_weight: None, 'balanced' or a dict ``{label: weight}``; multiplies the sample weights.
        warm_start: start from the previous ``coef_`` / ``intercept_`` (and keep minibatch state).
        batch_size: minibatch size for 'sgd' / 'adam'.
        learning_rate: 'auto' or a float step: the fixed step of 'gd' ('auto' = Armijo backtracking);
            the initial step of 'sgd' ('auto' = 1 / L from the largest row norm) and of Adam ('auto' =
            1e-3).  In ``fit`` the minibatch solvers then adapt it once per epoch (an epoch that raises
            the objective is undone and halves the step; accepted epochs grow it), so a too large
            value costs a few epochs instead of diverging; ``partial_fit`` decays sgd's step as
            ``lr0 / sqrt(1 + epoch)`` and keeps Adam's.
        early_stopping: minibatch solvers hold out ``validation_fraction`` of the data and stop when the
            validation objective stops improving.
        validation_fraction, n_iter_no_change: see ``early_stopping`` / ``tol``.
        random_state: seed for shuffling and the validation split.
        verbose: print the objective at each iteration when > 0.
        callback: ``callback(info)`` after every iteration; ``info`` has ``iteration``, ``max_iter``,
            ``objective``, ``grad_norm``, ``elapsed``, ``coef`` and ``intercept`` (the current iterate).
            Returning True stops the fit.
        n_jobs: threads for the objective's evaluations on dense ``X`` (loss + gradient, Hessian products):
            None or -1 = every core this process may use (``os.sched_getaffinity``), or an int >= 1.
            The rows are taken in blocks handed to the threads in turn, with BLAS held at one thread
            meanwhile, so a thread on a core that another program keeps busy takes fewer blocks instead
            of holding the others up (see :mod:`softxent._parallel`); the blocks' sums are added in
            block order, so every ``n_jobs`` gives the same numbers.  Sparse ``X`` runs on one thread.

    Minibatch solvers: ``fit`` (all data at hand) runs SVRG, shuffled minibatches with a
    variance-reduced gradient (one full gradient per epoch; heavy-ball momentum for 'sgd', Adam's moments
    for 'adam'), which converges to the optimum like the full-batch solvers; ``partial_fit`` (one batch
    of a stream at a time) runs plain minibatch steps, whose sampling noise keeps them near but not at
    the optimum.  For data that fit in memory 'lbfgs' / 'newton-cg' are usually faster: to 1e-6 of the
    optimum on a standardised 50000 x 50, 10-class set (one thread) 'sgd' took 0.26-0.34 s, 'adam' 0.8 s,
    'lbfgs' 0.16 s; on digits (pixels / 16, alpha=1e-2), fits with tol=1e-6 took 0.2 s ('sgd'),
    0.55 s ('adam'), 0.06 s ('lbfgs'), 0.02 s ('newton-cg').

    Attributes:
        classes_, coef_ (K, D), intercept_ (K,), n_features_in_, feature_names_in_, n_iter_,
        loss_curve_ (objective per iteration), objective_ (final objective value), solver_ (the solver
        that ran), interrupted_ (True when a KeyboardInterrupt stopped ``fit``: the model then holds the
        last completed iterate, and the interrupt is re-raised).

    Two classes keep the softmax with K = 2 rows of ``coef_``; ``decision_function`` then returns the
    log-odds ``z_1 - z_0`` (scikit-learn's binary convention).
    """

    _parameter_constraints = {
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "l1_ratio": [Interval(numbers.Real, 0, 1, closed="both")],
        "fit_intercept": ["boolean"],
        "solver": [StrOptions({"auto", *SOLVERS})],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "warm_start": ["boolean"],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "learning_rate": [StrOptions({"auto"}), Interval(numbers.Real, 0, None, closed="neither")],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "n_iter_no_change": [Interval(numbers.Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "callback": [callable, None],
        "n_jobs": [None, Interval(numbers.Integral, 1, None, closed="left"), Options(numbers.Integral, {-1})],
    }

    def __init__(self, alpha=1e-4, l1_ratio=0.0, fit_intercept=True, solver="auto", max_iter=1000,
                 tol=1e-6, class_weight=None, warm_start=False, batch_size=256, learning_rate="auto",
                 early_stopping=False, validation_fraction=0.1, n_iter_no_change=5, random_state=None,
                 verbose=0, callback=None, n_jobs=None):
        self.alpha = alpha
        self.l1_ratio = l1_ratio
        self.fit_intercept = fit_intercept
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight
        self.warm_start = warm_start
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.verbose = verbose
        self.callback = callback
        self.n_jobs = n_jobs

    # ------------------------------------------------------------------------------- helpers
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    def _resolve_solver(self, for_partial_fit=False) -> str:
        solver = self.solver
        if for_partial_fit:  # streaming steps: Adam if asked for, plain SGD otherwise
            return "adam" if solver == "adam" else "sgd"
        if solver == "auto":
            return "proximal" if self.l1_ratio > 0 and self.alpha > 0 else "lbfgs"
        if self.l1_ratio > 0 and self.alpha > 0 and solver in ("lbfgs", "newton-cg", "gd"):
            raise ValueError(
                f"solver={solver!r} handles only the L2 penalty (l1_ratio=0); got l1_ratio={self.l1_ratio}. "
                "Use solver='proximal' (or 'sgd' / 'adam') for L1 and elastic net.")
        return solver

    def _validate_fit_data(self, X, y, sample_weight, reset: bool):
        X, y = validate_data(self, X, y, accept_sparse="csr", dtype=[np.float64, np.float32],
                             order="C", reset=reset)
        check_classification_targets(y)
        sw = _check_sample_weight(sample_weight, X, dtype=X.dtype, ensure_non_negative=True)
        if not np.all(np.isfinite(sw)):
            raise ValueError("sample_weight must be finite; got NaN or inf values")
        return X, y, sw

    def _fold_class_weight(self, y_idx, sw, y_labels):
        if self.class_weight is None:
            return sw
        cw = compute_class_weight(self.class_weight, classes=self.classes_, y=y_labels)
        return sw * cw[y_idx].astype(sw.dtype)

    def _make_objective(self, X, y_idx, sw, weight_sum=None):
        return LinearSoftmaxObjective(X, y_idx, len(self.classes_), sw, alpha=self.alpha,
                                      l1_ratio=self.l1_ratio, fit_intercept=self.fit_intercept,
                                      weight_sum=weight_sum, n_jobs=self.n_jobs)

    def _initial_w(self, obj):
        if self.warm_start and hasattr(self, "coef_") and self.coef_.shape == (obj.n_classes, obj.n_features):
            return obj.pack(self.coef_, self.intercept_ if self.fit_intercept else None)
        return np.zeros(obj.n_coef)

    def _store(self, obj, w, dtype):
        theta, b = obj.unpack(np.asarray(w, dtype=np.float64))
        self.coef_ = np.array(theta, dtype=dtype)
        self.intercept_ = (np.zeros(obj.n_classes, dtype=dtype) if b is None else np.array(b, dtype=dtype))

    def _monitor(self, obj, max_iter, dtype):
        def decorate(info):
            theta, b = obj.unpack(info.w)
            info.coef = theta
            info.intercept = np.zeros(obj.n_classes) if b is None else b

        callback = self.callback
        if self.verbose:
            user = callback

            def callback(info):
                print(f"iter {info.iteration:5d}  objective {info.objective:.10g}  "
                      f"|grad| {info.grad_norm:.3e}")
                return user(info) if user is not None else False

        return Monitor(max_iter, callback, decorate)

    # ---------------------------------------------------------------------------------- fit
    def fit(self, X, y, sample_weight=None):
        """Fit on ``X`` ``(N, D)`` (dense or CSR), labels ``y`` ``(N,)``, optional ``sample_weight``.

        A dask array ``X`` (with dask ``y``) is fitted on the current ``dask.distributed`` cluster by
        :func:`softxent.dask.fit_dask`.  Rows of ``X`` longer than :data:`MAX_ROW_NORM` (1/eps, about 4.5e15)
        are a ValueError: scale the features."""
        if _is_dask(X):
            from .dask import fit_dask

            return fit_dask(self, X, y, sample_weight)
        self._validate_params()
        X, y, sw = self._validate_fit_data(X, y, sample_weight, reset=True)
        classes, y_idx = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(
                "This solver needs samples of at least 2 classes in the data, but the data contains "
                f"only one class: {classes[0].item() if hasattr(classes[0], 'item') else classes[0]!r}")
        if self.warm_start and hasattr(self, "classes_") and not np.array_equal(self.classes_, classes):
            raise ValueError(f"warm_start needs the same classes as the previous fit {self.classes_.tolist()}; "
                             f"got {classes.tolist()}")
        self.classes_ = classes
        sw = self._fold_class_weight(y_idx, sw, y)
        if not np.any(sw > 0):  # weights are >= 0: no positive one is a zero total (a sum could overflow)
            raise ValueError("sample_weight must not sum to zero (every sample would be ignored); got "
                             f"a total weight of {float(np.sum(sw))}")
        solver = self._resolve_solver()
        self.solver_ = solver
        obj = self._make_objective(X, y_idx, _tame_weights(sw))
        _check_scale(obj, X)
        w0 = self._initial_w(obj)

        def run(monitor):
            with _blas_threads(X, len(classes)):
                return self._run(obj, w0, solver, monitor, X, y_idx, sw)

        if not self._run_and_finish(obj, w0, X.dtype, run):
            self._warn_not_converged(solver, stacklevel=2)
        return self

    def _run(self, obj, w0, solver, monitor, X, y_idx, sw):
        if solver in FULL_BATCH_SOLVERS:
            return self._run_full_batch(obj, w0, solver, monitor)
        return self._fit_minibatch(obj, w0, solver, monitor, X, y_idx, sw)

    def _run_full_batch(self, obj, w0, solver, monitor):
        """One of the full-batch solvers on ``obj`` (in memory or on Dask): ``(w, n_iter, converged)``."""
        lr = None if self.learning_rate == "auto" else self.learning_rate
        res = run_solver(solver, obj, w0, max_iter=self.max_iter, tol=self.tol, monitor=monitor, learning_rate=lr)
        return res.w, res.n_iter, res.converged

    def _warn_not_converged(self, solver, stacklevel):
        """The ConvergenceWarning of a fit that ran out of ``max_iter``, with what to try."""
        g = getattr(self, "_final_optimality", float("nan"))
        warnings.warn(
            f"SoftmaxRegression(solver={solver!r}) did not converge within max_iter={self.max_iter} "
            f"{'epochs' if solver in MINIBATCH_SOLVERS else 'iterations'}: the gradient's max-norm is {g:.2e}, "
            f"above tol={self.tol}. " + _CONVERGENCE_ADVICE, ConvergenceWarning, stacklevel=stacklevel + 1)

    def _run_and_finish(self, obj, w0, dtype, run):
        """Run the solver as ``run(monitor) -> (w, n_iter, converged)`` and store the fitted attributes
        (coef_ and intercept_ in ``dtype``); returns ``converged``.  A KeyboardInterrupt keeps the last
        iterate the monitor saw (``w0`` if none), sets ``interrupted_`` and stores it before re-raising."""
        monitor = self._monitor(obj, self.max_iter, dtype)
        self.interrupted_ = False
        try:
            w, n_iter, converged = run(monitor)
        except KeyboardInterrupt:
            self.interrupted_ = True
            w = monitor.last_w if monitor.last_w is not None else w0
            self._finish(obj, w, len(monitor.curve), monitor, dtype)
            raise
        self._finish(obj, w, n_iter, monitor, dtype, require_finite=True)
        return converged

    def _finish(self, obj, w, n_iter, monitor, dtype, require_finite=False):
        objective = float(obj.objective(np.asarray(w, dtype=np.float64)))
        if require_finite and not (np.isfinite(objective) and np.all(np.isfinite(w))):
            raise NonFiniteObjectiveError(self.solver_, objective, "the fitted model's objective")
        self._store(obj, w, dtype)
        self.n_iter_ = int(n_iter)
        self.loss_curve_ = list(monitor.curve)
        self._final_optimality = monitor.last_grad_norm  # what the convergence warning reports
        self.objective_ = objective

    def _fit_minibatch(self, obj, w0, solver, monitor, X, y_idx, sw):
        rng = np.random.default_rng(_seed_sequence(self.random_state, 0))
        validation = None
        if self.early_stopping:
            N = X.shape[0]
            n_val = max(1, int(round(self.validation_fraction * N)))
            perm = rng.permutation(N)
            val_rows, train_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
            validation, obj = obj.subset(val_rows), obj.subset(train_rows)
        if not (self.warm_start and getattr(self, "_mb_state", None) is not None):
            self._mb_state = MinibatchState()
        # all the data are at hand: variance-reduced (SVRG) minibatches, which reach the optimum
        w, n, converged = svrg_epochs(
            obj, w0, self._mb_state, method=solver, n_epochs=self.max_iter, batch_size=self.batch_size,
            learning_rate=self.learning_rate, tol=self.tol, n_iter_no_change=self.n_iter_no_change,
            rng=rng, monitor=monitor, validation=validation)
        return w, n, converged

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """One epoch of 'sgd' / 'adam' over this batch; ``classes`` is required on the first call.

        A dask array ``X``: one such call per row block, in turn (:func:`softxent.dask.partial_fit_dask`)."""
        if _is_dask(X):
            from .dask import partial_fit_dask

            return partial_fit_dask(self, X, y, classes, sample_weight)
        first = not hasattr(self, "classes_")
        if first:
            self._validate_params()
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit "
                                 "(all labels the stream may contain)")
        X, y, sw = self._validate_fit_data(X, y, sample_weight, reset=first)
        if first:
            cls = np.unique(np.asarray(classes))
            if len(cls) < 2:
                raise ValueError(f"classes must hold at least 2 labels; got {cls.tolist()}")
            self.classes_ = cls
        elif classes is not None and not np.array_equal(np.unique(np.asarray(classes)), self.classes_):
            raise ValueError(f"classes={list(classes)} differs from the classes of the first partial_fit "
                             f"call {self.classes_.tolist()}")
        unknown = np.setdiff1d(np.unique(y), self.classes_)
        if unknown.size:
            raise ValueError(f"y holds labels {unknown.tolist()} that are not in classes "
                             f"{self.classes_.tolist()} given to the first partial_fit call")
        y_idx = np.searchsorted(self.classes_, y)
        if self.class_weight is not None:
            if self.class_weight == "balanced":
                raise ValueError("class_weight='balanced' needs the whole data set; partial_fit takes a dict")
            cw = np.array([self.class_weight.get(c, 1.0) for c in self.classes_], dtype=sw.dtype)
            sw = sw * cw[y_idx]
        solver = self._resolve_solver(for_partial_fit=True)
        self.solver_ = solver
        obj = self._make_objective(X, y_idx, _tame_weights(sw))
        _check_scale(obj, X)
        if first:
            w = np.zeros(obj.n_coef)
            self._mb_state = MinibatchState()
            self.loss_curve_ = []
            self.n_iter_ = 0
        else:
            w = obj.pack(self.coef_, self.intercept_ if self.fit_intercept else None)
            if getattr(self, "_mb_state", None) is None:  # continuing a full-batch fit
                self._mb_state = MinibatchState()
        rng = np.random.default_rng(_seed_sequence(self.random_state, self._mb_state.epoch))
        monitor = self._monitor(obj, self._mb_state.epoch + 1, X.dtype)
        w, _, _ = minibatch_epochs(obj, w, self._mb_state, method=solver, n_epochs=1,
                                   batch_size=self.batch_size, learning_rate=self.learning_rate, tol=None,
                                   n_iter_no_change=self.n_iter_no_change, rng=rng, monitor=monitor)
        self._store(obj, w, X.dtype)
        self.n_iter_ += 1
        self.loss_curve_ = list(self.loss_curve_) + monitor.curve
        self.objective_ = float(obj.objective(w))
        self.interrupted_ = False
        return self

    # ------------------------------------------------------------------------------ predict
    def _logits(self, X, finite: bool = False):
        """``z = X Theta^T + b``; with ``finite``, rows where that overflows (or turns NaN as +inf - inf, or
        ``max z - min z`` overflows) are replaced by their shifted logits ``z_i - max_k z_ik`` computed
        without overflow (see :func:`_overflow_free_logits`): the same softmax and argmax, and finite
        probabilities and log-probabilities for any finite input."""
        check_is_fitted(self)
        X = validate_data(self, X, accept_sparse="csr", dtype=[np.float64, np.float32], reset=False)
        coef = self.coef_.astype(X.dtype, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            z = np.asarray(X @ coef.T) + self.intercept_.astype(X.dtype, copy=False)
        if finite:  # rows whose logits, or their spread (log_softmax's z - max z), overflow
            with np.errstate(over="ignore", invalid="ignore"):
                spread = np.max(z, axis=1, initial=-np.inf) - np.min(z, axis=1, initial=np.inf)
            bad = np.flatnonzero(~np.isfinite(spread) | ~np.all(np.isfinite(z), axis=1))
            if bad.size:
                z[bad] = _overflow_free_logits(X[bad], self.coef_, self.intercept_, z.dtype)
        return z

    def decision_function(self, X):
        """Logits ``z = X Theta^T + b``, ``(N, K)``; for two classes the log-odds ``z_1 - z_0``, ``(N,)``."""
        if _is_dask(X):  # lazily, block by block
            from .dask import predict_dask

            return predict_dask(self, "decision_function", X)
        z = self._logits(X)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict_proba(self, X):
        """``h(x) = softmax(Theta x + b)``, ``(N, K)``, columns in the order of ``classes_``."""
        if _is_dask(X):  # lazily, block by block
            from .dask import predict_dask

            return predict_dask(self, "predict_proba", X)
        return softmax(self._logits(X, finite=True))

    def predict_log_proba(self, X):
        """``log h(x)`` computed as ``z - lse(z)`` (exact for tiny probabilities)."""
        if _is_dask(X):  # lazily, block by block
            from .dask import predict_dask

            return predict_dask(self, "predict_log_proba", X)
        return log_softmax(self._logits(X, finite=True))

    def predict(self, X):
        """The most probable class label for each row."""
        if _is_dask(X):  # lazily, block by block
            from .dask import predict_dask

            return predict_dask(self, "predict", X)
        z = self._logits(X, finite=True)
        return self.classes_[np.argmax(z, axis=1)]

"""SoftmaxRegression and LinearSoftmaxObjective: the optimum, the derivatives, the options, bad input."""

import re
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("sklearn")
from sklearn.datasets import load_digits, make_classification  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from softxent import SoftmaxRegression, gradcheck  # noqa: E402
from softxent.loss import cross_entropy, cross_entropy_with_grad  # noqa: E402
from softxent.objective import LinearSoftmaxObjective  # noqa: E402

FULL_BATCH = ["lbfgs", "newton-cg", "gd", "proximal"]
MINIBATCH = ["sgd", "adam"]


# ----------------------------------------------------------------------------------------- data
def _digits():
    X, y = load_digits(return_X_y=True)
    return X / 16.0, y, 1e-2


def _generated():
    X, y = make_classification(n_samples=600, n_features=20, n_informative=12, n_classes=10,
                               n_clusters_per_class=1, random_state=0)
    return X, y, 1e-3


DATASETS = {"digits": _digits, "generated": _generated}


def _objective_of(X, y, classes, coef, intercept, alpha, l1_ratio=0.0, sample_weight=None):
    obj = LinearSoftmaxObjective(X, np.searchsorted(classes, y), len(classes), sample_weight,
                                 alpha=alpha, l1_ratio=l1_ratio)
    return obj.objective(obj.pack(coef, intercept))


_SKLEARN_CACHE = {}


def _sklearn_optimum(name):
    """scikit-learn's LogisticRegression(lbfgs, tol=1e-10) at C = 1 / (alpha N): the reference optimum."""
    if name not in _SKLEARN_CACHE:
        X, y, alpha = DATASETS[name]()
        with threadpool_limits(1), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            sk = LogisticRegression(C=1.0 / (alpha * len(y)), tol=1e-10, max_iter=20000).fit(X, y)
        _SKLEARN_CACHE[name] = _objective_of(X, y, sk.classes_, sk.coef_, sk.intercept_, alpha)
    return _SKLEARN_CACHE[name]


# ------------------------------------------------------------------------------- same optimum
@pytest.mark.parametrize("name", list(DATASETS))
@pytest.mark.parametrize("solver", FULL_BATCH)
def test_full_batch_solvers_reach_sklearn_optimum(name, solver):
    X, y, alpha = DATASETS[name]()
    ref = _sklearn_optimum(name)
    m = SoftmaxRegression(alpha=alpha, solver=solver, tol=1e-9, max_iter=20000).fit(X, y)
    assert m.objective_ == pytest.approx(_objective_of(X, y, m.classes_, m.coef_, m.intercept_, alpha))
    # within 1e-6 relative of scikit-learn's optimum, and never meaningfully above it
    assert abs(m.objective_ - ref) <= 1e-6 * ref, (m.objective_, ref)


def _no_rise(curve, dtype=np.float64):
    """The epoch objectives never rise by more than the step control's rounding slack."""
    curve = np.asarray(curve)
    slack = 8 * np.finfo(dtype).eps * np.abs(curve[:-1])
    return bool(np.all(np.diff(curve) <= slack))


@pytest.mark.parametrize("name", list(DATASETS))
@pytest.mark.parametrize("solver", MINIBATCH)
def test_minibatch_solvers_reach_sklearn_optimum(name, solver):
    """fit's sgd / adam (SVRG minibatches, softxent.solvers.svrg_epochs) meet the full-batch bar with their
    defaults (batch_size=256: 8 batches on digits, 3 on the generated set; tol=1e-6; learning_rate='auto'):
    within 1e-6 relative of scikit-learn's optimum, converged, and the curve is the exact objective of
    every epoch's snapshot, which the step control never lets rise."""
    X, y, alpha = DATASETS[name]()
    ref = _sklearn_optimum(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        m = SoftmaxRegression(alpha=alpha, solver=solver, random_state=0).fit(X, y)
    assert m.objective_ == pytest.approx(_objective_of(X, y, m.classes_, m.coef_, m.intercept_, alpha))
    assert abs(m.objective_ - ref) <= 1e-6 * ref, (m.objective_, ref)
    assert len(m.loss_curve_) == m.n_iter_ < m.max_iter
    assert m.loss_curve_[-1] == pytest.approx(m.objective_, rel=1e-12)
    assert _no_rise(m.loss_curve_)


@pytest.mark.parametrize("solver", MINIBATCH)
def test_minibatch_float32_converges(solver):
    """float32 data: the objective's rounding (~1e-6 relative) neither stalls the step control nor lets
    it grow the step past stability; the default tol is reached and the float64 objective of the float32
    fit is within 1e-6 of the optimum."""
    X, y, alpha = _generated()
    ref = _sklearn_optimum("generated")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        m = SoftmaxRegression(alpha=alpha, solver=solver, random_state=0).fit(X.astype(np.float32), y)
    assert m.coef_.dtype == np.float32
    f64 = _objective_of(X, y, m.classes_, m.coef_, m.intercept_, alpha)
    assert abs(f64 - ref) <= 1e-6 * ref, (f64, ref)
    assert _no_rise(m.loss_curve_, np.float32)


@pytest.mark.parametrize("solver", MINIBATCH)
def test_minibatch_l1_reaches_the_proximal_optimum(solver):
    """With L1 (proximal SVRG steps; Adam's prox scaled per coordinate like its steps) the minibatch fit
    finds the proximal solver's optimum and the same exact zeros."""
    X, y, _ = _generated()
    kw = dict(alpha=2e-2, l1_ratio=0.5, tol=1e-7, max_iter=5000)
    ref = SoftmaxRegression(solver="proximal", **kw).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        m = SoftmaxRegression(solver=solver, random_state=0, **kw).fit(X, y)
    assert abs(m.objective_ - ref.objective_) <= 1e-8 * ref.objective_, (m.objective_, ref.objective_)
    assert np.sum(ref.coef_ == 0) > 0.2 * ref.coef_.size
    np.testing.assert_array_equal(m.coef_ == 0, ref.coef_ == 0)
    assert _no_rise(m.loss_curve_)


def test_minibatch_fit_with_weights_equals_repeated_rows():
    """The weighted and the repeated data see different minibatches, but both fits converge to the same
    optimum (what plain minibatch steps could not show: they differ by their sampling noise)."""
    X, y, alpha = _generated()
    sw = np.random.default_rng(4).integers(0, 4, len(y))
    kw = dict(alpha=alpha, solver="sgd", tol=1e-8, batch_size=64, random_state=0)
    a = SoftmaxRegression(**kw).fit(X, y, sample_weight=sw)
    b = SoftmaxRegression(**kw).fit(X.repeat(sw, 0), y.repeat(sw))
    np.testing.assert_allclose(a.coef_, b.coef_, atol=2e-6)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=2e-6)


def test_minibatch_step_control_survives_a_huge_learning_rate_and_warm_starts():
    """learning_rate=1e3 makes every early epoch raise the objective: each is undone and halves the step
    (no divergence, no FloatingPointError) until the step is stable.  A warm start keeps the adapted step
    and, from the optimum, stops at once."""
    X, y, alpha = _generated()
    ref = _sklearn_optimum("generated")
    m = SoftmaxRegression(alpha=alpha, solver="sgd", learning_rate=1e3, random_state=0).fit(X, y)
    assert abs(m.objective_ - ref) <= 1e-6 * ref
    assert m.loss_curve_[0] == m.loss_curve_[5]  # the first epochs were undone: still at w = 0
    assert _no_rise(m.loss_curve_)
    assert m._mb_state.step < 1.0
    m.set_params(warm_start=True)
    m.fit(X, y)
    assert m.n_iter_ == 0


def test_minibatch_early_stopping_stops_on_the_validation_objective():
    X, y, alpha = _digits()
    m = SoftmaxRegression(alpha=alpha, solver="sgd", early_stopping=True, validation_fraction=0.2,
                          n_iter_no_change=3, tol=1e-4, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        m.fit(X, y)
    assert 3 < m.n_iter_ < 100
    # the curve is the validation objective, which stopped improving by tol for the last 3 epochs
    assert min(m.loss_curve_[-3:]) > min(m.loss_curve_[:-3]) - 1e-4
    assert m.score(X, y) > 0.9


@pytest.mark.parametrize("solver,learning_rate", [("adam", 1e-2), ("sgd", "auto")])
def test_partial_fit_streaming_approaches_the_optimum(solver, learning_rate):
    """partial_fit keeps plain minibatch steps (one batch of a stream at a time): the objective falls
    towards the optimum, but stays at the sampling noise's distance.  sgd's step 1/(L sqrt(1 + calls))
    (L of the largest row) is slow but steady: every pass improves; adam gets within 10%."""
    X, y, alpha = _digits()
    ref = _sklearn_optimum("digits")
    m = SoftmaxRegression(alpha=alpha, solver=solver, learning_rate=learning_rate, batch_size=64,
                          random_state=0)
    gaps = []
    for _ in range(10):
        for start in range(0, len(y), 200):
            m.partial_fit(X[start:start + 200], y[start:start + 200], classes=np.arange(10))
        gaps.append(_objective_of(X, y, m.classes_, m.coef_, m.intercept_, alpha) / ref - 1)
    assert all(g > 0 for g in gaps)
    if solver == "sgd":
        assert np.all(np.diff(gaps) < 0), gaps
    else:
        assert gaps[-1] < min(0.1, 0.5 * gaps[0]), gaps


@pytest.mark.parametrize("solver", ["lbfgs", "newton-cg", "proximal"])
def test_csr_equals_dense(solver):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 40)) * (rng.random((300, 40)) < 0.2)
    y = rng.integers(0, 4, 300)
    kw = dict(alpha=1e-2, solver=solver, tol=1e-10, max_iter=5000)
    if solver == "proximal":
        kw["l1_ratio"] = 0.5
    dense = SoftmaxRegression(**kw).fit(X, y)
    sparse = SoftmaxRegression(**kw).fit(sp.csr_matrix(X), y)
    np.testing.assert_allclose(sparse.coef_, dense.coef_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(sparse.predict_proba(sp.csr_matrix(X)), dense.predict_proba(X), atol=1e-9)


@pytest.mark.parametrize("solver, sparse", [("lbfgs", False), ("newton-cg", False), ("newton-cg", True)])
def test_float32_close_to_float64(solver, sparse):
    """float32 data: float32 products (and, in newton-cg, a float32 CG: with the Gram preconditioner on
    dense X, the diagonal one on sparse X) reach the float64 optimum to float32's accuracy."""
    X, y, alpha = _generated()
    if sparse:
        X = sp.csr_matrix(X * (np.random.default_rng(3).random(X.shape) < 0.3))
    m64 = SoftmaxRegression(alpha=alpha, solver=solver, tol=1e-8).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # float32 may stop at its rounding floor
        m32 = SoftmaxRegression(alpha=alpha, solver=solver, tol=1e-5).fit(X.astype(np.float32), y)
    assert m32.coef_.dtype == np.float32 and m32.intercept_.dtype == np.float32
    assert m32.predict_proba(X.astype(np.float32)).dtype == np.float32
    f32 = _objective_of(X, y, m32.classes_, m32.coef_, m32.intercept_, alpha)
    assert abs(f32 - m64.objective_) <= 1e-5 * m64.objective_
    np.testing.assert_allclose(m32.predict_proba(X.astype(np.float32)), m64.predict_proba(X), atol=2e-3)


# --------------------------------------------------------------------------- the objective
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_objective_gradient_and_hessp_match_finite_differences(sparse, fit_intercept):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((40, 7)) * (rng.random((40, 7)) < (0.5 if sparse else 1.0))
    X = sp.csr_matrix(X) if sparse else X
    y = rng.integers(0, 5, 40)
    s = rng.random(40) * 2
    obj = LinearSoftmaxObjective(X, y, 5, s, alpha=0.3, l1_ratio=0.25, fit_intercept=fit_intercept)
    w = rng.standard_normal(obj.n_coef)
    assert gradcheck(obj.loss_gradient, w) < 1e-8
    v = rng.standard_normal(obj.n_coef)
    assert gradcheck(lambda u: float(obj.loss_gradient(u)[1] @ v), w, lambda u: obj.hessp(u, v)) < 1e-7
    # the data term is the weighted mean of softxent.loss's cross-entropy, the penalty as documented
    theta, b = obj.unpack(w)
    z = np.asarray(X @ theta.T) + (0 if b is None else b)
    expected = (cross_entropy(z, y, sample_weight=s, reduction="sum") / s.sum()
                + 0.3 * (0.75 / 2 * np.sum(theta**2) + 0.25 * np.abs(theta).sum()))
    assert obj.objective(w) == pytest.approx(expected, rel=1e-12)


def test_objective_block_sums_add_up():
    """The unnormalised block sums of two halves add up to the whole (what the Dask back-end relies on)."""
    rng = np.random.default_rng(2)
    X, y, s = rng.standard_normal((50, 6)), rng.integers(0, 3, 50), rng.random(50)
    whole = LinearSoftmaxObjective(X, y, 3, s, alpha=0.1)
    w, v = rng.standard_normal(whole.n_coef), rng.standard_normal(whole.n_coef)
    halves = [LinearSoftmaxObjective(X[sl], y[sl], 3, s[sl], alpha=0.1)
              for sl in (slice(0, 17), slice(17, 50))]
    loss = sum(h.data_sums(w)[0] for h in halves)
    grad = sum(h.data_sums(w)[1] for h in halves)
    f, g = whole.finish(loss, grad, w, weight_sum=s.sum())
    f_ref, g_ref = whole.loss_gradient(w)
    assert f == pytest.approx(f_ref, rel=1e-13)
    np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-14)
    hv = sum(h.data_hessp_sum(w, v) for h in halves) / s.sum()
    np.testing.assert_allclose(hv + 0.1 * np.r_[v[:18], np.zeros(3)], whole.hessp(w, v), rtol=1e-11)


def test_hessp_cache_follows_the_point():
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((30, 4)), rng.integers(0, 3, 30)
    obj = LinearSoftmaxObjective(X, y, 3, alpha=0.1)
    w1, w2, v = (rng.standard_normal(obj.n_coef) for _ in range(3))
    h1 = obj.hessp(w1, v)
    h2 = obj.hessp(w2, v)
    fresh = LinearSoftmaxObjective(X, y, 3, alpha=0.1)
    np.testing.assert_allclose(h2, fresh.hessp(w2, v), rtol=1e-12)
    assert not np.allclose(h1, h2)


# ------------------------------------------------------------------------------ the options
def test_l1_gives_exact_zeros_and_beats_sklearn_saga():
    X, y, _ = _generated()
    alpha, l1_ratio = 2e-2, 1.0
    m = SoftmaxRegression(alpha=alpha, l1_ratio=l1_ratio, tol=1e-9, max_iter=20000).fit(X, y)
    assert m.solver_ == "proximal"
    assert np.sum(m.coef_ == 0) > 0.2 * m.coef_.size
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = LogisticRegression(C=1 / (alpha * len(y)), l1_ratio=l1_ratio, solver="saga", tol=1e-8,
                                max_iter=3000).fit(X, y)
    f_sk = _objective_of(X, y, sk.classes_, sk.coef_, sk.intercept_, alpha, l1_ratio)
    assert m.objective_ <= f_sk * (1 + 1e-6)


def test_string_labels_and_binary_keeps_two_columns():
    X, y = make_classification(n_samples=200, n_features=5, random_state=0)
    labels = np.array(["cat", "dog"])[y]
    m = SoftmaxRegression(alpha=1e-2).fit(X, labels)
    assert m.coef_.shape == (2, 5) and m.intercept_.shape == (2,)
    assert set(m.predict(X)) <= {"cat", "dog"}
    proba = m.predict_proba(X)
    assert proba.shape == (200, 2)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    d = m.decision_function(X)
    assert d.shape == (200,)
    np.testing.assert_allclose(d, np.log(proba[:, 1]) - np.log(proba[:, 0]), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(m.predict_log_proba(X), np.log(proba), rtol=1e-9, atol=1e-12)


def test_class_weight_equals_sample_weight():
    X, y, alpha = _generated()
    cw = {c: 1.0 + c for c in range(10)}
    a = SoftmaxRegression(alpha=alpha, class_weight=cw, tol=1e-10).fit(X, y)
    b = SoftmaxRegression(alpha=alpha, tol=1e-10).fit(X, y, sample_weight=1.0 + y)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-6, atol=1e-8)
    bal = SoftmaxRegression(alpha=alpha, class_weight="balanced", tol=1e-8).fit(X, y)
    assert bal.score(X, y) > 0.5


def test_sample_weight_integer_equals_repeating_rows():
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((60, 5)), rng.integers(0, 3, 60)
    sw = rng.integers(0, 4, 60)
    a = SoftmaxRegression(alpha=1e-2, solver="newton-cg", tol=1e-10).fit(X, y, sample_weight=sw)
    b = SoftmaxRegression(alpha=1e-2, solver="newton-cg", tol=1e-10).fit(X.repeat(sw, 0), y.repeat(sw))
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-8, atol=1e-10)


def test_callback_sees_every_iteration_and_can_stop():
    X, y, alpha = _digits()
    seen = []
    m = SoftmaxRegression(alpha=alpha, callback=lambda info: seen.append(info) or False).fit(X, y)
    assert len(seen) == m.n_iter_ == len(m.loss_curve_)
    assert [i.iteration for i in seen] == list(range(1, len(seen) + 1))
    assert all(np.isfinite(i.grad_norm) and i.elapsed >= 0 for i in seen)
    assert np.all(np.diff(m.loss_curve_) <= 1e-12)  # L-BFGS with a line search only goes down
    assert seen[-1].coef.shape == (10, 64) and seen[-1].intercept.shape == (10,)
    stopped = SoftmaxRegression(alpha=alpha, callback=lambda info: info.iteration >= 3).fit(X, y)
    assert stopped.n_iter_ == 3


def test_keyboard_interrupt_keeps_last_iterate():
    X, y, alpha = _digits()
    kept = {}

    def interrupt(info):
        if info.iteration == 5:
            kept["coef"] = info.coef.copy()
            raise KeyboardInterrupt

    m = SoftmaxRegression(alpha=alpha, callback=interrupt)
    with pytest.raises(KeyboardInterrupt):
        m.fit(X, y)
    assert m.interrupted_ and m.n_iter_ == 5
    np.testing.assert_allclose(m.coef_, kept["coef"])
    assert m.predict(X).shape == y.shape  # usable
    # and resuming from it with warm_start reaches the optimum
    m.set_params(callback=None, warm_start=True, tol=1e-9)
    m.fit(X, y)
    assert not m.interrupted_
    assert abs(m.objective_ - _sklearn_optimum("digits")) <= 1e-6 * m.objective_


def test_warm_start_from_the_optimum_stops_at_once():
    X, y, alpha = _digits()
    m = SoftmaxRegression(alpha=alpha, solver="newton-cg", tol=1e-8).fit(X, y)
    m.set_params(warm_start=True)
    m.fit(X, y)
    assert m.n_iter_ <= 1


def test_partial_fit_streams_and_checks_labels():
    X, y, alpha = _digits()
    m = SoftmaxRegression(alpha=alpha, solver="adam", learning_rate=1e-2, random_state=0)
    with pytest.raises(ValueError, match="classes must be passed"):
        m.partial_fit(X[:100], y[:100])
    losses = []
    for epoch in range(5):
        for start in range(0, len(y), 400):
            m.partial_fit(X[start:start + 400], y[start:start + 400], classes=np.arange(10))
        losses.append(m.objective_)
    assert m.score(X, y) > 0.85
    with pytest.raises(ValueError, match=r"labels \[42\]"):
        m.partial_fit(X[:3], np.array([0, 1, 42]))


def test_convergence_warning_says_what_to_try():
    X, y, _ = _digits()
    norms = []
    with pytest.warns(ConvergenceWarning, match=r"gradient's max-norm is \S+, above tol=1e-06.*max_iter.*"
                                                  r"newton-cg.*scaling them") as record:
        SoftmaxRegression(alpha=1e-6, max_iter=3, callback=lambda info: norms.append(info.grad_norm)).fit(X * 16, y)
    assert record[0].filename == __file__  # the warning points at the caller's fit(), not inside softxent
    # the reported max-norm is the final iterate's (the criterion the solvers share), as the callback saw it
    reported = float(re.search(r"max-norm is (\S+),", str(record[0].message)).group(1))
    assert reported == pytest.approx(norms[-1], rel=1e-2) and reported > 1e-6


@pytest.mark.parametrize("solver", FULL_BATCH + MINIBATCH)
def test_every_solver_warns_when_it_runs_out_of_iterations(solver):
    """No solver stops silently short of tol (sklearn #10866): the warning names the solver and
    max_iter, says what to try, and points at the caller's line."""
    X, y, _ = _digits()
    kw = {"l1_ratio": 0.5} if solver == "proximal" else {}
    with pytest.warns(ConvergenceWarning,
                      match=rf"solver='{solver}'\) did not converge within max_iter=2 .*scaling them"
                      ) as record:
        m = SoftmaxRegression(alpha=1e-6, solver=solver, max_iter=2, tol=1e-12, **kw).fit(X * 16, y)
    assert record[0].filename == __file__
    assert m.n_iter_ == 2


@pytest.mark.parametrize("solver", ["lbfgs", "newton-cg"])
def test_unscaled_separable_data_gives_finite_probabilities(solver):
    """No penalty, separable, unscaled: the optimum is at infinity.  A fit either stops legitimately --
    the gradient below tol, or (L-BFGS-B's ftol rule, as in scikit-learn) the loss so small that no
    step changes it at float64 resolution -- or warns with what to try; either way the probabilities
    are finite and sum to 1.  (1 random draw in ~25 reaches loss ~1e-13 within 2 lbfgs steps.)"""
    rng = np.random.default_rng()
    X = rng.standard_normal((100, 3)) * 1e3
    y = (X[:, 0] > 0).astype(int)
    for max_iter, tol in ((3, 1e-14), (50, 1e-4)):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            m = SoftmaxRegression(alpha=0.0, solver=solver, max_iter=max_iter, tol=tol).fit(X, y)
        warned = [w for w in record if issubclass(w.category, ConvergenceWarning)]
        obj = LinearSoftmaxObjective(X, y, 2)
        loss, g = obj.loss_gradient(obj.pack(m.coef_, m.intercept_))
        if warned:
            assert "scaling them" in str(warned[0].message)
        else:
            assert np.abs(g).max() <= 10 * tol or loss <= 1e-9, (np.abs(g).max(), loss, m.n_iter_)
        proba = m.predict_proba(X)
        assert np.all(np.isfinite(proba)) and np.all(np.isfinite(m.coef_))
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    assert m.score(X, y) == 1.0


@pytest.mark.parametrize("solver", FULL_BATCH)
def test_fit_intercept_false_reaches_sklearn_optimum(solver):
    """fit_intercept=False: intercept_ is all zeros and the objective (no intercept) equals
    scikit-learn's LogisticRegression(fit_intercept=False) optimum within 1e-6."""
    X, y, alpha = _generated()
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sk = LogisticRegression(C=1.0 / (alpha * len(y)), fit_intercept=False, tol=1e-10, max_iter=20000).fit(X, y)
    classes = sk.classes_
    obj = LinearSoftmaxObjective(X, np.searchsorted(classes, y), len(classes), alpha=alpha, fit_intercept=False)
    best = obj.objective(obj.pack(sk.coef_))
    m = SoftmaxRegression(alpha=alpha, solver=solver, fit_intercept=False, tol=1e-8, max_iter=5000).fit(X, y)
    np.testing.assert_array_equal(m.intercept_, np.zeros(len(classes)))
    assert obj.objective(obj.pack(m.coef_)) <= best * (1 + 1e-6)
    np.testing.assert_allclose(m.decision_function(X), X @ m.coef_.T, rtol=1e-12, atol=1e-12)


def test_read_only_float32_csr_and_memmap_are_accepted(tmp_path):
    """Read-only inputs (sklearn #15924: a float32 CSR whose upcast wrote into a read-only memmap):
    fit and predict read them without writing, and give the same model as writable copies."""
    rng = np.random.default_rng()
    X, y, _ = _generated()
    X = X.astype(np.float32)
    X[rng.random(X.shape) < 0.7] = 0
    Xs = sp.csr_matrix(X)
    for a in (Xs.data, Xs.indices, Xs.indptr):
        a.flags.writeable = False
    path = tmp_path / "X.npy"
    np.save(path, X)
    Xm = np.load(path, mmap_mode="r")
    ref = SoftmaxRegression(alpha=1e-3, solver="newton-cg", tol=1e-8).fit(sp.csr_matrix(X.copy()), y)
    for X_ro in (Xs, Xm):
        m = SoftmaxRegression(alpha=1e-3, solver="newton-cg", tol=1e-8).fit(X_ro, y)
        np.testing.assert_allclose(m.coef_, ref.coef_, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(m.predict(X_ro), ref.predict(X))


# ------------------------------------------------------------------------------- bad input
def test_bad_input_gets_sklearn_errors():
    X, y, _ = _generated()
    with pytest.raises(ValueError, match="only one class: 3"):
        SoftmaxRegression().fit(X, np.full(len(y), 3))
    Xn = X.copy()
    Xn[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SoftmaxRegression().fit(Xn, y)
    Xi = X.copy()
    Xi[0, 0] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        SoftmaxRegression().fit(Xi, y)
    with pytest.raises(NotFittedError):
        SoftmaxRegression().predict(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m = SoftmaxRegression(max_iter=20).fit(X, y)
    with pytest.raises(ValueError, match="20 features"):
        m.predict(X[:, :5])
    with pytest.raises(ValueError, match=r"sample_weight.shape == \(5,\), expected \(600,\)"):
        SoftmaxRegression().fit(X, y, sample_weight=np.ones(5))
    with pytest.raises(ValueError, match="[Nn]egative"):
        SoftmaxRegression().fit(X, y, sample_weight=-np.ones(len(y)))
    with pytest.raises(ValueError, match="at least one non-zero"):
        SoftmaxRegression().fit(X, y, sample_weight=np.zeros(len(y)))
    with pytest.raises(ValueError, match="Unknown label type"):
        SoftmaxRegression().fit(X, np.linspace(0, 1, len(y)))
    with pytest.raises(ValueError, match=r"solver='lbfgs' handles only the L2 penalty"):
        SoftmaxRegression(solver="lbfgs", l1_ratio=0.5).fit(X, y)
    with pytest.raises(ValueError, match="'alpha' parameter"):
        SoftmaxRegression(alpha=-1).fit(X, y)
    with pytest.raises(ValueError, match="'solver' parameter"):
        SoftmaxRegression(solver="bfgs").fit(X, y)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_objective_row_blocks_equal_one_block(dtype, fit_intercept):
    """data_sums in cache-sized row blocks (uneven last block) equals the whole-matrix computation."""
    rng = np.random.default_rng(6)
    X = rng.standard_normal((1000, 30)).astype(dtype)
    y, s = rng.integers(0, 6, 1000), rng.random(1000)
    blocked = LinearSoftmaxObjective(X, y, 6, s, alpha=0.1, fit_intercept=fit_intercept)
    blocked.BLOCK_BYTES = 64 * 30 * X.itemsize + 5   # 64-row blocks: 15 full ones and a short one
    whole = LinearSoftmaxObjective(X, y, 6, s, alpha=0.1, fit_intercept=fit_intercept)
    whole.BLOCK_BYTES = 1 << 40
    assert [b.stop - b.start for b in blocked.row_blocks()] == [64] * 15 + [40]
    assert len(whole.row_blocks()) == 1
    w = rng.standard_normal(blocked.n_coef)
    fb, gb = blocked.loss_gradient(w)
    fw, gw = whole.loss_gradient(w)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    assert fb == pytest.approx(fw, rel=rtol)
    np.testing.assert_allclose(gb, gw, rtol=rtol, atol=rtol * np.abs(gw).max())
    assert blocked.loss(w) == pytest.approx(fw, rel=rtol)
    # both against the formula written out in float64: E = sum s CE / S + penalty, grad = [delta^T X, sum delta]
    theta = w[:6 * 30].reshape(6, 30)
    b = w[6 * 30:] if fit_intercept else np.zeros(6)
    z = X.astype(np.float64) @ theta.T + b
    ce, dz = cross_entropy_with_grad(z, y, sample_weight=s, reduction="none")
    f_ref = ce.sum() / s.sum() + 0.05 * np.sum(theta ** 2)
    g_ref = np.concatenate([(dz.T @ X.astype(np.float64)).ravel() / s.sum() + 0.1 * theta.ravel()]
                           + ([dz.sum(axis=0) / s.sum()] if fit_intercept else []))
    for f, g in ((fb, gb), (fw, gw)):
        assert f == pytest.approx(f_ref, rel=rtol)
        np.testing.assert_allclose(g, g_ref, rtol=rtol, atol=rtol * np.abs(g_ref).max())
    v = rng.standard_normal(blocked.n_coef)
    eps = 1e-6
    hv_fd = (whole.loss_gradient(w + eps * v)[1] - whole.loss_gradient(w - eps * v)[1]) / (2 * eps)
    if dtype == np.float64:
        np.testing.assert_allclose(whole.hessp(w, v), hv_fd, rtol=1e-6, atol=1e-7 * np.abs(hv_fd).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sparse_objective_equals_dense(dtype):
    """Sparse X (products through the cached X^T, forward as its CSC view) gives the dense numbers."""
    rng = np.random.default_rng(11)
    X = (rng.standard_normal((300, 50)) * (rng.random((300, 50)) < 0.1)).astype(dtype)
    y, s = rng.integers(0, 5, 300), rng.random(300)
    dense = LinearSoftmaxObjective(X, y, 5, s, alpha=0.1)
    sparse = LinearSoftmaxObjective(sp.csr_matrix(X), y, 5, s, alpha=0.1)
    w, v = rng.standard_normal(dense.n_coef), rng.standard_normal(dense.n_coef)
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(sparse.decision_function(w), dense.decision_function(w), rtol=rtol, atol=rtol)
    (fs, gs), (fd, gd) = sparse.loss_gradient(w), dense.loss_gradient(w)
    assert fs == pytest.approx(fd, rel=rtol)
    np.testing.assert_allclose(gs, gd, rtol=rtol, atol=rtol * np.abs(gd).max())
    np.testing.assert_allclose(sparse.hessp(w, v), dense.hessp(w, v), rtol=rtol, atol=rtol * 10)
    # a float32 direction gets a float32 product (Newton-CG's CG on float32 data), the same numbers
    hv64 = dense.hessp(w, v)
    for obj in (sparse, dense):
        hv32 = obj.hessp(w, v.astype(np.float32))
        assert hv32.dtype == np.float32
        np.testing.assert_allclose(hv32, hv64, rtol=2e-5, atol=2e-5 * np.abs(hv64).max())
    # the Hessian diagonal (sparse: from the cached, squared X^T), twice at two points (the cache must not
    # go stale), against sum_i (s_i/S) h_ik (1 - h_ik) x_ij^2 + alpha written out in float64
    for point in (w, v):
        h = dense.decision_function(point).astype(np.float64)
        h = np.exp(h - h.max(axis=1, keepdims=True))
        h /= h.sum(axis=1, keepdims=True)
        a = h * (1 - h) * (s / s.sum())[:, None]
        Xd = X.astype(np.float64)
        expected = np.concatenate([(a.T @ (Xd * Xd)).ravel() + 0.1, a.sum(axis=0)])
        np.testing.assert_allclose(sparse.hessian_diag(point), expected, rtol=rtol * 10, atol=1e-12)
        np.testing.assert_allclose(dense.hessian_diag(point), expected, rtol=rtol * 10, atol=1e-12)
    # the Lipschitz bound (sparse: row sums of the same cached squares) against 1/2 max ||x_i||^2 + 1/2 + alpha
    bound = 0.5 * (float(np.max((X.astype(np.float64) ** 2).sum(axis=1))) + 1.0) + 0.1
    assert sparse.lipschitz_bound() == pytest.approx(bound, rel=rtol * 10)
    assert dense.lipschitz_bound() == pytest.approx(bound, rel=rtol * 10)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_pack_lays_out_any_theta_in_one_vector(fit_intercept):
    """pack takes float32, transposed views and flat input alike; unpack inverts it."""
    rng = np.random.default_rng(5)
    obj = LinearSoftmaxObjective(np.zeros((1, 7)), np.zeros(1, dtype=int), 3, fit_intercept=fit_intercept)
    theta, b = rng.standard_normal((3, 7)), rng.standard_normal(3)
    w = obj.pack(theta, b)
    assert w.dtype == np.float64 and w.shape == (obj.n_coef,)
    t2, b2 = obj.unpack(w)
    np.testing.assert_array_equal(t2, theta)
    if fit_intercept:
        np.testing.assert_array_equal(b2, b)
        np.testing.assert_array_equal(obj.pack(theta)[-3:], 0.0)
    else:
        assert b2 is None
    np.testing.assert_array_equal(obj.pack(np.asfortranarray(theta), b), w)  # a transposed layout
    np.testing.assert_array_equal(obj.pack(theta.ravel(), b), w)
    np.testing.assert_array_equal(obj.pack(theta.astype(np.float32), b), obj.pack(theta.astype(np.float32)
                                                                                  .astype(np.float64), b))

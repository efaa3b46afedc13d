"""Newton-CG's preconditioners: the features' Gram (dense X) and the Hessian's diagonal."""

import numpy as np
import pytest
import scipy.sparse as sp

from softxent import SoftmaxRegression
from softxent.objective import LinearSoftmaxObjective
from softxent.solvers import _DiagonalPreconditioner, _gram_eig, _GramPreconditioner, _steihaug_cg


def _explicit_gram(X, s, fit_intercept):
    Xt = np.hstack([X, np.ones((X.shape[0], 1))]) if fit_intercept else X
    return (Xt * s[:, None]).T @ Xt, s.sum()


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_data_gram_sum_all_rows_and_strided(fit_intercept, dtype):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((5000, 7)).astype(dtype)
    s = rng.random(5000) + 0.1
    obj = LinearSoftmaxObjective(X, rng.integers(0, 3, 5000), 3, s, fit_intercept=fit_intercept)
    gram, weight = obj.data_gram_sum()
    ref, ref_w = _explicit_gram(X.astype(np.float64), s.astype(dtype).astype(np.float64), fit_intercept)
    np.testing.assert_allclose(gram, ref, rtol=1e-10 if dtype == np.float64 else 1e-6)
    assert weight == pytest.approx(ref_w, rel=1e-12 if dtype == np.float64 else 1e-6)
    # at most max_rows rows: every ceil(N / max_rows)-th one
    gram_s, weight_s = obj.data_gram_sum(1000)
    rows = np.arange(0, 5000, 5)
    ref_s, ref_ws = _explicit_gram(X[rows].astype(np.float64), s[rows].astype(dtype).astype(np.float64),
                                   fit_intercept)
    np.testing.assert_allclose(gram_s, ref_s, rtol=1e-10 if dtype == np.float64 else 1e-6)
    assert weight_s == pytest.approx(ref_ws, rel=1e-6)
    # none for sparse X or too many columns: Newton-CG falls back to the diagonal
    assert LinearSoftmaxObjective(sp.csr_matrix(X), np.zeros(5000, int), 3).data_gram_sum() is None
    wide = LinearSoftmaxObjective(X, np.zeros(5000, int), 3)
    wide.GRAM_MAX_FEATURES = 6
    assert wide.data_gram_sum() is None and _gram_eig(wide) is None


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_gram_preconditioner_is_the_block_diagonal_matrix_it_claims(fit_intercept):
    """M = blockdiag_k(c_k Gt + l2 I) with c_k from the Hessian diagonal; solve is its inverse."""
    rng = np.random.default_rng(2)
    N, D, K, l2 = 400, 6, 4, 0.05
    X = rng.standard_normal((N, D)) @ rng.standard_normal((D, D))  # correlated columns
    obj = LinearSoftmaxObjective(X, rng.integers(0, K, N), K, alpha=l2, fit_intercept=fit_intercept)
    w = rng.standard_normal(obj.n_coef) * 0.3
    m = obj.hessian_diag(w)
    P = _GramPreconditioner(_gram_eig(obj), m, l2, K, D, fit_intercept)
    Gt = _explicit_gram(X, np.ones(N), fit_intercept)[0] / N
    Dt = Gt.shape[0]
    data = m[: K * D].reshape(K, D).sum(1) - l2 * D + (m[K * D:] if fit_intercept else 0)
    c = data / np.trace(Gt)
    blocks = [c[k] * Gt + l2 * np.eye(Dt) for k in range(K)]
    v = rng.standard_normal(obj.n_coef)
    V = v[: K * D].reshape(K, D)
    Vt = np.hstack([V, v[K * D:, None]]) if fit_intercept else V
    MV = np.stack([blocks[k] @ Vt[k] for k in range(K)])
    expect = np.concatenate([MV[:, :D].ravel()] + ([MV[:, D]] if fit_intercept else []))
    np.testing.assert_allclose(P.apply(v), expect, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(P.solve(P.apply(v)), v, rtol=1e-8, atol=1e-10)
    d = _DiagonalPreconditioner(m)
    np.testing.assert_allclose(d.solve(d.apply(v)), v)


def test_gram_preconditioner_needs_fewer_hessian_products_on_correlated_features(monkeypatch):
    """make_classification's features are correlated, and its 'redundant' ones exactly collinear, so
    some directions have curvature alpha alone: the diagonal cannot see that, the Gram can.  Counted:
    Hessian products until the objective is within 1e-6 of the optimum (152 vs 701 when written)."""
    from sklearn.datasets import make_classification

    X, y = make_classification(4000, 200, n_informative=30, n_redundant=10, n_classes=10, class_sep=2,
                               random_state=0)
    calls = {"n": 0}
    hessp = LinearSoftmaxObjective.hessp

    def counting(self, w, v):
        calls["n"] += 1
        return hessp(self, w, v)

    monkeypatch.setattr(LinearSoftmaxObjective, "hessp", counting)
    runs = {}
    for name, max_features in (("gram", 4096), ("diagonal", 0)):
        monkeypatch.setattr(LinearSoftmaxObjective, "GRAM_MAX_FEATURES", max_features)
        calls["n"] = 0
        trajectory = []
        m = SoftmaxRegression(alpha=1e-4, solver="newton-cg", tol=1e-7, max_iter=200,
                              callback=lambda info: trajectory.append((info.objective, calls["n"]))).fit(X, y)
        runs[name] = (m.objective_, trajectory)
    best = min(r[0] for r in runs.values())
    assert runs["gram"][0] == pytest.approx(runs["diagonal"][0], rel=1e-8)
    to_target = {name: next(n for f, n in traj if f <= best * (1 + 1e-6)) for name, (_, traj) in runs.items()}
    assert to_target["gram"] < 0.5 * to_target["diagonal"], to_target


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", ["interior", "boundary", "negative curvature"])
def test_steihaug_cg_against_dense_linear_algebra(case, dtype):
    """The in-place CG: inside the region it returns the Newton step -H^-1 g; on the boundary a step of
    M-norm = radius that lowers the model; always r = g + H p (from which the solver reads q(p)).  A
    float32 g runs the whole CG in float32 (a float64 H v is cast), to float32's accuracy."""
    rng = np.random.default_rng({"interior": 0, "boundary": 1, "negative curvature": 2}[case])
    n = 40
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    eig = rng.uniform(0.1, 10.0, n)
    if case == "negative curvature":
        eig[:3] = -rng.uniform(0.5, 2.0, 3)
    H = (Q * eig) @ Q.T
    g = rng.standard_normal(n)
    m = rng.uniform(0.5, 2.0, n)  # a diagonal M
    newton = -np.linalg.solve(H, g)
    newton_norm = np.sqrt(newton @ (m * newton))
    radius = 10 * newton_norm if case == "interior" else 0.3 * newton_norm
    single = dtype == np.float32
    tol = 1e-5 if single else 1e-12
    p, r, boundary = _steihaug_cg(lambda v: H @ v, g.astype(dtype), _DiagonalPreconditioner(m.astype(dtype)),
                                  radius, tol, 10 * n)
    assert p.dtype == dtype and r.dtype == dtype
    p64 = p.astype(np.float64)
    np.testing.assert_allclose(r, g + H @ p64, atol=1e-4 if single else 1e-9)
    if case == "interior":
        assert not boundary
        np.testing.assert_allclose(p64, newton, rtol=1e-4 if single else 1e-8, atol=1e-5 if single else 1e-10)
    else:
        assert boundary
        assert np.sqrt(p64 @ (m * p64)) == pytest.approx(radius, rel=1e-5 if single else 1e-9)
        assert g @ p64 + 0.5 * p64 @ H @ p64 < 0


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kept_probabilities_serve_the_hessian_at_that_point_only(sparse, dtype, monkeypatch):
    """``loss_gradient(w, keep_proba=True)`` keeps h(z) at w: the Hessian product and diagonal at w then
    take no further ``X Theta^T``, and equal those of a fresh objective; at another point they do not
    use it.  Newton-CG asks for it at every iterate."""
    rng = np.random.default_rng()
    N, D, K = 60, 9, 4
    X = rng.standard_normal((N, D)).astype(dtype)
    if sparse:
        X[rng.random((N, D)) < 0.6] = 0
        X = sp.csr_matrix(X)
    y = rng.integers(0, K, N)
    s = rng.uniform(0, 2, N)
    s[:5] = 0  # rows of weight zero: their (arbitrary) probabilities must not matter
    w, w2, v = (rng.standard_normal(K * D + K) for _ in range(3))

    def objective():
        return LinearSoftmaxObjective(X, y, K, s, alpha=0.1)

    fresh = objective()
    expected = fresh.hessp(w, v), fresh.hessian_diag(w)
    obj = objective()
    obj.loss_gradient(w2)  # without keep_proba nothing is kept
    assert obj._hess_cache is None
    obj.loss_gradient(w, keep_proba=True)
    calls = {"n": 0}
    logits = LinearSoftmaxObjective._logits  # every product x Theta^T (or x V^T) of a block goes through it

    def counting(self, *args):
        calls["n"] += 1
        return logits(self, *args)

    monkeypatch.setattr(LinearSoftmaxObjective, "_logits", counting)
    hv, hd = obj.hessp(w, v), obj.hessian_diag(w)
    assert calls["n"] == 1  # the product X V^T of hessp; none for h(z) at w
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(hv, expected[0], rtol=rtol, atol=rtol * np.abs(expected[0]).max())
    np.testing.assert_allclose(hd, expected[1], rtol=rtol)
    expected2 = fresh.hessp(w2, v)
    calls["n"] = 0
    np.testing.assert_allclose(obj.hessp(w2, v), expected2, rtol=rtol, atol=rtol * np.abs(expected2).max())
    assert calls["n"] == 2  # h at w2 had to be computed

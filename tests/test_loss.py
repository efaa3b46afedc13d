"""Properties of the NumPy reference cross-entropy (softxent.loss) on random inputs with every option.

Each hypothesis example draws a shape, an option set, a dtype where the property holds in both, and a
seed; the arrays come from that seed.  The oracles are independent of softxent's code path: central finite differences (the gradient),
PyTorch's ``F.cross_entropy`` with autograd in float64 (the loss and gradient; ``sample_weight``,
``z_loss`` and ``softcap`` rebuilt on the torch side from their definitions), and algebraic identities
(one-hot == index targets, 'none' vs 'mean' / 'sum', shift invariance, float32 vs float64).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import softxent
from softxent import cross_entropy, cross_entropy_with_grad, log_softmax, logsumexp, softmax

EPS32 = float(np.finfo(np.float32).eps)
LEAD_SHAPES = [(), (0,), (1,), (4,), (7,), (2, 3), (2, 0)]
CLASS_COUNTS = [1, 2, 3, 5, 8, 50]       # 50: room for ignore_index=42 inside [0, K)


@dataclass
class Case:
    """One random problem: logits ``(..., K)``, targets, options, reduction, upstream gradient."""

    z: np.ndarray
    target: np.ndarray
    opts: dict = field(default_factory=dict)
    reduction: str = "mean"
    grad_output: object = 1.0

    @property
    def K(self) -> int:
        return self.z.shape[-1]

    @property
    def lead(self) -> tuple:
        return self.z.shape[:-1]

    @property
    def eps(self) -> float:
        return float(np.finfo(self.z.dtype).eps)

    @property
    def is_index(self) -> bool:
        return self.target.dtype.kind in "iu"

    def kwargs(self, **over) -> dict:
        return {**self.opts, "reduction": self.reduction, **over}

    def omega(self) -> np.ndarray:
        """Each row's weight in the 'mean' denominator, from the definition (PyTorch's convention)."""
        s = np.ones(self.lead) if self.opts.get("sample_weight") is None else self.opts["sample_weight"]
        if not self.is_index:
            return s
        w = self.opts.get("weight")
        valid = self.target != self.opts.get("ignore_index", -100)
        wy = 1.0 if w is None else w[np.where(valid, self.target, 0)]
        return np.where(valid, s * wy, 0.0)

    def target_mass(self) -> np.ndarray:
        """An upper bound ``b_i >= sum_k B_ik`` of each row's (weighted, smoothed) target mass."""
        s = np.ones(self.lead) if self.opts.get("sample_weight") is None else self.opts["sample_weight"]
        w = self.opts.get("weight")
        wmax = 1.0 if w is None else float(np.max(w))
        if not self.is_index:
            return s * wmax * np.maximum(self.target.sum(-1), 1.0)
        if self.opts.get("label_smoothing", 0.0) > 0:
            return s * wmax
        return np.where(self.target != self.opts.get("ignore_index", -100), s, 0.0) * wmax

    def row_factor(self) -> np.ndarray:
        """``|r_i|``: the factor that grad_output and the reduction put in front of row i's gradient."""
        r = np.broadcast_to(np.abs(np.asarray(self.grad_output, dtype=float)), self.lead)
        if self.reduction == "mean":
            denom = self.omega().sum()
            r = r / denom if denom > 0 else 0 * r
        return r


@st.composite
def cases(draw, *, target_kind=None, options=True, z_loss=True, softcap=True, reductions=None,
          lead_shapes=None, class_counts=None, dtypes=(np.float64,)):
    """A random :class:`Case`; ``target_kind`` 'index' / 'proba' / None (either)."""
    K = draw(st.sampled_from(class_counts or CLASS_COUNTS))
    lead = draw(st.sampled_from(lead_shapes or LEAD_SHAPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = target_kind or draw(st.sampled_from(["index", "proba"]))
    z = 3.0 * rng.standard_normal(lead + (K,))
    opts = {}
    if kind == "index":
        target = rng.integers(0, K, lead)
        if options and draw(st.booleans()):
            ii = draw(st.sampled_from([-100, -1, "inside"]))
            ii = (42 if K > 42 else min(1, K - 1)) if ii == "inside" else ii
            opts["ignore_index"] = ii
            target = np.where(rng.random(lead) < 0.3, ii, target)
    else:
        target = rng.random(lead + (K,)) * (rng.random(lead + (K,)) < 0.7)   # some exact zeros
        if draw(st.booleans()):
            target /= np.maximum(target.sum(-1, keepdims=True), 1e-12)      # rows summing to 1 (or 0)
    if options:
        if draw(st.booleans()):
            opts["weight"] = rng.uniform(0.0, 2.0, K) * (rng.random(K) < 0.8)
        if draw(st.booleans()):
            opts["sample_weight"] = rng.uniform(0.0, 2.0, lead) * (rng.random(lead) < 0.8)
        opts["label_smoothing"] = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0]))
        if z_loss:
            opts["z_loss"] = draw(st.sampled_from([0.0, 0.0, 1e-2, 0.5]))
        if softcap:
            opts["softcap"] = draw(st.sampled_from([None, None, 2.0, 10.0]))
    reduction = draw(st.sampled_from(reductions or ["none", "mean", "sum"]))
    if reduction == "none":
        grad_output = rng.standard_normal(lead)
    else:
        grad_output = draw(st.sampled_from([1.0, 0.7, -2.5]))
    return Case(z.astype(draw(st.sampled_from(dtypes))), target, opts, reduction, grad_output)


BOTH = (np.float32, np.float64)


def rounding_bounds(case: Case, eps: float, extra_magnitude: float = 0.0):
    """Per-row bounds on the rounding error of the loss and of the gradient (before ``|r_i|``).

    Row i's loss is ``sum_k B_ik (lse_i - z_ik) + z_loss omega_i lse_i**2``; each term is computed from
    logits of size up to ``Z_i = max_k |z_ik| + log K (+ extra_magnitude)`` with relative error ~eps, so
    its absolute error is ~eps * b_i * Z_i (``b_i >= sum_k B_ik``) plus ~eps * z_loss * omega_i * Z_i**2.
    The gradient entries ``r_i (a_i h_ik - B_ik)`` carry ~eps * |r_i| (b_i + z_loss omega_i Z_i) * Z_i
    (exp's argument).
    """
    b = case.target_mass()
    zmag = (np.max(np.abs(case.z.astype(np.float64)), axis=-1, initial=0.0) + np.log(case.K) + 1.0
            + extra_magnitude)
    zl = case.opts.get("z_loss", 0.0)
    omega = case.omega()
    c = 4 * eps          # measured errors stay below ~0.3 of this bound over thousands of draws
    return c * (b * zmag + zl * omega * zmag**2), c * (b + zl * omega * zmag) * zmag


def reduced_loss_bound(case: Case, loss_row: np.ndarray, loss: np.ndarray, eps: float):
    """The per-row bound reduced like the loss, plus the rounding of the result itself."""
    if case.reduction == "none":
        return loss_row + eps * np.abs(loss)
    if case.reduction == "sum":
        return loss_row.sum() + eps * np.abs(loss)
    denom = case.omega().sum()
    return (loss_row.sum() / denom if denom > 0 else 0.0) + eps * np.abs(loss)


def assert_within_rounding(case: Case, got, ref, eps: float, factor: float = 1.0,
                           extra_magnitude: float = 0.0):
    """``got`` and ``ref`` = (loss, grad) agree to ``factor`` times the rounding bounds above."""
    loss_row, grad_row = rounding_bounds(case, eps, extra_magnitude)
    l_got, l_ref = np.asarray(got[0], np.float64), np.asarray(ref[0], np.float64)
    tol = factor * reduced_loss_bound(case, loss_row, l_ref, eps)
    assert np.all(np.abs(l_got - l_ref) <= tol), np.max((np.abs(l_got - l_ref) / tol))
    if len(got) > 1:
        g_got, g_ref = np.asarray(got[1], np.float64), np.asarray(ref[1], np.float64)
        tol = factor * ((case.row_factor() * grad_row)[..., None] + eps * np.abs(g_ref))
        assert np.all(np.abs(g_got - g_ref) <= tol), np.max(np.abs(g_got - g_ref) / tol)


def scaled_loss(case: Case, z: np.ndarray) -> float:
    """``<grad_output, loss(z)>``: the scalar whose gradient is ``cross_entropy_with_grad(...)[1]``."""
    loss = cross_entropy(z, case.target, **case.kwargs())
    return float(np.sum(case.grad_output * loss))


# --------------------------------------------------------------------------------------------------
# the gradient
# --------------------------------------------------------------------------------------------------
@given(cases())
def test_gradient_matches_finite_differences(case):
    """dE/dz from cross_entropy_with_grad == 4th-order central differences of cross_entropy (float64)."""
    _, grad = cross_entropy_with_grad(case.z, case.target, grad_output=case.grad_output, **case.kwargs())
    assert grad.shape == case.z.shape and grad.dtype == np.float64
    if case.z.size == 0:
        return
    # A known linear term a.z keeps the relative error meaningful where dE/dz is exactly 0 (K = 1, every
    # row ignored or weighted 0): the error is then measured against |a| = 1e-3.
    a = 1e-3 * np.random.default_rng(0).uniform(0.5, 1.0, case.z.shape)
    err = softxent.gradcheck(lambda v: scaled_loss(case, v) + float(np.sum(a * v)), case.z,
                             lambda _v: grad + a, n_checks=16, random_state=0)
    # a wrong gradient gives errors of order 1 (see test_gradcheck.py); FD noise here is ~1e-10
    assert err < 1e-7, (err, case.opts, case.reduction)


@given(cases(softcap=False, z_loss=False, dtypes=BOTH))
def test_gradient_rows_sum_to_zero(case):
    """sum_k dloss_i/dz_ik = a_i - sum_k B_ik = 0 without z-loss / softcap (softmax is shift-invariant)."""
    _, grad = cross_entropy_with_grad(case.z, case.target, grad_output=case.grad_output, **case.kwargs())
    assert grad.dtype == case.z.dtype
    # the two parts a_i h_i and B_i each have mass ~ |r_i| b_i: that is what rounding is relative to
    atol = 4 * case.eps * case.K * case.row_factor() * case.target_mass()
    assert np.all(np.abs(grad.astype(np.float64).sum(-1)) <= atol)


@given(cases(target_kind="index", options=False, reductions=["mean"]))
def test_plain_gradient_is_the_seeds_delta(case):
    """No options: dE/dz = (h(z) - onehot(y)) / N exactly as in the seed."""
    _, grad = cross_entropy_with_grad(case.z, case.target)
    n = int(np.prod(case.lead))          # 1 for a single row of shape (K,); 0 for an empty batch
    expected = (softmax(case.z) - np.eye(case.K)[case.target]) / n if n else np.zeros_like(case.z)
    np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# PyTorch F.cross_entropy, float64, autograd
# --------------------------------------------------------------------------------------------------
def torch_reference(case: Case):
    """Loss and dL/dz from PyTorch autograd; sample_weight, z_loss, softcap built from their definitions."""
    import torch
    import torch.nn.functional as F

    zt = torch.tensor(case.z, dtype=torch.float64, requires_grad=True)
    x = zt
    c = case.opts.get("softcap")
    if c is not None:
        x = c * torch.tanh(x / c)                                  # Gemma 2 softcap
    x_cf = torch.movedim(x, -1, 1) if x.ndim >= 2 else x           # torch wants classes on dim 1
    if case.is_index:
        tt = torch.tensor(case.target, dtype=torch.int64)
    else:
        tt = torch.tensor(case.target, dtype=torch.float64)
        tt = torch.movedim(tt, -1, 1) if tt.ndim >= 2 else tt
    w = case.opts.get("weight")
    ce = dict(weight=None if w is None else torch.tensor(w, dtype=torch.float64),
              ignore_index=case.opts.get("ignore_index", -100),
              label_smoothing=case.opts.get("label_smoothing", 0.0))
    plain = case.opts.get("sample_weight") is None and case.opts.get("z_loss", 0.0) == 0.0
    omega = torch.tensor(case.omega(), dtype=torch.float64)
    if plain and case.reduction != "none" and not (case.reduction == "mean" and float(omega.sum()) == 0):
        loss = F.cross_entropy(x_cf, tt, reduction=case.reduction, **ce)   # torch's own reductions
    else:
        per_row = F.cross_entropy(x_cf, tt, reduction="none", **ce)
        s = case.opts.get("sample_weight")
        if s is not None:
            per_row = per_row * torch.tensor(s, dtype=torch.float64)
        zl = case.opts.get("z_loss", 0.0)
        if zl:
            per_row = per_row + zl * omega * torch.logsumexp(x, dim=-1) ** 2   # PaLM z-loss
        if case.reduction == "none":
            loss = per_row
        elif case.reduction == "sum":
            loss = per_row.sum()
        elif float(omega.sum()) == 0:
            loss = per_row.sum() * 0.0      # softxent's documented choice: a mean over nothing is 0
        else:
            loss = per_row.sum() / omega.sum()
    go = torch.as_tensor(np.asarray(case.grad_output, dtype=np.float64))
    loss.backward(go.expand_as(loss) if case.reduction == "none" else go)
    grad = zt.grad if zt.grad is not None else torch.zeros_like(zt)
    return loss.detach().numpy(), grad.numpy()


@given(cases())
def test_matches_torch_autograd_float64(case):
    pytest.importorskip("torch")
    ref_loss, ref_grad = torch_reference(case)
    loss, grad = cross_entropy_with_grad(case.z, case.target, grad_output=case.grad_output,
                                         **case.kwargs())
    assert np.shape(loss) == np.shape(ref_loss)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-9,
                               atol=1e-12 * max(1.0, float(np.max(np.abs(ref_grad), initial=0))))
    assert cross_entropy(case.z, case.target, **case.kwargs()) == pytest.approx(loss, rel=1e-12, abs=0)


# --------------------------------------------------------------------------------------------------
# identities between options
# --------------------------------------------------------------------------------------------------
@given(cases(target_kind="index", dtypes=BOTH), st.booleans())
def test_index_targets_equal_one_hot_probabilities(case, use_class_weight):
    """Index y == probabilities onehot(y), with smoothing and sample weights too.

    Two documented exceptions are left out by construction: ignored rows (an all-zero probability row
    still counts in the mean), and the 'mean' / z-loss with class weights, where the index form weighs row
    i by w_{y_i} and the probability form by 1 (PyTorch's convention; checked in the next test).
    """
    opts = {k: v for k, v in case.opts.items() if k != "ignore_index"}
    target = case.target
    if "ignore_index" in case.opts:
        target = np.where(target == case.opts["ignore_index"], 0, target)
    if not use_class_weight:
        opts.pop("weight", None)
    reduction = case.reduction
    if "weight" in opts:
        opts["z_loss"] = 0.0
        reduction = "sum" if reduction == "mean" else reduction
    one_hot = np.eye(case.K)[target]
    li, gi = cross_entropy_with_grad(case.z, target, reduction=reduction, **opts)
    lp, gp = cross_entropy_with_grad(case.z, one_hot, reduction=reduction, **opts)
    same = Case(case.z, target, opts, reduction, 1.0)
    assert_within_rounding(same, (lp, gp), (li, gi), case.eps, factor=2)   # two computations, two roundings


@given(cases(target_kind="index", lead_shapes=[(4,), (2, 3), (7,)], z_loss=False),)
def test_class_weighted_mean_denominators_of_the_two_target_forms(case):
    """With class weights, 'mean' divides by sum_i w_{y_i} for index targets and by N for probabilities."""
    opts = {k: v for k, v in case.opts.items() if k not in ("ignore_index", "sample_weight")}
    opts["weight"] = np.random.default_rng(1).uniform(0.5, 2.0, case.K)
    target = np.where(case.target < 0, 0, case.target) % case.K
    total = cross_entropy(case.z, target, reduction="sum", **opts)
    mean_index = cross_entropy(case.z, target, reduction="mean", **opts)
    mean_proba = cross_entropy(case.z, np.eye(case.K)[target], reduction="mean", **opts)
    assert mean_index == pytest.approx(total / opts["weight"][target].sum(), rel=1e-12)
    assert mean_proba == pytest.approx(total / target.size, rel=1e-12)


@given(cases(dtypes=BOTH))
def test_none_then_reduce_equals_mean_and_sum(case):
    """'none'.sum() == 'sum'; sum('none') / sum_i omega_i == 'mean' (0 when the denominator is 0)."""
    opts, eps, dt = case.opts, case.eps, case.z.dtype
    per_row = cross_entropy(case.z, case.target, reduction="none", **opts)
    assert per_row.shape == case.lead and per_row.dtype == dt
    total = cross_entropy(case.z, case.target, reduction="sum", **opts)
    mean = cross_entropy(case.z, case.target, reduction="mean", **opts)
    assert np.asarray(total).dtype == dt and np.asarray(mean).dtype == dt
    exact_sum = per_row.sum(dtype=np.float64)
    assert total == pytest.approx(exact_sum, rel=2 * eps, abs=1e-300)
    denom = case.omega().sum()
    # (the denominator is summed from weights rounded to the logits' dtype: a few eps)
    assert mean == pytest.approx(exact_sum / denom if denom > 0 else 0.0, rel=4 * eps, abs=1e-300)
    if case.is_index and "ignore_index" in opts:
        assert np.all(per_row[case.target == opts["ignore_index"]] == 0)
    # the gradients reduce the same way
    _, g_none = cross_entropy_with_grad(case.z, case.target, reduction="none", **opts)
    _, g_sum = cross_entropy_with_grad(case.z, case.target, reduction="sum", **opts)
    _, g_mean = cross_entropy_with_grad(case.z, case.target, reduction="mean", **opts)
    np.testing.assert_array_equal(g_sum, g_none)
    g_ref = g_none.astype(np.float64) / denom if denom > 0 else 0.0 * g_none
    # scaling before or after subtracting the target rounds differently: compare at the rows' scale
    assert_within_rounding(Case(case.z, case.target, opts, "mean", 1.0), (mean, g_mean),
                           (exact_sum / denom if denom > 0 else 0.0, g_ref), eps, factor=2)


@given(cases(softcap=False, z_loss=False, dtypes=BOTH), st.sampled_from([-2000.0, -50.0, 3.0, 100.0, 800.0]))
def test_shift_invariance(case, c):
    """softmax, log_softmax, lse - c, loss and gradient are unchanged by z_i -> z_i + c_i (no z-loss/cap).

    Shifts of hundreds take float32 rows past exp's range, so both code paths of the loss are compared.
    """
    eps, dt = case.eps, case.z.dtype
    shift = (c * np.random.default_rng(0).random(case.lead + (1,))).astype(dt)
    z2 = case.z + shift                      # rounded to the dtype: errors ~eps * |c|
    mag = 4 * eps * (abs(c) + np.max(np.abs(case.z), initial=0) + np.log(case.K) + 1)
    np.testing.assert_allclose(softmax(z2), softmax(case.z), rtol=mag, atol=mag * 1e-3)
    np.testing.assert_allclose(log_softmax(z2), log_softmax(case.z), rtol=0, atol=mag)
    np.testing.assert_allclose(logsumexp(z2) - shift[..., 0], logsumexp(case.z), rtol=0, atol=mag)
    got = cross_entropy_with_grad(z2, case.target, grad_output=case.grad_output, **case.kwargs())
    ref = cross_entropy_with_grad(case.z, case.target, grad_output=case.grad_output, **case.kwargs())
    assert_within_rounding(case, got, ref, eps, factor=2, extra_magnitude=abs(c))


# --------------------------------------------------------------------------------------------------
# float32 vs float64
# --------------------------------------------------------------------------------------------------
@given(cases(lead_shapes=[(1,), (4,), (2, 3), (7,)]))
def test_float32_within_float32_rounding_of_float64(case):
    z32 = case.z.astype(np.float32)
    case = Case(z32.astype(np.float64), case.target, case.opts, case.reduction, case.grad_output)
    # the same values in both dtypes, so that only the arithmetic differs
    ref = cross_entropy_with_grad(case.z, case.target, grad_output=case.grad_output, **case.kwargs())
    got = cross_entropy_with_grad(z32, case.target, grad_output=case.grad_output, **case.kwargs())
    assert got[1].dtype == np.float32 and np.asarray(got[0]).dtype == np.float32
    assert_within_rounding(case, got, ref, EPS32)


def test_float32_tolerance_rejects_a_badly_computed_float32():
    """The tolerance above is tight: a float32 loss computed through float16 logits fails it."""
    rng = np.random.default_rng(3)
    case = Case(3.0 * rng.standard_normal((64, 50)).astype(np.float32).astype(np.float64),
                rng.integers(0, 50, 64), {}, "none", 1.0)
    ref = cross_entropy_with_grad(case.z, case.target, reduction="none")
    bad = cross_entropy_with_grad(case.z.astype(np.float16).astype(np.float32), case.target, reduction="none")
    with pytest.raises(AssertionError):
        assert_within_rounding(case, bad[:1], ref, EPS32)
    with pytest.raises(AssertionError):
        assert_within_rounding(case, (ref[0], bad[1]), ref, EPS32)
    assert_within_rounding(case, cross_entropy_with_grad(case.z.astype(np.float32), case.target,
                                                         reduction="none"), ref, EPS32)


# --------------------------------------------------------------------------------------------------
# softmax, log_softmax, logsumexp against SciPy, on any axis
# --------------------------------------------------------------------------------------------------
@settings(max_examples=30)
@given(st.sampled_from([(1,), (5,), (3, 4), (2, 3, 6), (4, 0), (0, 3)]), st.integers(0, 2**32 - 1),
       st.sampled_from([np.float32, np.float64]), st.booleans())
def test_softmax_family_matches_scipy(shape, seed, dtype, keepdims):
    special = pytest.importorskip("scipy.special")
    z = (10 * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)
    z64 = z.astype(np.float64)
    # z - lse(z) cancels: absolute errors ~eps * |z|, and exp turns them into relative ones
    tol = 8 * float(np.finfo(dtype).eps) * (np.max(np.abs(z64), initial=0.0) + np.log(z.size + 1) + 1)
    for axis in range(-z.ndim, z.ndim):
        if z.shape[axis] == 0:
            continue
        lse = logsumexp(z, axis=axis, keepdims=keepdims)
        assert lse.dtype == dtype
        np.testing.assert_allclose(lse, special.logsumexp(z64, axis=axis, keepdims=keepdims), rtol=0,
                                   atol=tol)
        p = softmax(z, axis=axis)
        assert p.dtype == dtype and p.shape == z.shape
        np.testing.assert_allclose(p, special.softmax(z64, axis=axis), rtol=tol, atol=0)
        np.testing.assert_allclose(p.sum(axis=axis), 1.0, rtol=0, atol=8 * np.finfo(dtype).eps)
        np.testing.assert_allclose(log_softmax(z, axis=axis), special.log_softmax(z64, axis=axis),
                                   rtol=0, atol=tol)


@settings(max_examples=30)
@given(st.sampled_from([(1, 1), (3, 2), (4, 5), (2, 3, 7)]), st.integers(0, 2**32 - 1))
def test_softmax_jvp_is_the_cross_entropy_hessian(shape, seed):
    """softmax_jvp(h, v) == d/dt dE/dz(z + t v) (central difference), for E summed over rows."""
    rng = np.random.default_rng(seed)
    z = 2 * rng.standard_normal(shape)
    v = rng.standard_normal(shape)
    y = rng.integers(0, shape[-1], shape[:-1])
    t = 1e-4
    gp = cross_entropy_with_grad(z + t * v, y, reduction="sum")[1]
    gm = cross_entropy_with_grad(z - t * v, y, reduction="sum")[1]
    hv = softxent.softmax_jvp(softmax(z), v)
    np.testing.assert_allclose(hv, (gp - gm) / (2 * t), rtol=1e-6, atol=1e-8)
    # and it is the softmax's Jacobian: d softmax(z + t v)/dt
    np.testing.assert_allclose(hv, (softmax(z + t * v) - softmax(z - t * v)) / (2 * t), rtol=1e-6,
                               atol=1e-8)

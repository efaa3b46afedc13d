"""Edge cases of the NumPy reference (softxent.loss): stability, empty means, out= buffers, dtypes,
untouched and read-only inputs, hand-computed values, and the errors for bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from softxent import (
    cross_entropy,
    cross_entropy_with_grad,
    log_softmax,
    logsumexp,
    softmax,
    softmax_jvp,
)


def rng_logits(shape, seed=0, dtype=np.float64):
    return (3 * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


ALL_OPTIONS = dict(weight=np.array([0.5, 2.0, 1.0, 0.0, 1.5]), label_smoothing=0.1, z_loss=1e-2,
                   softcap=5.0)


# --------------------------------------------------------------------------------------------------
# hand-computed values
# --------------------------------------------------------------------------------------------------
def test_hand_computed_cross_entropy():
    z = np.array([[0.2, 0.5, 0.3]])
    expected = math.log(math.exp(0.2) + math.exp(0.5) + math.exp(0.3)) - 0.2
    assert float(cross_entropy(z, np.array([0]))) == pytest.approx(expected, rel=1e-12)
    assert float(logsumexp([0.2, 0.5, 0.3])) == pytest.approx(expected + 0.2, rel=1e-12)
    # a probability target: -sum_k y_k log h_k
    y = np.array([[0.25, 0.25, 0.5]])
    h = np.exp([0.2, 0.5, 0.3]) / np.exp([0.2, 0.5, 0.3]).sum()
    assert float(cross_entropy(z, y)) == pytest.approx(-(y[0] * np.log(h)).sum(), rel=1e-12)


def test_hand_computed_label_smoothing():
    """K = 2, z = (0, log 3): h = (1/4, 3/4); target 1 with eps = 0.2 -> y = (0.1, 0.9)."""
    z = np.array([[0.0, math.log(3.0)]])
    loss, grad = cross_entropy_with_grad(z, np.array([1]), label_smoothing=0.2)
    assert float(loss) == pytest.approx(-(0.1 * math.log(0.25) + 0.9 * math.log(0.75)), rel=1e-12)
    np.testing.assert_allclose(grad, [[0.25 - 0.1, 0.75 - 0.9]], rtol=1e-12)
    # label_smoothing=1: the target is uniform whatever y says
    assert float(cross_entropy(z, np.array([1]), label_smoothing=1.0)) == pytest.approx(
        -(0.5 * math.log(0.25) + 0.5 * math.log(0.75)), rel=1e-12)


def test_hand_computed_weights_z_loss_softcap():
    z = np.array([[1.0, 0.0], [0.0, 2.0]])
    y = np.array([0, 1])
    l0 = math.log(math.exp(1) + 1) - 1
    l1 = math.log(1 + math.exp(2)) - 2
    # class weights: 'mean' divides by sum_i w_{y_i}
    w = np.array([1.0, 3.0])
    assert float(cross_entropy(z, y, weight=w)) == pytest.approx((l0 + 3 * l1) / 4, rel=1e-12)
    # sample weights compose: omega_i = s_i w_{y_i}
    s = np.array([2.0, 0.5])
    assert float(cross_entropy(z, y, weight=w, sample_weight=s)) == pytest.approx(
        (2 * l0 + 1.5 * l1) / (2 + 1.5), rel=1e-12)
    # z-loss adds z_loss * lse**2 per row
    lse0, lse1 = math.log(math.exp(1) + 1), math.log(1 + math.exp(2))
    assert float(cross_entropy(z, y, z_loss=0.1, reduction="sum")) == pytest.approx(
        l0 + l1 + 0.1 * (lse0**2 + lse1**2), rel=1e-12)
    # softcap replaces z by c tanh(z / c)
    c = 1.5
    zc = c * np.tanh(z / c)
    assert float(cross_entropy(z, y, softcap=c)) == pytest.approx(
        float(cross_entropy(zc, y)), rel=1e-12)
    assert float(cross_entropy(np.array([[3.0, 0.0]]), np.array([1]), softcap=1.0)) == pytest.approx(
        math.log(math.exp(math.tanh(3.0)) + 1), rel=1e-12)


def test_one_class_and_two_classes():
    """K = 1: loss 0, gradient 0.  K = 2: binary logistic loss log(1 + exp(-(z_y - z_other)))."""
    loss, grad = cross_entropy_with_grad(rng_logits((5, 1)), np.zeros(5, dtype=int))
    assert float(loss) == 0.0 and np.all(grad == 0)
    z = rng_logits((6, 2), seed=1)
    y = np.array([0, 1, 1, 0, 1, 0])
    margin = z[np.arange(6), y] - z[np.arange(6), 1 - y]
    np.testing.assert_allclose(cross_entropy(z, y, reduction="none"), np.logaddexp(0, -margin),
                               rtol=1e-13)


# --------------------------------------------------------------------------------------------------
# stability and non-finite logits
# --------------------------------------------------------------------------------------------------
def test_huge_float32_logits_stay_finite():
    z = np.array([[1e30, -1e30, 0.0], [-1e30, -1e30, 1e30], [1e30, 0.0, 1e30]], dtype=np.float32)
    y = np.array([0, 1, 2])
    p = softmax(z)
    assert p.dtype == np.float32 and np.all(np.isfinite(p))
    np.testing.assert_array_equal(p, [[1, 0, 0], [0, 0, 1], [0.5, 0, 0.5]])
    lp = log_softmax(z)
    assert np.all(np.isfinite(lp)) and lp[0, 0] == 0 and lp[0, 1] == np.float32(-2e30)
    assert np.all(np.isfinite(logsumexp(z)))
    loss, grad = cross_entropy_with_grad(z, y, reduction="none")
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    # row 3: lse = 1e30 + log 2 rounds to 1e30 in float32, so its loss is 0 to float32's resolution
    np.testing.assert_allclose(loss, [0.0, 2e30, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(grad, np.array([[1, 0, 0], [0, 0, 1], [0.5, 0, 0.5]]) - np.eye(3)[y])
    # (not z_loss: z_loss * lse**2 ~ 1e56 genuinely exceeds float32's range)
    for opts in ({"label_smoothing": 0.1}, {"softcap": 30.0}, {"weight": np.ones(3, np.float32)},
                 {"sample_weight": np.ones(3)}):
        loss, grad = cross_entropy_with_grad(z, y, **opts)
        assert np.isfinite(loss) and np.all(np.isfinite(grad)), opts


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_of_any_offset_match_scipy(dtype):
    """Rows whose logits sit anywhere in the dtype's range (some past exp's range, some far below 0)
    match SciPy's logsumexp / softmax computed in float64 on the same values."""
    special = pytest.importorskip("scipy.special")
    offsets = np.array([-3e4, -2000, -800, -100, -60, -45, -20, 0, 20, 45, 60, 100, 800, 2000, 3e4])
    z = (rng_logits((len(offsets), 7), seed=11) + offsets[:, None]).astype(dtype)
    y = np.random.default_rng(11).integers(0, 7, len(offsets))
    z64 = z.astype(np.float64)
    loss, grad = cross_entropy_with_grad(z, y, reduction="none")
    ref_loss = special.logsumexp(z64, axis=1) - z64[np.arange(len(y)), y]
    ref_grad = special.softmax(z64, axis=1) - np.eye(7)[y]
    eps = np.finfo(dtype).eps
    assert np.all(np.abs(loss - ref_loss) <= 4 * eps * (np.abs(z64).max(axis=1) + 3))
    assert np.all(np.abs(grad - ref_grad) <= 4 * eps)
    # and in one call with class weights and smoothing (different rows mixed in one block)
    loss_s = cross_entropy(z, y, label_smoothing=0.1, reduction="none")
    lp = special.log_softmax(z64, axis=1)
    ref_s = -(0.9 * lp[np.arange(len(y)), y] + 0.1 / 7 * lp.sum(axis=1))
    assert np.all(np.abs(loss_s - ref_s) <= 4 * eps * (np.abs(z64).max(axis=1) + 3))


def test_tiny_upstream_gradient_keeps_float32_precision():
    """grad_output = 1e-30 with logits near 20: a_i r_i / sum_k exp(z_ik) would be subnormal in float32."""
    z = rng_logits((4, 5), seed=12, dtype=np.float32) + np.float32(20)
    y = np.array([0, 1, 2, 3])
    g64 = cross_entropy_with_grad(z.astype(np.float64), y, reduction="sum", grad_output=1e-30)[1]
    g32 = cross_entropy_with_grad(z, y, reduction="sum", grad_output=1e-30)[1]
    assert np.max(np.abs(g32 - g64)) <= 4 * np.finfo(np.float32).eps * np.max(np.abs(g64))


def test_large_float64_logits():
    z = np.array([[1e4, 0.0, -1e4], [-1e300, 1e300, 0.0]])
    loss, grad = cross_entropy_with_grad(z, np.array([0, 1]), reduction="none")
    np.testing.assert_array_equal(loss, [0.0, 0.0])
    np.testing.assert_array_equal(grad, 0.0 * z)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minus_inf_logits_are_masked_classes(dtype):
    z = np.array([[0.0, -np.inf, 1.0, -np.inf], [2.0, 1.0, -np.inf, 0.0]], dtype=dtype)
    y = np.array([2, 3])
    p = softmax(z)
    assert np.all(p[np.isneginf(z)] == 0) and not np.any(np.isnan(p))
    lp = log_softmax(z)
    assert np.all(np.isneginf(lp[np.isneginf(z)])) and np.all(np.isfinite(lp[np.isfinite(z)]))
    for opts in ({}, {"label_smoothing": 0.0, "weight": np.ones(4)}, {"z_loss": 1e-2}):
        loss, grad = cross_entropy_with_grad(z, y, reduction="none", **opts)
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
        assert np.all(grad[np.isneginf(z)] == 0)
        # the same as dropping the masked classes
        ref0 = cross_entropy(z[:1, [0, 2]], np.array([1]), reduction="none")
        assert loss[0] == pytest.approx(float(ref0[0]) + (opts.get("z_loss", 0) * logsumexp(z[0]) ** 2),
                                        rel=1e-6)
    # a probability target with zero mass on the masked classes: finite too (0 * log 0 = 0)
    t = np.array([[0.5, 0.0, 0.5, 0.0], [0.25, 0.25, 0.0, 0.5]], dtype=dtype)
    loss, grad = cross_entropy_with_grad(z, t)
    assert np.isfinite(loss) and np.all(np.isfinite(grad)) and np.all(grad[np.isneginf(z)] == 0)
    # a zero class weight on the masked class keeps smoothing finite
    w = np.array([1.0, 0.0, 1.0, 0.0])
    loss, grad = cross_entropy_with_grad(z[:1], y[:1], weight=w, label_smoothing=0.3)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))


def test_minus_inf_at_the_target_gives_infinite_loss():
    z = np.array([[0.0, -np.inf, 1.0], [0.0, 0.0, 0.0]])
    loss = cross_entropy(z, np.array([1, 0]), reduction="none")
    assert loss[0] == np.inf and np.isfinite(loss[1])
    assert cross_entropy(z, np.array([1, 0])) == np.inf
    # smoothing puts mass on every class, so a masked class costs +inf too
    assert cross_entropy(z[:1], np.array([0]), label_smoothing=0.1) == np.inf
    assert cross_entropy(z[:1], np.array([[0.0, 0.5, 0.5]])) == np.inf


def test_all_minus_inf_row_is_nan_unless_ignored():
    z = np.array([[-np.inf, -np.inf], [0.0, 1.0]])
    with np.errstate(invalid="ignore"):
        assert np.all(np.isnan(softmax(z)[0])) and np.all(np.isfinite(softmax(z)[1]))
        assert logsumexp(z)[0] == -np.inf
        loss, grad = cross_entropy_with_grad(z, np.array([0, 1]), reduction="none")
    assert np.isnan(loss[0]) and np.isfinite(loss[1]) and np.all(np.isfinite(grad[1]))
    # an ignored all -inf row (padding) contributes exactly nothing
    loss, grad = cross_entropy_with_grad(z, np.array([-100, 1]))
    assert float(loss) == pytest.approx(float(cross_entropy(z[1:], np.array([1]))), rel=1e-15)
    assert np.all(grad[0] == 0) and np.all(np.isfinite(grad))


def test_nan_logits_propagate_to_their_row():
    z = rng_logits((3, 4))
    z[1, 2] = np.nan
    y = np.array([0, 1, 2])
    assert np.all(np.isnan(softmax(z)[1])) and np.all(np.isfinite(softmax(z)[[0, 2]]))
    assert np.isnan(logsumexp(z)[1])
    loss, grad = cross_entropy_with_grad(z, y, reduction="none")
    assert np.isnan(loss[1]) and np.all(np.isfinite(loss[[0, 2]]))
    assert np.all(np.isnan(grad[1])) and np.all(np.isfinite(grad[[0, 2]]))
    assert np.isnan(cross_entropy(z, y)) and np.isnan(cross_entropy(z, y, reduction="sum"))
    assert np.isnan(cross_entropy(z, np.full((3, 4), 0.25)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("opts", [{}, {"softcap": 2.0}, {"label_smoothing": 0.1, "z_loss": 0.1}])
def test_rows_without_loss_ignore_garbage_logits(bad, opts):
    """Padding rows (ignored, weight 0, grad_output 0) holding NaN / inf add exactly 0 to loss and gradient."""
    z = rng_logits((4, 3), seed=13)
    z[1, :] = bad
    clean = z.copy()
    clean[1] = 0.0
    y = np.array([0, -100, 2, 1])
    for kw in (dict(target=y), dict(target=np.where(y < 0, 0, y), sample_weight=np.array([1.0, 0, 2, 1])),
               dict(target=np.abs(y) % 3, reduction="none", grad_output=np.array([1.0, 0, 2, 1]))):
        with np.errstate(invalid="ignore", over="ignore"):     # arithmetic on the garbage row itself
            loss, grad = cross_entropy_with_grad(z, **kw, **opts)
        ref_loss, ref_grad = cross_entropy_with_grad(clean, **kw, **opts)
        assert np.all(grad[1] == 0) and np.all(np.isfinite(grad))
        np.testing.assert_array_equal(grad, ref_grad)
        if kw.get("reduction") != "none":
            assert loss == ref_loss
    # a mean over nothing stays 0 with a zero gradient whatever the logits hold
    with np.errstate(invalid="ignore", over="ignore"):
        loss, grad = cross_entropy_with_grad(z, np.full(4, -100), **opts)
    assert loss == 0 and np.all(grad == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make", [
    lambda z: dict(logits=z, target=np.full(z.shape[:-1], -100)),                      # all ignored
    lambda z: dict(logits=z, target=np.full(z.shape[:-1], 2), ignore_index=2),         # inside [0, K)
    lambda z: dict(logits=z[:0], target=np.zeros(0, dtype=int)),                        # empty batch
    lambda z: dict(logits=z[:0], target=np.zeros((0, 5))),                              # empty, proba
    lambda z: dict(logits=z, target=np.zeros(z.shape[:-1], dtype=int), weight=np.array([0.0, 1, 1, 1, 1])),
    lambda z: dict(logits=z, target=np.arange(4) % 5, sample_weight=np.zeros(4)),
    lambda z: dict(logits=z, target=np.full(z.shape, 0.2), sample_weight=np.zeros(4)),
], ids=["all-ignored", "ignore-inside", "empty", "empty-proba", "zero-class-weight", "zero-sample-weight",
        "zero-sample-weight-proba"])
def test_mean_over_nothing_is_zero_with_zero_gradient(dtype, make):
    kw = make(rng_logits((4, 5), dtype=dtype))
    for opts in ({}, {"label_smoothing": 0.2, "z_loss": 0.1}):
        loss, grad = cross_entropy_with_grad(**kw, **opts)
        assert float(loss) == 0.0 and not np.isnan(loss) and np.asarray(loss).dtype == dtype
        assert grad.shape == kw["logits"].shape and np.all(grad == 0)
        assert float(cross_entropy(**kw, **opts)) == 0.0
        if "weight" in kw and opts:
            continue   # smoothing still spreads weight over the classes with w_k > 0: a real 'sum'
        assert float(cross_entropy(**kw, **opts, reduction="sum")) == 0.0
        assert np.all(cross_entropy(**kw, **opts, reduction="none") == 0)
        assert np.all(cross_entropy_with_grad(**kw, **opts, reduction="sum")[1] == 0)


def test_empty_and_degenerate_shapes():
    assert softmax(np.zeros((0, 3))).shape == (0, 3)
    assert logsumexp(np.zeros((2, 0, 3))).shape == (2, 0)
    loss, grad = cross_entropy_with_grad(np.zeros((2, 0, 3)), np.zeros((2, 0), dtype=int), reduction="none")
    assert loss.shape == (2, 0) and grad.shape == (2, 0, 3)
    # a single row of shape (K,) with a scalar target
    loss, grad = cross_entropy_with_grad(np.array([0.0, 0.0]), np.array(1), reduction="none")
    assert loss.shape == () and float(loss) == pytest.approx(math.log(2))
    np.testing.assert_allclose(grad, [0.5, -0.5])


@pytest.mark.parametrize("shape,dtype", [((3000, 70), np.float32), ((10, 20000), np.float64)])
def test_many_rows_span_several_blocks(shape, dtype):
    """Inputs larger than one internal processing block give the rows that small calls give."""
    N, K = shape
    rng = np.random.default_rng(5)
    z = rng_logits(shape, seed=5, dtype=dtype)
    y = rng.integers(0, K, N)
    y[::7] = -100
    w = np.linspace(0.5, 1.5, K)
    s = rng.random(N)
    go = rng.standard_normal(N)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, weight=w, softcap=8.0, reduction="none")
    loss, grad = cross_entropy_with_grad(z, y, sample_weight=s, grad_output=go, **opts)
    step = 7 if N > 100 else 1
    tol = 1e-5 if dtype == np.float32 else 1e-11
    for i in range(0, N, step):
        rows = slice(i, i + step)
        li, gi = cross_entropy_with_grad(z[rows], y[rows], sample_weight=s[rows], grad_output=go[rows],
                                         **opts)
        # (not bitwise: BLAS may sum a row in another order depending on how many rows it is given)
        np.testing.assert_allclose(loss[rows], li, rtol=tol)
        np.testing.assert_allclose(grad[rows], gi, rtol=tol, atol=tol * np.max(np.abs(gi)))


def test_block_size_does_not_change_results(monkeypatch):
    """White-box: with blocks of one or two rows every option gives the same result as with big blocks."""
    import softxent.loss as L

    rng = np.random.default_rng(8)
    z = rng_logits((2, 3, 5), seed=8)
    z[0, 1, 3] = -np.inf
    y = rng.integers(0, 5, (2, 3))
    y[1, 1] = 42
    t = rng.random((2, 3, 5))
    go = rng.standard_normal((2, 3))
    kw = dict(weight=rng.random(5), sample_weight=rng.random((2, 3)), label_smoothing=0.2, z_loss=0.1,
              ignore_index=42)
    calls = [
        lambda: cross_entropy_with_grad(z, y, reduction="none", grad_output=go, **kw),
        lambda: cross_entropy_with_grad(z, y, reduction="mean", softcap=2.0, **kw),
        lambda: cross_entropy_with_grad(np.maximum(z, -5), t, reduction="sum", softcap=2.0, weight=kw["weight"],
                                        label_smoothing=0.3),
        lambda: cross_entropy(z, y, reduction="none", **kw),
        lambda: cross_entropy(np.maximum(z, -5), t, reduction="mean", sample_weight=kw["sample_weight"]),
    ]
    big = [fn() for fn in calls]
    for block_bytes in (1, 2 * 5 * 8):
        monkeypatch.setattr(L, "_BLOCK_BYTES", block_bytes)
        for fn, ref in zip(calls, big):
            got = fn()
            got, ref = (got, ref) if isinstance(got, tuple) else ((got,), (ref,))
            for a, b in zip(got, ref):
                np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-16)


# --------------------------------------------------------------------------------------------------
# out= buffers
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_and_log_softmax_write_into_out(dtype):
    z = rng_logits((3, 4), dtype=dtype)
    for fn in (softmax, log_softmax):
        expected = fn(z)
        buf = np.empty_like(z)
        res = fn(z, out=buf)
        assert res is buf and np.shares_memory(res, buf)
        np.testing.assert_array_equal(buf, expected)
        zc = z.copy()
        res = fn(zc, out=zc)                 # in place over the logits
        assert np.shares_memory(res, zc)
        np.testing.assert_allclose(zc, expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"out must be an ndarray of shape \(3, 4\) and dtype"):
        softmax(z, out=np.empty((4, 3), dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5), (5,)])
@pytest.mark.parametrize("proba", [False, True])
def test_cross_entropy_with_grad_out(dtype, shape, proba):
    rng = np.random.default_rng(2)
    z = rng_logits(shape, dtype=dtype)
    t = rng.random(shape) if proba else rng.integers(0, 5, shape[:-1])
    opts = {} if proba else dict(ALL_OPTIONS, sample_weight=rng.random(shape[:-1]))
    ref_loss, ref_grad = cross_entropy_with_grad(z, t, **opts)
    buf = np.full_like(z, np.nan)
    loss, grad = cross_entropy_with_grad(z, t, out=buf, **opts)
    assert grad is buf and np.shares_memory(grad, buf)
    np.testing.assert_array_equal(buf, ref_grad)
    assert loss == ref_loss
    # out=logits overwrites the logits with the gradient and gives the same result
    zc = z.copy()
    loss, grad = cross_entropy_with_grad(zc, t, out=zc, **opts)
    assert grad is zc
    np.testing.assert_array_equal(zc, ref_grad)
    assert loss == ref_loss


@pytest.mark.parametrize("block_bytes", [None, 1])
def test_out_overlapping_the_logits_or_the_target_is_safe(monkeypatch, block_bytes):
    """An out= that overlaps the inputs without being the logits: inputs are read as they were."""
    import softxent.loss as L

    if block_bytes is not None:   # white-box: many internal row blocks, so one block could clobber the next
        monkeypatch.setattr(L, "_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(3)
    base = rng_logits((9, 4), seed=3)
    y = rng.integers(0, 4, 8)
    ref = cross_entropy_with_grad(base[:8].copy(), y)
    for logits_rows, out_rows in ((slice(0, 8), slice(1, 9)), (slice(1, 9), slice(0, 8))):
        big = base.copy()
        ref = cross_entropy_with_grad(big[logits_rows].copy(), y)
        loss, grad = cross_entropy_with_grad(big[logits_rows], y, out=big[out_rows])   # shifted by a row
        np.testing.assert_array_equal(grad, ref[1])
        assert loss == ref[0]
    z = base[:8]
    t = rng.random((9, 4))
    ref = cross_entropy_with_grad(z, t[:8].copy(), sample_weight=rng.random(8))
    for target_rows, out_rows in ((slice(0, 8), slice(0, 8)), (slice(0, 8), slice(1, 9)),
                                  (slice(1, 9), slice(0, 8))):
        tc = t.copy()
        ref = cross_entropy_with_grad(z, tc[target_rows].copy(), weight=np.arange(1.0, 5.0))
        loss, grad = cross_entropy_with_grad(z, tc[target_rows], out=tc[out_rows], weight=np.arange(1.0, 5.0))
        np.testing.assert_array_equal(grad, ref[1])
        assert loss == ref[0]


def test_bad_out_buffers():
    z = rng_logits((3, 4))
    y = np.array([0, 1, 2])
    for bad, why in [(np.empty((3, 5)), r"\(3, 5\)"), (np.empty((3, 4), np.float32), "float32"),
                     (np.empty((4, 3)).T, "not C-contiguous"), ([[0.0] * 4] * 3, "list")]:
        with pytest.raises(ValueError, match=r"out must be a writeable C-contiguous ndarray of shape "
                                             r"\(3, 4\) and dtype float64; got .*" + why):
            cross_entropy_with_grad(z, y, out=bad)
    ro = np.empty((3, 4))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        cross_entropy_with_grad(z, y, out=ro)


# --------------------------------------------------------------------------------------------------
# inputs: never modified, read-only accepted, dtypes
# --------------------------------------------------------------------------------------------------
def _call_everything(z, y_index, y_proba, weight, sample_weight, go):
    out = [softmax(z), log_softmax(z), logsumexp(z), softmax_jvp(softmax(z), y_proba)]
    for t in (y_index, y_proba):
        for red in ("none", "mean", "sum"):
            g = go if red == "none" else 2.0
            kw = dict(weight=weight, sample_weight=sample_weight, label_smoothing=0.1, z_loss=1e-2,
                      reduction=red)
            out.append(cross_entropy(z, t, **kw))
            out.extend(cross_entropy_with_grad(z, t, grad_output=g, **kw))
            out.extend(cross_entropy_with_grad(z, t, grad_output=g, softcap=3.0, **kw))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inputs_are_never_modified(dtype):
    rng = np.random.default_rng(4)
    args = (rng_logits((2, 3, 5), dtype=dtype), rng.integers(0, 5, (2, 3)), rng.random((2, 3, 5)),
            rng.random(5), rng.random((2, 3)), rng.standard_normal((2, 3)))
    args[0][0, 0, 0] = -np.inf
    copies = [a.copy() for a in args]
    _call_everything(*args)
    for a, c in zip(args, copies):
        np.testing.assert_array_equal(a, c)


def test_read_only_and_memory_mapped_inputs(tmp_path):
    rng = np.random.default_rng(5)
    args = [rng_logits((4, 5)), rng.integers(0, 5, 4), rng.random((4, 5)), rng.random(5), rng.random(4),
            rng.standard_normal(4)]
    expected = _call_everything(*args)
    for a in args:
        a.flags.writeable = False
    for got, exp in zip(_call_everything(*args), expected):
        np.testing.assert_array_equal(got, exp)
    path = tmp_path / "z.npy"
    np.save(path, args[0])
    zmap = np.load(path, mmap_mode="r")
    for got, exp in zip(_call_everything(zmap, *args[1:]), expected):
        np.testing.assert_array_equal(got, exp)


def test_non_contiguous_logits():
    z = rng_logits((6, 8), seed=6)
    y = np.arange(6) % 4
    view = z[::2, ::2]
    expected = cross_entropy_with_grad(np.ascontiguousarray(view), y[:3])
    got = cross_entropy_with_grad(view, y[:3])
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(softmax(z.T, axis=0), softmax(z, axis=1).T, rtol=4 * np.finfo(float).eps)
    np.testing.assert_allclose(log_softmax(z[:, ::-1]), log_softmax(z)[:, ::-1], rtol=4 * np.finfo(float).eps)


def test_dtypes():
    zi = np.array([[2, 0, 0], [0, 1, 0]])
    y = np.array([0, 2])
    for fn in (softmax, log_softmax, logsumexp):
        assert fn(zi).dtype == np.float64
        np.testing.assert_array_equal(fn(zi), fn(zi.astype(np.float64)))
    loss, grad = cross_entropy_with_grad(zi, y)
    assert np.asarray(loss).dtype == np.float64 and grad.dtype == np.float64
    assert loss == cross_entropy_with_grad(zi.astype(np.float64), y)[0]
    assert cross_entropy(zi.astype(bool), y).dtype == np.float64
    assert cross_entropy(zi.astype(np.uint8), y.astype(np.uint8)).dtype == np.float64
    # float16 is computed in float32
    loss, grad = cross_entropy_with_grad(zi.astype(np.float16), y)
    assert np.asarray(loss).dtype == np.float32 and grad.dtype == np.float32
    assert softmax(zi.astype(np.float16)).dtype == np.float32
    # float32 stays float32, with any target / weight dtype
    z32 = zi.astype(np.float32)
    for kw in ({}, {"weight": np.ones(3)}, {"sample_weight": np.ones(2, np.int64)}):
        loss, grad = cross_entropy_with_grad(z32, y.astype(np.int32), **kw)
        assert np.asarray(loss).dtype == np.float32 and grad.dtype == np.float32
    assert cross_entropy(z32, np.eye(3)[y], reduction="none").dtype == np.float32
    assert cross_entropy(z32, np.eye(3)[y].astype(np.float16)).dtype == np.float32


@pytest.mark.parametrize("bad", [np.array([[1 + 2j, 0j]]), np.array([[1.0, 2.0]], dtype=object),
                                 np.array([["a", "b"]])])
def test_complex_object_string_logits_raise_type_error(bad):
    kind = str(bad.dtype)
    for call in (lambda: softmax(bad), lambda: log_softmax(bad), lambda: logsumexp(bad),
                 lambda: cross_entropy(bad, np.array([0])),
                 lambda: cross_entropy_with_grad(bad, np.array([0]))):
        with pytest.raises(TypeError, match=r"logits must be a real floating-point .*got dtype " + kind):
            call()


# --------------------------------------------------------------------------------------------------
# bad input: ValueError / TypeError naming the argument, the value received and what was expected
# --------------------------------------------------------------------------------------------------
Z = np.zeros((4, 3))
Y = np.array([0, 1, 2, 0])

BAD_INPUTS = [
    # (kwargs, exception, message pattern)
    (dict(target=np.array([0, 1, 3, 0])), ValueError,
     r"target holds class index 3, outside \[0, 3\) for logits with K=3 classes \(and not ignore_index=-100\)"),
    (dict(target=np.array([0, -1, 2, 0])), ValueError, r"target holds class index -1, outside \[0, 3\)"),
    (dict(target=np.array([0, 5, 2, 0]), ignore_index=-1), ValueError,
     r"class index 5, outside \[0, 3\) .*not ignore_index=-1"),
    (dict(target=np.array([0.0, 1.0, 2.0, 0.0])), TypeError,
     r"target must hold integer class indices of shape \(4,\), or class probabilities \(floating\) of "
     r"shape \(4, 3\); got dtype float64 and shape \(4,\)"),
    (dict(target=np.array([True, False, True, True])), TypeError, r"target must hold integer class .*got dtype bool"),
    (dict(target=np.array([0, 1, 2])), ValueError,
     r"target of class indices must have shape \(4,\) \(logits \(4, 3\) without the class axis\); "
     r"got shape \(3,\)"),
    (dict(target=np.full((4, 2), 0.5)), ValueError,
     r"target probabilities must have the logits' shape \(4, 3\); got shape \(4, 2\)"),
    (dict(target=np.full((4, 3), 0.5) - np.eye(4, 3)), ValueError,
     r"target probabilities must be >= 0 and not NaN; got values such as \[-0.5"),
    (dict(target=np.where(np.eye(4, 3) > 0, np.nan, 0.5)), ValueError,
     r"target probabilities must be >= 0 and not NaN; got values such as \[nan"),
    (dict(weight=np.ones(2)), ValueError, r"weight must have shape \(3,\); got shape \(2,\)"),
    (dict(weight=np.array([1.0, -1.0, 1.0])), ValueError, r"weight must be finite and >= 0; got values such as \[-1.0\]"),
    (dict(weight=np.array([1.0, np.inf, 1.0])), ValueError, r"weight must be finite and >= 0; got values such as \[inf\]"),
    (dict(weight=np.array(["a", "b", "c"])), TypeError, r"weight must be a real numeric array; got dtype <U1"),
    (dict(sample_weight=np.ones(5)), ValueError, r"sample_weight must have shape \(4,\); got shape \(5,\)"),
    (dict(sample_weight=np.array([1.0, 1.0, -2.0, 1.0])), ValueError,
     r"sample_weight must be finite and >= 0; got values such as \[-2.0\]"),
    (dict(sample_weight=np.array([1.0, np.nan, 1.0, 1.0])), ValueError,
     r"sample_weight must be finite and >= 0; got values such as \[nan\]"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of \('none', 'mean', 'sum'\); got 'avg'"),
    (dict(reduction=None), ValueError, r"reduction must be one of .*; got None"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be a number in \[0, 1\]; got 1.5"),
    (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be a number in \[0, 1\]; got -0.1"),
    (dict(label_smoothing=float("nan")), ValueError, r"label_smoothing must be a number in \[0, 1\]; got nan"),
    (dict(label_smoothing="0.1"), ValueError, r"label_smoothing must be a number in \[0, 1\]; got '0.1'"),
    (dict(softcap=0.0), ValueError, r"softcap must be None or a finite number > 0; got 0.0"),
    (dict(softcap=-3), ValueError, r"softcap must be None or a finite number > 0; got -3"),
    (dict(softcap=float("inf")), ValueError, r"softcap must be None or a finite number > 0; got inf"),
    (dict(z_loss=-0.1), ValueError, r"z_loss must be a finite number >= 0; got -0.1"),
    (dict(z_loss=float("nan")), ValueError, r"z_loss must be a finite number >= 0; got nan"),
    (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int; got 1.5"),
    (dict(logits=np.zeros((4, 0)), target=np.zeros(4, dtype=int)), ValueError,
     r"logits must have at least one class on the last axis, shape \(..., K\) with K >= 1; got shape \(4, 0\)"),
    (dict(logits=np.float64(1.0), target=np.array(0)), ValueError,
     r"logits must have at least one class .*got shape \(\)"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_INPUTS,
                         ids=[f"{i}-{'-'.join(k)}" for i, (k, _, _) in enumerate(BAD_INPUTS)])
def test_bad_input_errors(kwargs, exc, match):
    kw = {"logits": Z, "target": Y, **kwargs}
    with pytest.raises(exc, match=match):
        cross_entropy(**kw)
    with pytest.raises(exc, match=match):
        cross_entropy_with_grad(**kw)


def test_bad_grad_output():
    with pytest.raises(ValueError, match=r"grad_output must be a scalar for reduction='mean'; got shape \(4,\)"):
        cross_entropy_with_grad(Z, Y, grad_output=np.ones(4))
    with pytest.raises(ValueError, match=r"grad_output must be a scalar for reduction='sum'; got shape \(1,\)"):
        cross_entropy_with_grad(Z, Y, reduction="sum", grad_output=[1.0])
    with pytest.raises(ValueError, match=r"grad_output must be a scalar or have the loss's shape \(2, 2\) "
                                         r"for reduction='none'; got shape \(4,\)"):
        cross_entropy_with_grad(np.zeros((2, 2, 3)), Y.reshape(2, 2), reduction="none", grad_output=np.ones(4))
    # a scalar grad_output broadcasts over the rows for 'none'
    _, g = cross_entropy_with_grad(Z, Y, reduction="none", grad_output=3.0)
    np.testing.assert_allclose(g, 3 * cross_entropy_with_grad(Z, Y, reduction="none")[1])


def test_bad_softmax_family_input():
    with pytest.raises(ValueError, match=r"logits must have at least one class .*got shape \(2, 0\)"):
        softmax(np.zeros((2, 0)))
    with pytest.raises(ValueError, match=r"logits must have at least one class .*got shape \(2, 0\)"):
        log_softmax(np.zeros((2, 0)))
    with pytest.raises(ValueError, match=r"v must have the shape of proba \(2, 3\); got \(3, 2\)"):
        softmax_jvp(np.full((2, 3), 1 / 3), np.zeros((3, 2)))

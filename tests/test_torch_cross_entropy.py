"""softxent.torch.cross_entropy (an autograd Function) against the float64 NumPy reference softxent.loss."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import softxent.loss as ref_loss  # noqa: E402
from softxent.torch import CrossEntropyLoss, cross_entropy  # noqa: E402

TOL32 = 2e-5
TOL64 = 1e-12


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def rel_err(got, want, scale=None) -> float:
    got = got.detach().double().numpy()
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = np.abs(want).max(initial=0.0) if scale is None else scale
    return float(np.abs(got - want).max(initial=0.0) / max(scale, 1e-30))


OPTIONS = {
    "plain": {},
    "ignore": {"ignore": True},
    "ignore_inside": {"ignore_index": 2},
    "weight": {"weight": True, "ignore": True},
    "sample_weight": {"sample_weight": True},
    "smoothing": {"label_smoothing": 0.2, "ignore": True},
    "z_loss": {"z_loss": 0.05},
    "softcap": {"softcap": 2.0},
    "everything": {"weight": True, "sample_weight": True, "label_smoothing": 0.1, "z_loss": 0.02,
                   "softcap": 3.0, "ignore": True},
}


def make(rng, lead, K, opt, *, proba=False, dtype=torch.float64):
    z = torch.from_numpy(rng.standard_normal(lead + (K,)) * 2).to(dtype)
    if proba:
        y = torch.from_numpy(rng.dirichlet(np.ones(K), size=lead) * rng.uniform(0.5, 1.5, lead + (1,)))
        y = y.to(dtype)
    else:
        y = torch.from_numpy(rng.integers(0, K, lead))
        if opt.get("ignore"):
            y.view(-1)[::3] = -100
        if "ignore_index" in opt:
            y.view(-1)[::4] = opt["ignore_index"]
    kw = {k: v for k, v in opt.items() if k in ("ignore_index", "label_smoothing", "z_loss", "softcap")}
    if opt.get("weight"):
        kw["weight"] = torch.from_numpy(rng.uniform(0.2, 2.0, K))
    if opt.get("sample_weight"):
        kw["sample_weight"] = torch.from_numpy(rng.uniform(0.0, 2.0, lead))
    return z, y, kw


def np_kwargs(kw):
    return {k: (v.double().numpy() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@pytest.mark.parametrize("option, proba", [(o, p) for o in OPTIONS for p in (False, True)
                                            if not (p and "ignore_index" in OPTIONS[o])])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_against_reference(option, reduction, proba, dtype):
    opt = OPTIONS[option]
    rng = np.random.default_rng(abs(hash((option, reduction, proba, str(dtype)))) % 2**32)
    lead, K = (3, 4), 7
    z, y, kw = make(rng, lead, K, opt, proba=proba, dtype=dtype)
    go = (torch.tensor(rng.uniform(0.3, 2.0)) if reduction != "none"
          else torch.from_numpy(rng.uniform(-2, 2, lead)))
    want_loss, want_grad = ref_loss.cross_entropy_with_grad(
        z.double().numpy(), y.numpy(), reduction=reduction, grad_output=go.numpy(), **np_kwargs(kw))
    zg = z.clone().requires_grad_()
    loss = cross_entropy(zg, y, reduction=reduction, **kw)
    assert loss.dtype == dtype and loss.shape == (lead if reduction == "none" else ())
    loss.backward(go.to(dtype))
    tol = TOL64 if dtype == torch.float64 else TOL32
    assert rel_err(loss, want_loss) <= tol
    assert zg.grad.dtype == dtype
    assert rel_err(zg.grad, want_grad) <= tol


@pytest.mark.parametrize("proba", [False, True], ids=["index", "proba"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(proba, reduction):
    """torch.autograd.gradcheck (finite differences) on every option at once, logits and soft targets."""
    rng = np.random.default_rng(3)
    z, y, kw = make(rng, (5,), 4, OPTIONS["everything"], proba=proba)
    z.requires_grad_()
    if proba:
        y.requires_grad_()
        assert torch.autograd.gradcheck(lambda z_, y_: cross_entropy(z_, y_, reduction=reduction, **kw),
                                        (z, y))
    else:
        assert torch.autograd.gradcheck(lambda z_: cross_entropy(z_, y, reduction=reduction, **kw), (z,))


def test_matches_pytorch_cross_entropy():
    rng = np.random.default_rng(4)
    z = torch.from_numpy(rng.standard_normal((10, 6)))
    y = torch.from_numpy(rng.integers(0, 6, 10))
    y[::4] = 2
    w = torch.from_numpy(rng.uniform(0.5, 2, 6))
    for kw in ({}, {"weight": w}, {"ignore_index": 2}, {"label_smoothing": 0.3, "weight": w},
               {"ignore_index": 2, "label_smoothing": 0.2, "reduction": "sum"}):
        ours = cross_entropy(z, y, **kw)
        theirs = torch.nn.functional.cross_entropy(z, y, **kw)
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_float32_math(dtype):
    rng = np.random.default_rng(5)
    z = torch.from_numpy(rng.standard_normal((16, 50)) * 3).to(dtype)
    y = torch.from_numpy(rng.integers(0, 50, 16))
    want_loss, want_grad = ref_loss.cross_entropy_with_grad(z.double().numpy(), y.numpy(), z_loss=1e-3)
    zg = z.clone().requires_grad_()
    loss = cross_entropy(zg, y, z_loss=1e-3)
    loss.backward()
    assert loss.dtype == torch.float32 and zg.grad.dtype == dtype
    assert rel_err(loss, want_loss) <= 1e-6           # float32 math: not quantised to the input dtype
    unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert rel_err(zg.grad, want_grad) <= unit          # one rounding of the gradient


def test_masked_classes_and_mean_over_nothing():
    """-inf logits (masked classes) and all-ignored batches behave as in softxent.loss."""
    z = torch.tensor([[0.0, -np.inf, 1.0], [2.0, 0.5, -np.inf], [-np.inf, -np.inf, -np.inf]],
                     dtype=torch.float64)
    y = torch.tensor([2, 0, -100])
    for kw in ({}, {"z_loss": 0.1}, {"weight": torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)}):
        zg = z.clone().requires_grad_()
        loss = cross_entropy(zg, y, **kw)
        loss.backward()
        want_loss, want_grad = ref_loss.cross_entropy_with_grad(z.numpy(), y.numpy(), **np_kwargs(kw))
        assert float(loss.detach()) == pytest.approx(float(want_loss), rel=1e-12)
        assert torch.equal(torch.isnan(zg.grad), torch.from_numpy(np.isnan(want_grad)))
        assert np.allclose(zg.grad.numpy(), want_grad, rtol=1e-12, atol=0)
        assert not torch.isnan(zg.grad).any() and float(zg.grad[2].abs().sum()) == 0.0
    assert float(cross_entropy(z[:2], torch.tensor([1, 2]))) == np.inf   # target on a masked class
    assert np.isnan(float(cross_entropy(z, torch.tensor([0, 0, 0]))))    # an all -inf row: no softmax
    zg = z[:2].clone().requires_grad_()
    loss = cross_entropy(zg, torch.tensor([-100, -100]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(zg.grad.abs().sum()) == 0.0    # PyTorch gives NaN here
    assert float(cross_entropy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))) == 0.0


def test_single_class_and_module():
    z = torch.randn(4, 1, dtype=torch.float64, requires_grad=True)
    loss = cross_entropy(z, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(z.grad.abs().max()) == 0.0
    w = torch.tensor([1.0, 2.0, 0.5])
    mod = CrossEntropyLoss(w, label_smoothing=0.1, reduction="sum")
    assert "reduction='sum'" in repr(mod)
    z = torch.randn(2, 5, 3)
    y = torch.randint(0, 3, (2, 5))
    assert torch.equal(mod(z, y), cross_entropy(z, y, weight=w, label_smoothing=0.1, reduction="sum"))


def test_int32_targets_equal_int64():
    """int32 class indices (F.cross_entropy refuses them: 'expected target dtype to be Long') give the
    int64 result bit for bit, with ignored targets; the int64 result is PyTorch's."""
    rng = np.random.default_rng(8)
    z, y, kw = make(rng, (4, 5), 7, OPTIONS["weight"])
    go = torch.from_numpy(rng.uniform(-2, 2, (4, 5)))
    grads = []
    for target in (y, y.to(torch.int32)):
        zg = z.clone().requires_grad_()
        loss = cross_entropy(zg, target, reduction="none", label_smoothing=0.1, **kw)
        loss.backward(go)
        grads.append((loss.detach(), zg.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    theirs = torch.nn.functional.cross_entropy(z.reshape(-1, 7), y.reshape(-1), reduction="none",
                                               label_smoothing=0.1, **kw)
    assert torch.allclose(grads[1][0].reshape(-1), theirs, rtol=1e-12, atol=0)


def test_module_reduction_none_gives_per_row_losses():
    """CrossEntropyLoss(reduction='none'): per-row losses shaped like the target, equal to the function's
    and the reference's, and the reference gradient for a random per-row grad_output."""
    rng = np.random.default_rng(9)
    lead, K = (3, 4), 6
    z, y, kw = make(rng, lead, K, OPTIONS["everything"], dtype=torch.float32)
    weight, sample_weight = kw.pop("weight"), kw.pop("sample_weight")
    mod = CrossEntropyLoss(weight, reduction="none", **kw)
    go = torch.from_numpy(rng.uniform(-2, 2, lead))
    zg = z.clone().requires_grad_()
    loss = mod(zg, y, sample_weight=sample_weight)
    func = cross_entropy(z, y, weight=weight, sample_weight=sample_weight, reduction="none", **kw)
    assert loss.shape == lead and torch.equal(loss.detach(), func)
    assert float(func.reshape(-1)[0].abs()) == 0.0                      # an ignored target (make: ::3)
    loss.backward(go.float())
    want_loss, want_grad = ref_loss.cross_entropy_with_grad(
        z.double().numpy(), y.numpy(), reduction="none", grad_output=go.numpy(), weight=weight.numpy(),
        sample_weight=sample_weight.numpy(), **kw)
    assert rel_err(loss, want_loss) <= TOL32 and rel_err(zg.grad, want_grad) <= TOL32


DOUBLE_BACKWARD = r"softxent.torch computes first derivatives only: .* \(double backward\)"


@pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph=True")
@pytest.mark.parametrize("proba", [False, True], ids=["index", "proba"])
def test_double_backward_raises_a_clear_error(proba):
    """Logits from a layer, z = x W^T: the create_graph gradient is right, and differentiating it again
    (a gradient penalty) raises, instead of returning the wrong second derivative that treats dz as a
    constant (which it did before the guard)."""
    rng = np.random.default_rng(10)
    x = torch.from_numpy(rng.standard_normal((5, 3)))
    w = torch.from_numpy(rng.standard_normal((4, 3)))
    y = (torch.from_numpy(rng.dirichlet(np.ones(4), 5)).requires_grad_() if proba
         else torch.from_numpy(rng.integers(0, 4, 5)))
    _, dz = ref_loss.cross_entropy_with_grad((x @ w.T).numpy(), y.detach().numpy())
    for wrt in ("x", "weight", "target", "backward"):
        if wrt == "target" and not proba:
            continue
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = cross_entropy(xg @ wg.T, y)
        if wrt == "backward":
            loss.backward(create_graph=True)
            gx = xg.grad
        else:
            (gx,) = torch.autograd.grad(loss, xg, create_graph=True)
        assert rel_err(gx, dz @ w.numpy()) <= TOL64
        penalty = gx.square().sum()
        with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
            if wrt == "backward":
                penalty.backward()
            else:
                torch.autograd.grad(penalty, {"x": xg, "weight": wg, "target": y}[wrt])


@pytest.mark.parametrize("proba", [False, True], ids=["index", "proba"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_sample_weight_equals_ignore_index(reduction, proba):
    """A row weighted 0 is a row ignored (index targets) or left out (probability targets): same loss,
    'mean' denominator and gradients (for the logits and for soft targets)."""
    rng = np.random.default_rng(11)
    lead, K = (12,), 6
    z, y, kw = make(rng, lead, K, OPTIONS["everything"], proba=proba)
    dropped = [0, 4, 5, 11]
    keep = np.setdiff1d(np.arange(12), dropped)
    sw_zero = kw.pop("sample_weight").clone()
    sw_zero[dropped] = 0.0
    go = (torch.tensor(rng.uniform(0.3, 2.0)) if reduction != "none"
          else torch.from_numpy(rng.uniform(-2, 2, lead)))
    results = []
    for target, sw, rows in ((y, sw_zero, slice(None)), (y, sw_zero[keep], keep)):
        if not proba and rows is keep:       # index targets: ignore the rows instead of removing them
            target, sw, rows = y.clone(), sw_zero.clone(), slice(None)
            target[dropped] = -100
            sw[dropped] = 1.7
        zg = z[rows].clone().requires_grad_()
        tg = target[rows].clone().requires_grad_(proba)
        loss = cross_entropy(zg, tg, sample_weight=sw, reduction=reduction, **kw)
        loss.backward(go if reduction != "none" else go[rows])
        results.append((loss.detach(), zg.grad, tg.grad))
    (l0, gz0, gt0), (l1, gz1, gt1) = results
    sel = keep if proba else slice(None)
    if reduction == "none":
        assert float(l0[dropped].abs().sum()) == 0.0
        l0 = l0[sel]
    assert torch.allclose(l0, l1, rtol=1e-12, atol=0)
    assert float(gz0[dropped].abs().sum()) == 0.0
    assert torch.allclose(gz0[sel], gz1, rtol=1e-12, atol=1e-15)
    if proba:
        assert float(gt0[dropped].abs().sum()) == 0.0 and torch.allclose(gt0[sel], gt1, rtol=1e-12,
                                                                           atol=1e-15)
    want_loss, want_grad = ref_loss.cross_entropy_with_grad(
        z.numpy(), y.detach().numpy(), reduction=reduction, grad_output=go.numpy(),
        sample_weight=sw_zero.numpy(), **np_kwargs(kw))
    assert rel_err(results[0][0], want_loss) <= TOL64 and rel_err(gz0, want_grad) <= TOL64


def test_zero_total_class_weight_is_zero_with_zero_gradient():
    """Every present class weighted 0 (the 'mean' denominator sum_i w[y_i] is 0): loss 0 and gradient 0,
    with label smoothing and z-loss on too (PyTorch gives NaN), as in the reference."""
    rng = np.random.default_rng(12)
    z = torch.from_numpy(rng.standard_normal((9, 5)) * 2)
    y = torch.from_numpy(rng.integers(0, 3, 9))
    y[4] = -100
    weight = torch.tensor([0.0, 0.0, 0.0, 1.3, 0.4], dtype=torch.float64)
    for kw in ({}, {"label_smoothing": 0.2, "z_loss": 0.1}, {"softcap": 2.0}):
        want_loss, want_grad = ref_loss.cross_entropy_with_grad(z.numpy(), y.numpy(), weight=weight.numpy(),
                                                                **kw)
        assert want_loss == 0.0 and np.abs(want_grad).max() == 0.0
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            zg = z.clone().to(dtype).requires_grad_()
            loss = cross_entropy(zg, y.to(torch.int32), weight=weight, **kw)
            loss.backward()
            assert float(loss.detach()) == 0.0 and not torch.isnan(zg.grad).any()
            assert float(zg.grad.abs().sum()) == 0.0


def _confident_logits(rng, N, K):
    """Rows whose target logit exceeds the others by 5 to 14: 1 - p_y from ~1e-5 to ~1e-2."""
    z = rng.standard_normal((N, K)) * 2
    y = rng.integers(0, K, N)
    z[np.arange(N), y] = z.max(axis=1) + rng.uniform(5.0, 14.0, N)
    return z, y


def test_large_confident_logits_are_finite_and_accurate():
    """float32 logits of +-1e4 (a target at +1e4: p_y = 1; a rival class at +1e4: loss ~1e4; a target at
    -1e4; a row of -1e4 and ordinary values): finite, and equal to the reference (per row, relative to
    max(|loss_i|, 1), as float32 logits of 1e4 are only known to ~1e-3)."""
    rng = np.random.default_rng(13)
    z, y = _confident_logits(rng, 8, 9)
    z[0, y[0]] = 1e4
    z[1, (y[1] + 1) % 9] = 1e4
    z[2, y[2]] = -1e4
    z[3, ::2] = -1e4
    z = torch.from_numpy(z).float()
    y = torch.from_numpy(y)
    zg = z.clone().requires_grad_()
    loss = cross_entropy(zg, y, reduction="none", z_loss=1e-4)
    go = torch.from_numpy(rng.uniform(0.5, 2.0, 8)).float()
    loss.backward(go)
    want_loss, want_grad = ref_loss.cross_entropy_with_grad(z.double().numpy(), y.numpy(), reduction="none",
                                                            z_loss=1e-4, grad_output=go.double().numpy())
    assert torch.isfinite(loss).all() and torch.isfinite(zg.grad).all()
    got = loss.detach().double().numpy()
    assert np.all(np.abs(got - want_loss) <= TOL32 * np.maximum(np.abs(want_loss), 1.0))
    assert got[1] > 9e3 and got[2] > 9e3
    assert rel_err(zg.grad, want_grad) <= TOL32


BF16_FACTOR = 1.0
"""The bf16 target-column gradient error of softxent must not exceed PyTorch's own (bf16 logits into
F.cross_entropy).  Measured on the CPU: softxent ~0.2% of max |p_y - 1| (float32 math, one rounding),
PyTorch ~10% (it flushes the smallest p_y - 1 to 0)."""


def test_bf16_confident_target_gradient_no_worse_than_pytorch():
    """bf16 logits with p_y ~ 1: dlogits_y = (p_y - 1) / N is tiny and formed by cancellation.  softxent
    forms it in float32 and rounds once: within 2^-8 relative plus a few float32 ulps of 1, and no
    worse than BF16_FACTOR times PyTorch's bf16 error, against the float64 truth on the same values."""
    rng = np.random.default_rng(14)
    N, K = 64, 50
    z, y = _confident_logits(rng, N, K)
    z, y = torch.from_numpy(z).to(torch.bfloat16), torch.from_numpy(y)
    rows = torch.arange(N)
    _, want = ref_loss.cross_entropy_with_grad(z.double().numpy(), y.numpy())
    want = want[rows, y]
    ours, theirs = z.clone().requires_grad_(), z.clone().requires_grad_()
    cross_entropy(ours, y).backward()
    torch.nn.functional.cross_entropy(theirs, y).backward()
    ours, theirs = ours.grad[rows, y], theirs.grad[rows, y]
    assert ours.dtype == torch.bfloat16 and (ours < 0).all()
    assert rel_err(ours, want) <= BF16_FACTOR * rel_err(theirs, want)
    err = np.abs(ours.double().numpy() - want)
    assert np.all(err <= 2.0**-8 * np.abs(want) + 2.0**-22 / N)


@pytest.mark.parametrize("call, exc, match", [
    (lambda z, y: cross_entropy(z, y, reduction="avg"), ValueError, r"reduction must be one of"),
    (lambda z, y: cross_entropy(z, y[:3]), ValueError, r"target of class indices must have shape \(4,\)"),
    (lambda z, y: cross_entropy(z, y.double()), TypeError, r"class probabilities \(floating\) of shape"),
    (lambda z, y: cross_entropy(z, torch.tensor([0, 1, 5, 0])), ValueError,
     r"class index 5, outside \[0, 5\)"),
    (lambda z, y: cross_entropy(z, -torch.ones(4, 5)), ValueError, r"probabilities must be finite and >= 0"),
    (lambda z, y: cross_entropy(z, y, weight=torch.ones(4)), ValueError, r"weight must have shape \(5,\)"),
    (lambda z, y: cross_entropy(z, y, weight=-torch.ones(5)), ValueError, r"weight must be finite and >= 0"),
    (lambda z, y: cross_entropy(z, y, sample_weight=torch.ones(5)), ValueError,
     r"sample_weight must have shape \(4,\)"),
    (lambda z, y: cross_entropy(z.long(), y), TypeError, r"logits must be a floating tensor"),
    (lambda z, y: cross_entropy(z[:, :0], y), ValueError, r"at least one class"),
    (lambda z, y: cross_entropy(z, y.tolist()), TypeError, r"target must be a torch.Tensor"),
    (lambda z, y: cross_entropy(z, y, label_smoothing=-0.1), ValueError, r"label_smoothing"),
    (lambda z, y: cross_entropy(z, y, softcap=float("inf")), ValueError, r"softcap"),
    (lambda z, y: cross_entropy(z, y, z_loss=float("nan")), ValueError, r"z_loss"),
    (lambda z, y: cross_entropy(z, y.bool()), TypeError, r"target must hold integer class indices"),
])
def test_bad_input_raises_clear_error(call, exc, match):
    z = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(exc, match=match):
        call(z, y)

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

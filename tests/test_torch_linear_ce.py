"""softxent.torch.linear_cross_entropy (every impl) against the float64 NumPy reference softxent.loss.

The truth for ``z = x W^T + b`` is ``softxent.loss.cross_entropy_with_grad`` on float64 copies, with
``dx = dz W``, ``dW = dz^T x``, ``db = sum_i dz_i``.  Every input is drawn fresh at random.
"""

from __future__ import annotations

import os
import re
import socket
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import softxent.loss as ref_loss  # noqa: E402
from softxent.torch import (  # noqa: E402
    LinearCrossEntropyLoss,
    cross_entropy,
    linear_cross_entropy,
    triton_available,
)

IMPLS = ["chunked", "torch"]
TRITON_OK = triton_available() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
# the Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU)
IMPLS_ALL = IMPLS + (["triton"] if TRITON_OK and not torch.cuda.is_available() else [])
# relative max-norm tolerance of float32 results against the float64 truth (float32 rounding is ~6e-8;
# sums over D <= 64 and V <= 50257 terms stay well below this, a wrong term is orders of magnitude off)
TOL32 = 2e-5
TOL64 = 1e-10


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def rel_err(got, want, scale=None) -> float:
    """max |got - want| / scale; ``scale`` defaults to max |want| (for sums that cancel, pass the sum of
    the absolute terms instead: rounding errors are proportional to it)."""
    got = np.asarray(got.detach().double().cpu() if isinstance(got, torch.Tensor) else got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    if scale is None:
        scale = np.abs(want).max(initial=0.0)
    return float(np.abs(got - want).max(initial=0.0) / max(scale, 1e-30))


def reference(x, w, b, y, *, shift=0, sample_weight=None, class_weight=None, normalizer=None,
              grad_output=1.0, reduction="mean", with_scales=False, **opts):
    """(loss, dx, dW, db, lse) in float64 from softxent.loss, with shift and normalizer applied (and
    the sums of absolute terms behind dx, dW, db with ``with_scales``)."""
    x64 = x.detach().double().numpy()
    w64 = w.detach().double().numpy()
    b64 = np.zeros(w.shape[0]) if b is None else b.detach().double().numpy()
    y64 = y.numpy()
    sw = None if sample_weight is None else sample_weight.double().numpy()
    full_x_shape = x64.shape
    if shift:
        T = x64.shape[-2]
        x64 = x64[..., : T - shift, :]
        y64 = y64[..., shift:]
        sw = None if sw is None else sw[..., shift:]
    z = x64 @ w64.T + b64
    go = grad_output
    red = reduction
    if normalizer is not None:
        go = grad_output / normalizer if normalizer else 0.0
    loss, dz = ref_loss.cross_entropy_with_grad(
        z, y64, sample_weight=sw, weight=None if class_weight is None else class_weight.double().numpy(),
        reduction=red, grad_output=np.asarray(go), **opts)
    if normalizer is not None:
        loss = loss / normalizer if normalizer else 0.0 * loss
    zc = z if opts.get("softcap") is None else opts["softcap"] * np.tanh(z / opts["softcap"])
    lse = ref_loss.logsumexp(zc)
    D = x64.shape[-1]
    dz2 = dz.reshape(-1, dz.shape[-1])
    dx = (dz2 @ w64).reshape(x64.shape)
    if shift:
        full = np.zeros(full_x_shape)
        full[..., : full_x_shape[-2] - shift, :] = dx
        dx = full
    dw = dz2.T @ x64.reshape(-1, D)
    db = dz2.sum(0)
    if not with_scales:
        return loss, dx, dw, db, lse
    adz = np.abs(dz2)
    scales = ((adz @ np.abs(w64)).max(initial=0), (adz.T @ np.abs(x64.reshape(-1, D))).max(initial=0),
              adz.sum(0).max(initial=0))
    return loss, dx, dw, db, lse, scales


def draw(rng, n, d, v, *, dtype=torch.float32, bias=True, lead=None, ignore=(), scale=1.0):
    """Fresh random inputs; ``ignore``: positions of the flat target to set to ignore_index -100."""
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    shape = (n,) if lead is None else tuple(lead)
    x = (torch.randn(*shape, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    b = (torch.randn(v, generator=g, dtype=torch.float64)).to(dtype) if bias else None
    y = torch.randint(0, v, shape, generator=g)
    flat = y.view(-1)
    for i in ignore:
        flat[i] = -100
    return x, w, b, y


def run(impl, x, w, b, y, grad_output, **kw):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    out = linear_cross_entropy(x, w, y, b, impl=impl, **kw)
    loss, lse = out if kw.get("return_lse") else (out, None)
    loss.backward(grad_output)
    return loss.detach(), x.grad, w.grad, None if b is None else b.grad, lse


def check(impl, x, w, b, y, *, tol=TOL32, grad_output=None, rng=None, **kw):
    red = kw.get("reduction", "mean")
    rng = rng or np.random.default_rng(0)
    lead = tuple(y.shape)
    shift = int(kw.get("shift", 0))
    out_shape = lead[:-1] + (lead[-1] - shift,) if shift else lead
    if grad_output is None:
        grad_output = (torch.tensor(float(rng.uniform(0.3, 2.0)), dtype=torch.float64) if red != "none"
                       else torch.from_numpy(rng.uniform(-2, 2, out_shape)))
    err, (loss, dx, dw, db, lse) = errors(impl, x, w, b, y, grad_output, **kw)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert loss.dtype == cdt and tuple(loss.shape) == (out_shape if red == "none" else ())
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    assert err["loss"] <= tol, ("loss", err["loss"])
    assert err["dx"] <= tol, ("dx", err["dx"])
    assert err["dw"] <= tol, ("dW", err["dw"])
    if b is not None:
        assert db.dtype == b.dtype
        assert err["db"] <= tol, ("db", err["db"])
    if lse is not None:
        assert tuple(lse.shape) == out_shape and lse.requires_grad   # differentiable (issue 17)
        assert err["lse"] <= tol


def errors(impl, x, w, b, y, grad_output, **kw):
    """``impl``'s relative errors against the float64 reference -- ``loss``, ``dx``, ``dw`` (and ``db``,
    ``lse`` when present; gradients against the sums of absolute terms) -- and its outputs."""
    ref_kw = {k: v for k, v in kw.items() if k not in ("max_chunk_bytes", "return_lse", "skip_threshold")}
    loss_r, dx_r, dw_r, db_r, lse_r, (s_dx, s_dw, s_db) = reference(
        x, w, b, y, grad_output=grad_output.numpy(), with_scales=True, **ref_kw)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = loss, dx, dw, db, lse = run(impl, x, w, b, y, grad_output.to(cdt), **kw)
    err = {"loss": rel_err(loss, loss_r), "dx": rel_err(dx, dx_r, s_dx), "dw": rel_err(dw, dw_r, s_dw)}
    if b is not None:
        err["db"] = rel_err(db, db_r, s_db)
    if lse is not None:
        err["lse"] = rel_err(lse, lse_r.reshape(lse.shape))
    return err, out


# --------------------------------------------------------------------------------------------------
# every option, every reduction, against the reference
# --------------------------------------------------------------------------------------------------
OPTIONS = {
    "plain": {},
    "ignored": {"ignore": True},
    "ignore_index_inside": {"ignore_index": 3},
    "smoothing": {"label_smoothing": 0.15, "ignore": True},
    "sample_weight": {"sample_weight": True, "ignore": True},
    "class_weight": {"class_weight": True, "ignore": True},
    "z_loss": {"z_loss": 0.05},
    "softcap": {"softcap": 2.5},
    "everything": {"label_smoothing": 0.2, "sample_weight": True, "class_weight": True, "z_loss": 0.03,
                   "softcap": 3.0, "ignore": True},
}
REDUCTIONS = ["mean", "sum", "none", "sum_normalizer"]


def build_kwargs(opt, rng, N, V, y):
    kw = {}
    for k, v in opt.items():
        if k == "ignore":
            continue
        if k == "sample_weight":
            kw[k] = torch.from_numpy(rng.uniform(0, 2, tuple(y.shape))).float()
        elif k == "class_weight":
            kw[k] = torch.from_numpy(rng.uniform(0.2, 2, V)).float()
        else:
            kw[k] = v
    if "ignore_index" in kw:
        y.view(-1)[: max(1, N // 4)] = kw["ignore_index"]
    return kw


@pytest.mark.parametrize("impl", IMPLS_ALL)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options_against_reference(impl, reduction, option):
    rng = np.random.default_rng(abs(hash((impl, reduction, option))) % 2**32)
    N, D, V = 23, 13, 37
    opt = OPTIONS[option]
    x, w, b, y = draw(rng, N, D, V, ignore=(1, 7, 8) if opt.get("ignore") else ())
    kw = build_kwargs(opt, rng, N, V, y)
    if reduction == "sum_normalizer":
        kw.update(reduction="sum", normalizer=float(rng.integers(5, 40)))
    else:
        kw["reduction"] = reduction
    if impl == "chunked":  # 5 rows per chunk (2 with the softcap's second buffer): N % R != 0
        kw["max_chunk_bytes"] = 5 * V * 4
    check(impl, x, w, b, y, rng=rng, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float64_inputs_exact(impl, reduction):
    rng = np.random.default_rng(1)
    x, w, b, y = draw(rng, 17, 6, 9, dtype=torch.float64, ignore=(3,))
    check(impl, x, w, b, y, tol=TOL64, reduction=reduction, label_smoothing=0.1, z_loss=0.02,
          softcap=4.0, max_chunk_bytes=3 * 9 * 8)


@pytest.mark.parametrize("max_chunk_bytes", [1, 4 * 31 * 4, 7 * 31 * 4, 10**9])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunk_sizes(max_chunk_bytes, reduction):
    """1 row per chunk, chunks that do not divide N = 30, and a single chunk all give the same answer."""
    rng = np.random.default_rng(max_chunk_bytes)
    x, w, b, y = draw(rng, 30, 11, 31, ignore=(0, 29))
    check("chunked", x, w, b, y, reduction=reduction, label_smoothing=0.1, max_chunk_bytes=max_chunk_bytes)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V", [1, 2, 31, 50257])
def test_odd_vocabulary_sizes(impl, V):
    rng = np.random.default_rng(V)
    N = 6 if V > 1000 else 19
    x, w, b, y = draw(rng, N, 5, V, ignore=(2,))
    kw = {"max_chunk_bytes": 4 * V * 4} if impl == "chunked" else {}
    check(impl, x, w, b, y, label_smoothing=0.1, z_loss=0.01, **kw)
    if V == 1:  # one class: zero loss (bar the z-loss) and zero softmax gradient
        loss, dx, dw, _, _ = run(impl, x, w, b, y, torch.tensor(1.0), **kw)
        loss = loss.detach()
        assert float(loss) == 0.0 and float(dx.abs().max()) == 0.0 and float(dw.abs().max()) == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_dims_shift_and_return_lse(impl):
    rng = np.random.default_rng(5)
    x, w, b, y = draw(rng, None, 7, 19, lead=(2, 3, 6), ignore=(4, 11))
    sw = torch.from_numpy(rng.uniform(0, 1, (2, 3, 6))).float()
    for shift in (0, True, 2):
        for reduction in ("mean", "none"):
            check(impl, x, w, b, y, shift=shift, reduction=reduction, sample_weight=sw, return_lse=True,
                  **({"max_chunk_bytes": 4 * 19 * 4} if impl == "chunked" else {}))


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    rng = np.random.default_rng(6)
    g = torch.Generator().manual_seed(6)
    N, D, V = 14, 9, 21
    x = torch.randn(D, 2 * N, generator=g).T[::2]          # transposed and strided
    w = torch.randn(D, V, generator=g).T                   # transposed
    b = torch.randn(2 * V, generator=g)[::2]
    y = torch.randint(0, V, (3 * N,), generator=g)[::3]
    sw = torch.rand(2 * N, generator=g)[1::2]
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous() or y.is_contiguous())
    x0, w0 = x.clone(), w.clone()
    check(impl, x, w, b, y, sample_weight=sw, reduction="none", rng=rng,
          **({"max_chunk_bytes": 3 * V * 4} if impl == "chunked" else {}))
    assert torch.equal(x, x0) and torch.equal(w, w0)   # inputs are never modified


@pytest.mark.parametrize("impl", IMPLS_ALL)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_class_with_softcap_has_exactly_zero_gradient(impl, reduction):
    """V = 1: h = 1 exactly, so the loss and every gradient are 0 -- also with a softcap and 'none', where
    the chunked backward recomputes the logits: it must see bitwise the z its forward saw (chunks of the
    same shape), or exp(zhat - lse) != 1 leaves float32-rounding gradients (~1e-6 before the fix)."""
    rng = np.random.default_rng()
    N = 34
    x, w, b, y = draw(rng, N, 13, 1, scale=3.0)
    go = torch.tensor(1.3) if reduction == "mean" else torch.from_numpy(rng.uniform(-2, 2, N)).float()
    kw = {"max_chunk_bytes": 40} if impl == "chunked" else {}  # several chunks, shaped by the softcap
    loss, dx, dw, db, _ = run(impl, x, w, b, y, go, softcap=float(rng.uniform(0.5, 10)), reduction=reduction,
                              **kw)
    assert float(loss.abs().sum()) == 0.0
    for g in (dx, dw, db):
        assert float(g.abs().max()) == 0.0


def assert_zero_loss_and_gradients(result):
    loss, *grads = result[:4]
    assert float(loss) == 0.0 and not torch.isnan(loss).any()
    for g in grads:
        if g is not None:
            assert not torch.isnan(g).any() and float(g.abs().sum()) == 0.0


@pytest.mark.parametrize("impl", IMPLS_ALL)
def test_mean_over_nothing_is_zero_with_zero_gradient(impl):
    """All targets ignored, an empty batch, zero total sample weight, zero total class weight (every
    present class weighted 0, with smoothing and z-loss on) and a zero normalizer: loss 0, gradients 0
    (PyTorch's 'mean' gives NaN here), as in the reference."""
    rng = np.random.default_rng(7)
    one = torch.tensor(1.0)
    x, w, b, y = draw(rng, 8, 4, 5, ignore=range(8))
    assert_zero_loss_and_gradients(run(impl, x, w, b, y, one))
    x0, w0, b0, y0 = draw(rng, 0, 4, 5)                  # empty batch
    loss, dx, dw, db, _ = run(impl, x0, w0, b0, y0, one)
    assert dx.shape == (0, 4)
    assert_zero_loss_and_gradients((loss, dx, dw, db))
    x, w, b, y = draw(rng, 8, 4, 5)
    assert_zero_loss_and_gradients(run(impl, x, w, b, y, one, sample_weight=torch.zeros(8)))
    assert_zero_loss_and_gradients(run(impl, x, w, b, y, one, reduction="sum", normalizer=0))
    y = torch.from_numpy(rng.integers(0, 3, 8))          # classes 0..2 present, weighted 0
    y[0] = -100
    cw = torch.tensor([0.0, 0.0, 0.0, 1.5, 0.7])
    for kw in ({}, {"label_smoothing": 0.2, "z_loss": 0.1}):
        want_loss, *want_grads = reference(x, w, b, y, class_weight=cw, **kw)[:4]
        assert want_loss == 0.0 and all(np.abs(g).max() == 0.0 for g in want_grads)
        assert_zero_loss_and_gradients(run(impl, x, w, b, y, one, class_weight=cw, **kw))


# --------------------------------------------------------------------------------------------------
# gradients only where needed
# --------------------------------------------------------------------------------------------------
class _RecordShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor that an aten op allocates (views and out= results, which share
    an input's storage, are not allocations)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in leaves
                  if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes()}
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("impl", ["chunked"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_weight_allocates_no_weight_gradient(impl, reduction):
    N, D, V = 8, 11, 37    # chunk buffers (R, V) with R <= 8 never have the shape (V, D) = (37, 11)
    rng = np.random.default_rng(8)
    x, w, b, y = draw(rng, N, D, V)
    for w_requires_grad in (True, False):   # the True run shows that the recorder sees dW
        xg = x.clone().requires_grad_()
        wg = w.clone().requires_grad_(w_requires_grad)
        with _RecordShapes() as rec:
            loss = linear_cross_entropy(xg, wg, y, impl=impl, reduction=reduction,
                                        max_chunk_bytes=3 * V * 4)
            loss.backward(torch.ones_like(loss))
        assert ((V, D) in rec.shapes) == w_requires_grad
        assert wg.grad is None if not w_requires_grad else wg.grad is not None
        assert xg.grad is not None
    # frozen x: no (N, D) gradient (chunks of 3 rows: the target term's (R, D) rows are not (N, D))
    wg = w.clone().requires_grad_()
    with _RecordShapes() as rec:
        linear_cross_entropy(x, wg, y, impl=impl, reduction=reduction, max_chunk_bytes=3 * V * 4).sum().backward()
    assert (N, D) not in rec.shapes and wg.grad is not None


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_computes_no_gradient(impl):
    N, D, V = 8, 11, 37
    rng = np.random.default_rng(9)
    x, w, b, y = draw(rng, N, D, V)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.no_grad(), _RecordShapes() as rec:
        loss = linear_cross_entropy(xg, wg, y, impl=impl)
    assert not loss.requires_grad
    assert (V, D) not in rec.shapes and (N, D) not in rec.shapes
    with_grad = linear_cross_entropy(xg, wg, y, impl=impl)
    assert torch.allclose(loss, with_grad.detach(), rtol=1e-6)


def test_bias_gradient_only_when_required():
    rng = np.random.default_rng(10)
    x, w, b, y = draw(rng, 9, 5, 7)
    wg = w.clone().requires_grad_()
    linear_cross_entropy(x, wg, y, b, impl="chunked").backward()   # frozen bias, trainable weight
    assert b.grad is None and wg.grad is not None


# --------------------------------------------------------------------------------------------------
# bf16 / fp16
# --------------------------------------------------------------------------------------------------
BF16_FACTOR = 2.0
"""Our bf16/fp16 errors (loss, dx, dW, db against the float64 truth on the same low-precision values) must
be at most this many times plain PyTorch's (low-precision ``x @ W.T`` -> float ``F.cross_entropy`` ->
backward).  Measured: the chunked path's gradient errors are about half of PyTorch's (only the final
rounding to bf16), its loss error ~1e-8 against PyTorch's ~1e-4; impl='torch' equals PyTorch."""


def _naive_bf16(x, w, b, y):
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    bg = b.clone().requires_grad_()
    z = torch.nn.functional.linear(xg, wg, bg)
    loss = torch.nn.functional.cross_entropy(z.float(), y)
    loss.backward()
    return loss, xg.grad, wg.grad, bg.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_errors_no_larger_than_pytorch(impl, dtype):
    rng = np.random.default_rng(11)
    N, D, V = 64, 40, 300
    x, w, b, y = draw(rng, N, D, V, dtype=dtype, scale=0.6)  # peaked softmax: logits of size ~5
    truth = reference(x, w, b, y)
    naive = _naive_bf16(x, w, b, y)
    ours = run(impl, x, w, b, y, torch.tensor(1.0), max_chunk_bytes=7 * V * 4 if impl == "chunked"
               else None)
    assert ours[0].dtype == torch.float32
    for name, k in (("loss", 0), ("dx", 1), ("dW", 2), ("db", 3)):
        assert ours[k].dtype == (torch.float32 if k == 0 else dtype)
        e_ours, e_naive = rel_err(ours[k], truth[k]), rel_err(naive[k], truth[k])
        assert e_ours <= BF16_FACTOR * e_naive, (name, e_ours, e_naive)
    if impl == "chunked":   # float32 math inside: the loss is float32-accurate, not bf16-accurate
        assert rel_err(ours[0], truth[0]) <= 1e-5


def test_autocast_casts_like_linear():
    rng = np.random.default_rng(12)
    x, w, b, y = draw(rng, 16, 8, 10)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(xg, wg, y, impl="chunked")
    loss.backward()
    assert loss.dtype == torch.float32 and xg.grad.dtype == torch.float32
    truth = reference(x.bfloat16(), w.bfloat16(), None, y)
    assert rel_err(loss, truth[0]) <= 1e-5
    assert rel_err(xg.grad, truth[1]) <= 2.0**-7   # the autocast copy's gradient is rounded to bf16


# --------------------------------------------------------------------------------------------------
# gradient accumulation, gradcheck, module
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS_ALL)
def test_gradient_accumulation_with_normalizer_equals_full_batch(impl):
    rng = np.random.default_rng(13)
    B, T, D, V = 4, 9, 6, 23
    x, w, b, y = draw(rng, None, D, V, lead=(B, T), ignore=(0, 5, 6, 30))
    xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    full = linear_cross_entropy(xg, wg, y, bg, shift=True, impl=impl)
    full.backward()
    n_tokens = int((y[:, 1:] != -100).sum())
    xa, wa, ba = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):     # uneven micro-batches
        part = linear_cross_entropy(xa[rows], wa, y[rows], ba, shift=True, reduction="sum",
                                    normalizer=torch.tensor(n_tokens), impl=impl)
        part.backward()
        total += float(part.detach())
    assert abs(total - float(full.detach())) <= 1e-6 * abs(float(full.detach()))
    for got, want in ((xa.grad, xg.grad), (wa.grad, wg.grad), (ba.grad, bg.grad)):
        assert rel_err(got, want.double().numpy()) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(impl, reduction):
    g = torch.Generator().manual_seed(14)
    N, D, V = 6, 4, 5
    x = torch.randn(N, D, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    y[2] = -100

    def f(x_, w_, b_):
        return linear_cross_entropy(x_, w_, y, b_, reduction=reduction, label_smoothing=0.1, z_loss=0.05,
                                    softcap=2.0, impl=impl, max_chunk_bytes=4 * V * 8 if impl == "chunked"
                                    else None)

    assert torch.autograd.gradcheck(f, (x, w, b))


DOUBLE_BACKWARD = r"softxent.torch computes first derivatives only: .* \(double backward\)"


@pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph=True")
@pytest.mark.parametrize("impl", IMPLS_ALL)
def test_double_backward_raises_a_clear_error(impl):
    """A gradient taken with create_graph=True is still right, and differentiating it again (a gradient
    penalty), with respect to x or W, raises instead of returning a silently wrong second derivative
    (without the guard, impl='torch' treated dz as a constant and returned one)."""
    rng = np.random.default_rng(15)
    x, w, b, y = draw(rng, 6, 3, 5, ignore=(2,))
    truth = reference(x, w, b, y)
    for wrt in ("x", "weight", "backward"):
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        loss = linear_cross_entropy(xg, wg, y, bg, impl=impl)
        if wrt == "backward":
            loss.backward(create_graph=True)
            gx = xg.grad
        else:
            (gx,) = torch.autograd.grad(loss, xg, create_graph=True)
        assert rel_err(gx, truth[1]) <= TOL32
        penalty = gx.square().sum()
        with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
            if wrt == "backward":
                penalty.backward()
            else:
                torch.autograd.grad(penalty, xg if wrt == "x" else wg)


def test_module_matches_function():
    rng = np.random.default_rng(16)
    x, w, b, y = draw(rng, None, 8, 12, lead=(2, 5))
    cw = torch.rand(12)
    mod = LinearCrossEntropyLoss(label_smoothing=0.1, class_weight=cw, shift=True, impl="chunked")
    assert "shift=True" in repr(mod)
    got = mod(x, w, y, b)
    want = linear_cross_entropy(x, w, y, b, label_smoothing=0.1, class_weight=cw, shift=True,
                                impl="chunked")
    assert torch.equal(got, want)
    loss, lse = mod(x, w, y, b, return_lse=True)
    assert lse.shape == (2, 4)


def test_torch_compile_traces_without_graph_breaks():
    """Dynamo traces the whole call (host value checks are skipped while compiling)."""
    rng = np.random.default_rng(17)
    x, w, b, y = draw(rng, 12, 6, 9, ignore=(3,))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

    def f(x_, w_):
        return linear_cross_entropy(x_, w_, y, impl="chunked", max_chunk_bytes=5 * 9 * 4)

    torch._dynamo.reset()
    loss = torch.compile(f, backend="eager", fullgraph=True)(xg, wg)
    loss.backward()
    truth = reference(x, w, None, y)
    assert rel_err(loss, truth[0]) <= TOL32 and rel_err(xg.grad, truth[1]) <= TOL32


@pytest.mark.parametrize("impl", IMPLS_ALL)
def test_module_reduction_none_gives_per_token_losses(impl):
    """LinearCrossEntropyLoss(reduction='none') with shift: per-token losses shaped (B, T - 1), equal to
    the function's, and loss and gradients for a random per-token grad_output equal the reference."""
    rng = np.random.default_rng(24)
    B, T, D, V = 2, 6, 8, 12
    x, w, b, y = draw(rng, None, D, V, lead=(B, T), ignore=(3, 8))
    cw = torch.from_numpy(rng.uniform(0.3, 2.0, V)).float()
    sw = torch.from_numpy(rng.uniform(0.0, 2.0, (B, T))).float()
    opts = dict(label_smoothing=0.1, z_loss=0.02, softcap=4.0)
    mod = LinearCrossEntropyLoss(reduction="none", class_weight=cw, shift=True, impl=impl, **opts)
    go = torch.from_numpy(rng.uniform(-2.0, 2.0, (B, T - 1)))
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    loss = mod(xg, wg, y, bg, sample_weight=sw)
    func = linear_cross_entropy(x, w, y, b, reduction="none", class_weight=cw, sample_weight=sw,
                                shift=True, impl=impl, **opts)
    assert loss.shape == (B, T - 1) and torch.equal(loss.detach(), func)
    assert float(func[0, 2]) == 0.0 and float(func[1, 1]) == 0.0     # targets y[0, 3], y[1, 2] ignored
    loss.backward(go.float())
    want_loss, dx, dw, db, _, scales = reference(x, w, b, y, shift=1, reduction="none", sample_weight=sw,
                                                 class_weight=cw, grad_output=go.numpy(),
                                                 with_scales=True, **opts)
    assert rel_err(loss, want_loss) <= TOL32
    for got, want, scale in zip((xg.grad, wg.grad, bg.grad), (dx, dw, db), scales):
        assert rel_err(got, want, scale) <= TOL32


@pytest.mark.parametrize("impl", IMPLS_ALL)
def test_int32_targets_equal_int64(impl):
    """int32 class indices (which F.cross_entropy refuses) give the int64 result, bit for bit."""
    rng = np.random.default_rng(25)
    x, w, b, y = draw(rng, None, 7, 13, lead=(2, 5), ignore=(3, 6))
    kw = dict(shift=True, reduction="none", label_smoothing=0.1, z_loss=0.01)
    go = torch.from_numpy(rng.uniform(-2.0, 2.0, (2, 4))).float()
    want = run(impl, x, w, b, y, go, **kw)
    got = run(impl, x, w, b, y.to(torch.int32), go, **kw)
    for a, e in zip(got[:4], want[:4]):
        assert torch.equal(a, e)
    check(impl, x, w, b, y.to(torch.int32), rng=rng, **kw)


@pytest.mark.parametrize("impl", IMPLS_ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_sample_weight_equals_ignore_index(impl, reduction):
    """A token weighted 0 is a token ignored: same loss (and 'mean' denominator) and gradients."""
    rng = np.random.default_rng(26)
    N, D, V = 12, 6, 9
    x, w, b, y = draw(rng, N, D, V)
    dropped = [1, 4, 5, 11]
    sw = torch.from_numpy(rng.uniform(0.2, 2.0, N)).float()
    sw_zero = sw.clone()
    sw_zero[dropped] = 0.0
    y_ignored = y.clone()
    y_ignored[dropped] = -100
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=0.02,
              class_weight=torch.from_numpy(rng.uniform(0.5, 2.0, V)).float())
    go = (torch.tensor(float(rng.uniform(0.3, 2.0))) if reduction != "none"
          else torch.from_numpy(rng.uniform(-2.0, 2.0, N)).float())
    weighted = run(impl, x, w, b, y, go, sample_weight=sw_zero, **kw)
    ignored = run(impl, x, w, b, y_ignored, go, sample_weight=sw, **kw)
    for a, e in zip(weighted[:4], ignored[:4]):
        assert rel_err(a, e.double().numpy()) <= 1e-6
    if reduction == "none":
        assert float(weighted[0][dropped].abs().sum()) == 0.0
    check(impl, x, w, b, y, sample_weight=sw_zero, rng=rng, **kw)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_never_allocates_n_by_v(reduction):
    """impl='chunked' with R = 4 rows per chunk (N = 64): no tensor of N x V or more elements is created
    in forward and backward, with every option on; impl='torch' shows that the recorder sees one."""
    N, D, V, R = 64, 5, 37, 4
    rng = np.random.default_rng(27)
    x, w, b, y = draw(rng, N, D, V, ignore=(0, 9))
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=0.01, softcap=3.0,
              sample_weight=torch.from_numpy(rng.uniform(0, 2, N)).float(),
              class_weight=torch.from_numpy(rng.uniform(0.5, 2, V)).float())
    largest = {}
    for impl in ("torch", "chunked"):
        xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
        with _RecordShapes() as rec:
            loss = linear_cross_entropy(xg, wg, y, bg, impl=impl, max_chunk_bytes=R * V * 4, **kw)
            loss.backward(torch.ones_like(loss))
        largest[impl] = max(int(np.prod(s)) for s in rec.shapes)
    assert largest["torch"] >= N * V
    assert largest["chunked"] <= max(R * V, N * D, V * D) < N * V, largest
    check("chunked", x, w, b, y, rng=rng, max_chunk_bytes=R * V * 4, **kw)


def _identity_head_inputs(rng, N, V, dtype):
    """``x`` (N, V) that are the logits themselves under ``W = I`` (so ``dx`` is ``dlogits``): rows whose
    target is ``gap`` above every other logit (1 - p_y between ~1e-5 and ~1e-2)."""
    x = rng.normal(0.0, 2.0, (N, V))
    y = rng.integers(0, V, N)
    x[np.arange(N), y] = x.max(axis=1) + rng.uniform(5.0, 14.0, N)
    return (torch.from_numpy(x).to(dtype), torch.eye(V, dtype=torch.float64).to(dtype),
            torch.from_numpy(y))


@pytest.mark.parametrize("impl", IMPLS_ALL)
def test_large_confident_logits(impl):
    """float32 logits of +-1e4 (a target at +1e4: p_y = 1; a rival at +1e4: loss ~1e4; a target at
    -1e4) give finite losses and gradients that match the reference; in bf16 the target column of
    dlogits (p_y - 1, tiny) is as accurate as one rounding of a float32 value, and no worse than
    BF16_FACTOR times PyTorch's bf16 F.linear + F.cross_entropy."""
    rng = np.random.default_rng(28)
    N, V = 16, 12
    kw = {"max_chunk_bytes": 3 * V * 4} if impl == "chunked" else {}
    x, w, y = _identity_head_inputs(rng, N, V, torch.float32)
    x[0, y[0]] = 1e4
    x[1, (int(y[1]) + 1) % V] = 1e4
    x[2, y[2]] = -1e4
    x[3, ::2] = -1e4
    loss, dx, dw, _, _ = run(impl, x, w, None, y, torch.ones(N), reduction="none", **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    assert float(loss[0]) == 0.0 and float(loss[1]) > 9e3 and float(loss[2]) > 9e3
    check(impl, x, w, None, y, reduction="none", **kw)

    n = 64
    x, w, y = _identity_head_inputs(rng, n, 50, torch.bfloat16)
    rows = torch.arange(n)
    _, want, _, _, lse = reference(x, w, None, y)
    want = want[rows, y]                                        # dlogits_y = (p_y - 1) / n
    ours = run(impl, x, w, None, y, torch.tensor(1.0), **kw)[1][rows, y].double().numpy()
    xg = x.clone().requires_grad_()
    torch.nn.functional.cross_entropy(torch.nn.functional.linear(xg, w), y).backward()
    theirs = xg.grad[rows, y]
    assert rel_err(torch.from_numpy(ours), want) <= BF16_FACTOR * rel_err(theirs, want)
    if impl != "triton":
        # one rounding to bf16 (2^-9 relative) of p_y - 1 formed in float32 (a few ulps of 1 = 2^-23)
        bound = 2.0**-8 * np.abs(want) + 2.0**-22 / n
    else:
        # the kernels form the target column from q = 1 - p_y (summed without the target in the forward,
        # so no ulps of lse), then round delta to 16 bits for the dx product and dx once more: two
        # roundings (the interpreter truncates bf16 stores: up to 2^-8 each)
        bound = 2.0**-7 * np.abs(want) + 2.0**-22 / n
    assert np.all(np.abs(ours - want) <= bound), np.max(np.abs(ours - want) / bound)


# --------------------------------------------------------------------------------------------------
# the Triton path (interpreter on CPU), when the kernels exist
# --------------------------------------------------------------------------------------------------
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton kernels not importable, or neither "
                                  "CUDA nor TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_frozen_weight_shift_and_lse(reduction):
    rng = np.random.default_rng(19)
    x, w, b, y = draw(rng, None, 16, 40, lead=(2, 5), ignore=(3,))
    x, w, b, y = x.to(DEV), w.to(DEV), b.to(DEV), y.to(DEV)
    xg = x.clone().requires_grad_()
    loss, lse = linear_cross_entropy(xg, w, y, b, impl="triton", shift=True, reduction=reduction,
                                     return_lse=True)
    loss.backward(torch.ones_like(loss))
    assert w.grad is None and b.grad is None and lse.shape == (2, 4)
    truth = reference(x.cpu(), w.cpu(), b.cpu(), y.cpu(), shift=1, reduction=reduction)
    tol = TOL32 if DEV == "cpu" else 1e-2   # TF32 products on a GPU
    assert rel_err(loss.cpu(), truth[0]) <= tol and rel_err(xg.grad.cpu(), truth[1]) <= tol
    assert rel_err(lse.cpu(), truth[4].reshape(2, 4)) <= tol


@needs_triton
def test_triton_asks_only_for_the_gradients_needed(monkeypatch):
    """(Triton's interpreter copies every argument, so allocations are not observable there: check the
    flags the kernels receive instead.)"""
    from softxent.torch import _triton_kernels as kernels

    calls = []
    real = kernels.lce_backward

    def spy(*args, **kwargs):
        calls.append({k: kwargs[k] for k in ("need_dx", "need_dw", "need_db")})
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "lce_backward", spy)
    rng = np.random.default_rng(23)
    x, w, b, y = draw(rng, 8, 16, 20)
    x, w, b, y = x.to(DEV), w.to(DEV), b.to(DEV), y.to(DEV)
    for rx, rw, rb in ((True, False, False), (False, True, False), (False, False, True)):
        xg, wg, bg = (x.clone().requires_grad_(rx), w.clone().requires_grad_(rw),
                      b.clone().requires_grad_(rb))
        linear_cross_entropy(xg, wg, y, bg, impl="triton").backward()
        assert calls[-1] == {"need_dx": rx, "need_dw": rw, "need_db": rb}
        assert (xg.grad is not None, wg.grad is not None, bg.grad is not None) == (rx, rw, rb)
    n_calls = len(calls)
    with torch.no_grad():
        linear_cross_entropy(x.clone().requires_grad_(), w, y, impl="triton")
    assert len(calls) == n_calls


@needs_triton
def test_triton_bf16_errors_no_larger_than_pytorch():
    rng = np.random.default_rng(20)
    N, D, V = 48, 32, 200
    x, w, b, y = draw(rng, N, D, V, dtype=torch.bfloat16, scale=0.6)
    truth = reference(x, w, b, y)
    naive = _naive_bf16(x, w, b, y)
    ours = run("triton", x.to(DEV), w.to(DEV), b.to(DEV), y.to(DEV), torch.tensor(1.0, device=DEV))
    for name, k in (("loss", 0), ("dx", 1), ("dW", 2), ("db", 3)):
        assert ours[k].dtype == (torch.float32 if k == 0 else torch.bfloat16)
        e_ours, e_naive = rel_err(ours[k].cpu(), truth[k]), rel_err(naive[k], truth[k])
        assert e_ours <= BF16_FACTOR * e_naive, (name, e_ours, e_naive)


@needs_triton
def test_triton_skip_threshold_is_passed_and_bounded():
    """The opt-in skip changes the gradient (so it reaches the kernels) by no more than its bound."""
    rng = np.random.default_rng(21)
    N, D, V = 32, 16, 96
    x, w, _, y = draw(rng, N, D, V, bias=False, scale=0.5)
    y = y % 16                      # targets in the first vocabulary tile: the other tiles can be skipped
    x = x + 4.0 * w[y]              # a trained-LM-like peaked softmax: most probabilities are tiny
    x, w, y = x.to(DEV), w.to(DEV), y.to(DEV)
    exact = run("triton", x, w, None, y, torch.tensor(1.0, device=DEV))
    thr = 0.05
    approx = run("triton", x, w, None, y, torch.tensor(1.0, device=DEV), skip_threshold=thr)
    assert torch.equal(exact[0], approx[0])                  # the loss is exact either way
    diff = (approx[1] - exact[1]).abs().max()
    # every dropped delta_ij is below thr * max_i alpha_i = thr / N, and a dropped tile is replaced by
    # its first-order part (its row sums times the tile's mean W row): |ddx| <= thr / N * sum_j
    # |W_j - mean_tile W| <= 2 thr / N * sum_j |W_j|
    bound = 2 * thr / N * w.abs().sum(0).max()
    assert 0 < diff <= bound, (float(diff), float(bound))


@needs_triton
def test_triton_auto_skip_threshold_is_eps_times_1024_over_v(monkeypatch):
    """skip_threshold='auto' is eps(dtype) * min(1, 1024 / V) per probability: the kernels get exactly
    what the explicit number gives."""
    import softxent.torch._linear_cross_entropy as lce
    K = lce._triton_kernels()
    assert K.auto_skip_threshold(torch.bfloat16, 256000) == 2.0 ** -7 * 1024 / 256000
    assert K.auto_skip_threshold(torch.float16, 512) == 2.0 ** -10
    rng = np.random.default_rng()
    N, D, V = 24, 16, 2048
    x, w, _, y = draw(rng, N, D, V, bias=False, scale=0.5)
    x = x + 4.0 * w[y]
    x, w, y = x.to(DEV), w.to(DEV), y.to(DEV)
    seen = []
    real = K.lce_backward

    def spy(*args, **kwargs):
        seen.append(float(kwargs["skip_threshold"]))  # a device tensor: the kernel reads it
        return real(*args, **kwargs)

    monkeypatch.setattr(K, "lce_backward", spy)
    auto = run("triton", x, w, None, y, torch.tensor(1.0, device=DEV), skip_threshold="auto")
    explicit = run("triton", x, w, None, y, torch.tensor(1.0, device=DEV),
                   skip_threshold=K.auto_skip_threshold(torch.float32, V))
    assert seen[0] == seen[1] == pytest.approx(2.0 ** -23 * 0.5 / N)
    for a, e in zip(auto, explicit):
        assert a is e is None or torch.equal(a, e)


@pytest.mark.parametrize("error", [AttributeError("module 'triton' has no attribute 'Config'"),
                                   RuntimeError("Triton: unsupported driver"), ImportError("no triton")],
                         ids=lambda e: type(e).__name__)
def test_broken_triton_install_falls_back_to_chunked(monkeypatch, error):
    """A Triton that fails at kernel import with any exception (an API change raises AttributeError or
    RuntimeError while the kernels are decorated, not ImportError): triton_available() is False,
    impl='auto' picks 'chunked' even for CUDA tensors, and impl='triton' names the cause."""
    import softxent.torch._linear_cross_entropy as lce

    def broken_import():
        raise error

    monkeypatch.setattr(lce, "_TRITON_STATE", {})
    monkeypatch.setattr(lce, "_triton_kernels", broken_import)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert lce.triton_available() is False
    assert lce._resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == "chunked"
    x, w, b, y = draw(np.random.default_rng(29), 10, 6, 9)
    assert torch.equal(linear_cross_entropy(x, w, y, b), linear_cross_entropy(x, w, y, b, impl="chunked"))
    cause = re.escape(f"{type(error).__name__}: {error}")
    with pytest.raises(ValueError, match=r"impl='triton' needs the triton package and softxent's kernels "
                                         rf".*failed to import \({cause}\)"):
        linear_cross_entropy(x, w, y, b, impl="triton")


def test_impl_choice_with_importable_kernels(monkeypatch):
    """With kernels that import, 'auto' is 'triton' for 16/32-bit CUDA tensors only, and impl='triton'
    refuses float64 with the remedy (checked before any kernel runs)."""
    import softxent.torch._linear_cross_entropy as lce

    monkeypatch.setattr(lce, "_TRITON_STATE", {})
    monkeypatch.setattr(lce, "_triton_kernels", lambda: object())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert lce.triton_available() is True
    assert lce._resolve_impl("auto", cuda, torch.bfloat16) == "triton"
    assert lce._resolve_impl("auto", cuda, torch.float64) == "chunked"
    assert lce._resolve_impl("auto", cpu, torch.float32) == "chunked"
    x, w, b, y = draw(np.random.default_rng(30), 5, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"impl='triton' takes float16, bfloat16 or float32 inputs; got "
                                         r"float64 \(use impl='chunked'\)"):
        linear_cross_entropy(x, w, y, b, impl="triton")


def test_auto_is_chunked_off_cuda():
    rng = np.random.default_rng(22)
    x, w, b, y = draw(rng, 10, 6, 9)
    assert torch.equal(linear_cross_entropy(x, w, y, b), linear_cross_entropy(x, w, y, b, impl="chunked"))


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def _ok_inputs():
    g = torch.Generator().manual_seed(18)
    return torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g), torch.randint(0, 5, (6,),
                                                                                          generator=g)


@pytest.mark.parametrize("change, exc, match", [
    (dict(target=torch.tensor([0, 1, 2, 3, 4, 5])), ValueError, r"class index 5, outside \[0, 5\)"),
    (dict(target=torch.tensor([0, 1, -1, 3, 4, 0])), ValueError, r"class index -1"),
    (dict(target=torch.zeros(6)), TypeError, r"target must hold integer class indices"),
    (dict(target=torch.zeros(5, dtype=torch.long)), ValueError, r"target must have shape"),
    (dict(weight=torch.randn(5, 3)), ValueError, r"weight must have shape \(V, D\) with D = x.shape\[-1\] = 4"),
    (dict(weight=torch.randn(5, 4, dtype=torch.float64)), TypeError, r"share one dtype"),
    (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(V,\) = \(5,\)"),
    (dict(x=torch.randn(6, 4).int()), TypeError, r"x must be a floating tensor"),
    (dict(x=np.zeros((6, 4))), TypeError, r"x must be a torch.Tensor"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be a number in \[0, 1\]"),
    (dict(softcap=0.0), ValueError, r"softcap must be None or a finite number > 0"),
    (dict(z_loss=-1.0), ValueError, r"z_loss must be a finite number >= 0"),
    (dict(max_chunk_bytes=0), ValueError, r"max_chunk_bytes must be None or an int > 0"),
    (dict(impl="cuda"), ValueError, r"impl must be one of"),
    (dict(normalizer=5.0), ValueError, r"normalizer .* needs reduction='sum'"),
    (dict(reduction="sum", normalizer=-2.0), ValueError, r"normalizer must be finite and >= 0"),
    (dict(reduction="sum", normalizer=torch.tensor(-2.0)), ValueError, r"normalizer must be finite"),
    (dict(reduction="sum", normalizer=torch.ones(2)), ValueError, r"one-element"),
    (dict(sample_weight=torch.ones(5)), ValueError, r"sample_weight must have shape \(6,\)"),
    (dict(sample_weight=-torch.ones(6)), ValueError, r"sample_weight must be finite and >= 0"),
    (dict(class_weight=torch.ones(4)), ValueError, r"class_weight must have shape \(5,\)"),
    (dict(class_weight=torch.full((5,), float("nan"))), ValueError, r"class_weight must be finite"),
    (dict(shift=True), ValueError, r"shift must be in \[0, T\)"),  # T = 6 rows, x 2-D: T = 6 is fine
    (dict(shift=-1), ValueError, r"shift must be a bool or an int >= 0"),
    (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int"),
    (dict(skip_threshold=0.5, impl="chunked"), ValueError, r"skip_threshold .* needs impl='triton'"),
    (dict(skip_threshold=2.0), ValueError, r"skip_threshold must be None, 'auto' or a number in \(0, 1\); got 2"),
    (dict(skip_threshold="fast"), ValueError, r"skip_threshold must be None, 'auto' .*; got 'fast'"),
])
def test_bad_input_raises_clear_error(change, exc, match):
    x, w, y = _ok_inputs()
    kw = dict(change)
    x = kw.pop("x", x)
    w = kw.pop("weight", w)
    y = kw.pop("target", y)
    b = kw.pop("bias", None)
    if kw.get("shift") is True:     # a 2-D x has T = 6 positions: shift=6 is the out-of-range case
        kw["shift"] = 6
    kw.setdefault("impl", "chunked")
    with pytest.raises(exc, match=match):
        linear_cross_entropy(x, w, y, b, **kw)


def test_bad_devices_and_trainable_weights_raise():
    x, w, y = _ok_inputs()
    with pytest.raises(ValueError, match=r"target is on device meta but x is on cpu"):
        linear_cross_entropy(x, w, y.to("meta"))
    with pytest.raises(ValueError, match=r"sample_weight requires grad"):
        linear_cross_entropy(x, w, y, sample_weight=torch.ones(6, requires_grad=True))
    with pytest.raises(ValueError, match=r"impl='triton' needs CUDA tensors"):
        old = os.environ.pop("TRITON_INTERPRET", None)
        try:
            linear_cross_entropy(x, w, y, impl="triton")
        finally:
            if old is not None:
                os.environ["TRITON_INTERPRET"] = old
    with pytest.raises(ValueError, match=r"shift needs x with a sequence axis"):
        linear_cross_entropy(x[0], w, y[0], shift=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_dtensor_weight_is_refused():
    """A real DTensor, sharded on a one-process gloo group bound to 127.0.0.1."""
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        assert not sys.platform.startswith("linux"), "every Linux build of torch has gloo"
        pytest.skip("torch.distributed with gloo is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    x, w, y = _ok_inputs()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        # Shard(0) (vocabulary rows) is the tensor-parallel path (tests/test_torch_linear_ce_tp.py)
        w_sharded = distribute_tensor(w, mesh, [Shard(1)])
        with pytest.raises(ValueError, match=r"weight is a torch.distributed DTensor .*Shard\(dim=1\)"):
            linear_cross_entropy(x, w_sharded, y)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# degenerate cases: exact zeros where PyTorch gives exact zeros (issue 16, item 11)
# --------------------------------------------------------------------------------------------------
DEGENERATE_OPTIONS = [{"label_smoothing": 0.1}, {"label_smoothing": 1.0},
                      {"label_smoothing": 0.3, "class_weight": torch.tensor([0.7])},
                      {"label_smoothing": 0.1, "sample_weight": True, "softcap": 2.0}]


@pytest.mark.parametrize("impl", IMPLS_ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", DEGENERATE_OPTIONS, ids=["eps0.1", "eps1", "class_weight", "sw_softcap"])
def test_one_class_loss_and_gradients_are_exactly_zero(impl, reduction, opts):
    """V = 1: h = 1, so the loss and every gradient are exactly 0 whatever the options (bar z-loss), as
    PyTorch gives; label smoothing left float32 residues of -6e-8 (loss) and 1e-8 (gradients) before."""
    rng = np.random.default_rng()
    N = 9
    x, w, b, y = draw(rng, N, 5, 1, scale=2.0)
    kw = dict(opts, reduction=reduction)
    if kw.pop("sample_weight", False):
        kw["sample_weight"] = torch.from_numpy(rng.uniform(0.1, 2, N)).float()
    go = torch.tensor(1.7) if reduction != "none" else torch.from_numpy(rng.uniform(-2, 2, N)).float()
    loss, *grads = run(impl, x, w, b, y, go, **kw)[:4]
    assert float(loss.abs().max()) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)
    zt = (x @ w.T + b).requires_grad_()
    torch_kw = {k: v for k, v in kw.items() if k in ("label_smoothing", "reduction")}
    pt = torch.nn.functional.cross_entropy(zt, y, weight=kw.get("class_weight"), **torch_kw)
    pt.backward(go)
    assert float(pt.abs().max()) == 0.0 and float(zt.grad.abs().max()) == 0.0   # PyTorch's own answer
    z = (x @ w.T + b).detach().requires_grad_()
    ce_kw = {("weight" if k == "class_weight" else k): v for k, v in kw.items()}
    ce = cross_entropy(z, y, **ce_kw)
    ce.backward(go)
    assert float(ce.abs().max()) == 0.0 and float(z.grad.abs().max()) == 0.0
    ref_kw = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in ce_kw.items()}
    l_np, g_np = ref_loss.cross_entropy_with_grad(z.detach().numpy(), y.numpy(), grad_output=go.numpy(),
                                                  **ref_kw)
    assert float(np.abs(l_np).max()) == 0.0 and float(np.abs(g_np).max()) == 0.0


@pytest.mark.parametrize("impl", IMPLS_ALL)
def test_zero_weight_class_and_full_smoothing(impl):
    """Rows whose class has weight 0 carry exactly no loss and no gradient (reduction='none'); full
    smoothing (eps = 1: the uniform target) matches PyTorch and is >= 0 row by row."""
    rng = np.random.default_rng()
    x, w, b, y = draw(rng, 12, 6, 5)
    y[y == 2] = 3
    y[:4] = 2
    cw = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0])
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(xr, wr, y, b, class_weight=cw, reduction="none", impl=impl)
    loss.backward(torch.from_numpy(rng.uniform(0.5, 2, 12)).float())
    assert float(loss[:4].abs().max()) == 0.0 and float(xr.grad[:4].abs().max()) == 0.0
    assert float(loss[4:].min()) > 0
    x64, w64, b64 = x.double(), w.double(), b.double()
    want = torch.nn.functional.cross_entropy(x64 @ w64.T + b64, y, label_smoothing=1.0, reduction="none")
    got = linear_cross_entropy(x, w, y, b, label_smoothing=1.0, reduction="none", impl=impl)
    assert float(got.min()) >= 0 and rel_err(got, want.numpy()) <= TOL32


def test_chunked_float32_gradients_beat_naive_pytorch():
    """The target term subtracted apart from delta W (it cancelled inside the product before): chunked's
    float32 dx error against float64 is well under naive PyTorch's (it was equal), dW's no larger."""
    rng = np.random.default_rng()
    N, D, V = 256, 64, 4000
    x, w, _, y = draw(rng, N, D, V, bias=False, scale=D ** -0.25)
    go = torch.tensor(1.0, dtype=torch.float64)
    ours, _ = errors("chunked", x, w, None, y, go, max_chunk_bytes=64 * V * 4)
    xn, wn = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.nn.functional.cross_entropy(xn @ wn.T, y).backward()
    _, dx_r, dw_r, _, _, (s_dx, s_dw, _) = reference(x, w, None, y, with_scales=True)
    naive = {"dx": rel_err(xn.grad, dx_r, s_dx), "dw": rel_err(wn.grad, dw_r, s_dw)}
    assert ours["dx"] <= 0.25 * naive["dx"] and ours["dw"] <= 1.0 * naive["dw"], (ours, naive)

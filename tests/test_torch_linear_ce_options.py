"""softxent.torch.linear_cross_entropy's probability targets and issue-17 options (differentiable
``return_lse``, ``return_z_loss``, ``return_accuracy``, ``z_loss_weighting``), every impl, against the
float64 references: softxent.loss (probability targets), PyTorch's own F.cross_entropy on float64 logits
(Liger-style z-loss, accuracy, lse terms) and torch.autograd.gradcheck.  Inputs are drawn fresh."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import softxent.loss as ref_loss  # noqa: E402
from softxent.torch import linear_cross_entropy  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: tests/ is not on it
from test_torch_linear_ce import (IMPLS, IMPLS_ALL, TOL32, TOL64, _RecordShapes, draw, errors,  # noqa: E402
                                  rel_err)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def draw_proba(rng, N, V, *, dtype=torch.float32, zeros=True):
    """Rows of a Dirichlet draw times a random mass in [0.5, 1.5] (rows need not sum to 1), some entries
    exactly 0 (masked / sparse distillation targets)."""
    p = rng.dirichlet(np.full(V, 0.5), size=N) * rng.uniform(0.5, 1.5, (N, 1))
    if zeros:
        p[rng.random((N, V)) < 0.2] = 0.0
    return torch.from_numpy(p).to(dtype)


PROBA_OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.2},
    "weights": {"sample_weight": True, "class_weight": True},
    "z_loss_softcap": {"z_loss": 0.04, "softcap": 2.5},
    "everything": {"label_smoothing": 0.1, "sample_weight": True, "class_weight": True, "z_loss": 0.03,
                   "softcap": 3.0},
}


def proba_kwargs(opt, rng, N, V):
    kw = dict(opt)
    if kw.pop("sample_weight", False):
        kw["sample_weight"] = torch.from_numpy(rng.uniform(0, 2, N)).float()
    if kw.pop("class_weight", False):
        kw["class_weight"] = torch.from_numpy(rng.uniform(0.2, 2, V)).float()
    return kw


# Triton under the interpreter is slow: its 'sum' runs only for 'plain' and 'everything' (which holds every
# option), its other reductions for each option; the cases are left out at collection, not skipped.
PROBA_CASES = [(impl, reduction, option) for impl in IMPLS_ALL for reduction in ("mean", "sum", "none")
               for option in PROBA_OPTIONS
               if not (impl == "triton" and reduction == "sum" and option not in ("plain", "everything"))]


@pytest.mark.parametrize("impl, reduction, option", PROBA_CASES)
def test_probability_targets_against_reference(impl, reduction, option):
    rng = np.random.default_rng()
    N, D, V = 21, 11, 37
    x, w, b, _ = draw(rng, N, D, V)
    p = draw_proba(rng, N, V)
    kw = proba_kwargs(PROBA_OPTIONS[option], rng, N, V)
    kw["reduction"] = reduction
    if impl == "chunked":
        kw["max_chunk_bytes"] = 5 * V * 4 * 4     # a few rows per chunk (room for the targets' buffers)
    go = (torch.tensor(float(rng.uniform(0.3, 2)), dtype=torch.float64) if reduction != "none"
          else torch.from_numpy(rng.uniform(-2, 2, N)))
    err, (loss, dx, dw, db, _) = errors(impl, x, w, b, p, go, **kw)
    assert loss.dtype == torch.float32 and dx.dtype == x.dtype
    assert max(err.values()) <= TOL32, err


@pytest.mark.parametrize("impl", IMPLS_ALL)
def test_one_hot_probabilities_equal_index_targets(impl):
    rng = np.random.default_rng()
    N, D, V = 17, 7, 29
    x, w, b, y = draw(rng, N, D, V)
    cw = torch.from_numpy(rng.uniform(0.5, 2, V)).float()
    # z_loss_weighting='token': the z term weighted alike (the default 'class' weights an index row's
    # z term by w_y, a probability row's by 1)
    kw = dict(label_smoothing=0.1, z_loss=0.02, z_loss_weighting="token", impl=impl, reduction="none",
              class_weight=cw)
    one_hot = F.one_hot(y, V).to(torch.float32)
    outs = []
    for t in (y, one_hot):
        xr = x.clone().requires_grad_()
        loss = linear_cross_entropy(xr, w, t, b, **kw)
        loss.sum().backward()
        outs.append((loss.detach(), xr.grad))
    # the 'none' rows agree; ('mean' differs on purpose: sum w_y for indices, N for probabilities)
    assert rel_err(outs[1][0], outs[0][0].numpy()) <= TOL32 and rel_err(outs[1][1], outs[0][1].numpy()) <= TOL32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64_probability_targets(impl, reduction):
    """Central finite differences in float64 for x, W, b and the probability targets themselves."""
    rng = np.random.default_rng()
    N, D, V = 5, 3, 6
    x, w, b, _ = draw(rng, N, D, V, dtype=torch.float64)
    # floored: a Dirichlet(0.5) entry below gradcheck's step (1e-6) would be perturbed negative and refused
    p = draw_proba(rng, N, V, dtype=torch.float64, zeros=False).clamp_min(1e-3)
    sw = torch.from_numpy(rng.uniform(0.2, 2, N))
    cw = torch.from_numpy(rng.uniform(0.5, 2, V))

    def f(x_, w_, b_, p_):
        return linear_cross_entropy(x_, w_, p_, b_, reduction=reduction, label_smoothing=0.1, z_loss=0.05,
                                    softcap=2.0, sample_weight=sw, class_weight=cw, impl=impl,
                                    max_chunk_bytes=2 * V * 8 * 4 if impl == "chunked" else None)

    args = tuple(t.clone().requires_grad_() for t in (x, w, b, p))
    assert torch.autograd.gradcheck(f, args)


def test_probability_target_gradient_matches_pytorch():
    """dL/dp of the fused chunked path against PyTorch's own F.cross_entropy on float64 logits."""
    rng = np.random.default_rng()
    N, D, V = 13, 6, 19
    x, w, b, _ = draw(rng, N, D, V, dtype=torch.float64)
    p = draw_proba(rng, N, V, dtype=torch.float64)
    cw = torch.from_numpy(rng.uniform(0.5, 2, V))
    grads = []
    for fused in (True, False):
        pr = p.clone().requires_grad_()
        if fused:
            loss = linear_cross_entropy(x, w, pr, b, class_weight=cw, label_smoothing=0.2, impl="chunked",
                                        max_chunk_bytes=3 * V * 8 * 4)
        else:
            loss = F.cross_entropy(x @ w.T + b, pr, weight=cw, label_smoothing=0.2)
        loss.backward()
        grads.append(pr.grad)
    assert rel_err(grads[0], grads[1].numpy()) <= TOL64


def test_probability_targets_allocate_no_n_by_v_buffer():
    """A (N, V) bfloat16 target: the chunked path's forward and backward allocate nothing of N x V
    elements (no whole-matrix copy or float32 conversion); R = 4 rows per chunk."""
    N, D, V, R = 64, 5, 37, 4
    rng = np.random.default_rng()
    x, w, b, _ = draw(rng, N, D, V)
    p = draw_proba(rng, N, V, dtype=torch.bfloat16)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    with _RecordShapes() as rec:
        loss = linear_cross_entropy(xg, wg, p, b, impl="chunked", max_chunk_bytes=R * V * 4 * 4,
                                    label_smoothing=0.1, class_weight=torch.rand(V) + 0.5, reduction="none")
        loss.sum().backward()
    largest = max(int(np.prod(s)) for s in rec.shapes)
    assert largest <= max(R * V, N * D, V * D) < N * V, largest
    err, _ = errors("chunked", x, w, b, p.float(), torch.ones(()), label_smoothing=0.3, reduction="mean")
    assert max(err.values()) <= TOL32


# --------------------------------------------------------------------------------------------------
# lse (differentiable), z-loss part, accuracy, z_loss_weighting
# --------------------------------------------------------------------------------------------------
def _float64_logits(x, w, b):
    return (x.double() @ w.double().T + b.double()).requires_grad_()


@pytest.mark.parametrize("impl", IMPLS_ALL)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_differentiable_lse(impl, reduction):
    """L = c1 loss + sum_i g_i lse_i: the gradients from both outputs in one backward, against autograd on
    float64 logits (F.cross_entropy and torch.logsumexp); also with the lse's gradient alone."""
    rng = np.random.default_rng()
    N, D, V = 15, 9, 23
    x, w, b, y = draw(rng, N, D, V, ignore=(3,))
    g_lse = torch.from_numpy(rng.uniform(-1, 1, N))
    for lse_only in (False, True):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss, lse = linear_cross_entropy(xr, wr, y, b, reduction=reduction, return_lse=True, impl=impl,
                                         **({"max_chunk_bytes": 4 * V * 4} if impl == "chunked" else {}))
        total = (lse * g_lse.float()).sum() + (0 if lse_only else 1.3 * loss.sum())
        total.backward()
        z = _float64_logits(x, w, b)
        want_loss = F.cross_entropy(z, y, reduction=reduction)
        want = (torch.logsumexp(z, 1) * g_lse).sum() + (0 if lse_only else 1.3 * want_loss.sum())
        dz, = torch.autograd.grad(want, z)
        assert rel_err(xr.grad, (dz @ w.double()).numpy()) <= TOL32
        assert rel_err(wr.grad, (dz.T @ x.double()).numpy()) <= TOL32


@pytest.mark.parametrize("impl", IMPLS_ALL)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss_weighting_token_reproduces_liger_and_class_is_the_reference(impl, reduction):
    """'token': F.cross_entropy(weight=cw) + z * mean over non-ignored tokens of lse^2 (Liger's
    lse_square_scale; 'none': per token, 0 where ignored; 'sum': summed); 'class': softxent.loss.
    return_z_loss returns the z part, detached."""
    rng = np.random.default_rng()
    N, D, V, zl = 18, 7, 13, 0.07
    x, w, b, y = draw(rng, N, D, V, ignore=(0, 5, 6))
    cw = torch.from_numpy(rng.uniform(0.2, 3, V)).float()
    z = _float64_logits(x, w, b)
    lse = torch.logsumexp(z, 1)
    valid = (y != -100).double()
    ce = F.cross_entropy(z, y, weight=cw.double(), reduction=reduction)
    z_rows = zl * lse ** 2 * valid
    z_part = {"mean": z_rows.sum() / valid.sum(), "sum": z_rows.sum(), "none": z_rows}[reduction]
    want = ce + z_part
    dz, = torch.autograd.grad(want.sum(), z)
    kw = dict(class_weight=cw, z_loss=zl, reduction=reduction, impl=impl)
    xr = x.clone().requires_grad_()
    out = linear_cross_entropy(xr, w, y, b, z_loss_weighting="token", return_z_loss=True, **kw)
    out.loss.sum().backward()
    assert out.lse is None and out.accuracy is None and not out.z_loss.requires_grad
    assert rel_err(out.loss, want.detach().numpy()) <= TOL32
    assert rel_err(out.z_loss, z_part.detach().numpy()) <= TOL32
    assert rel_err(xr.grad, (dz @ w.double()).numpy()) <= TOL32
    # 'class' (the default) is softxent.loss's, and differs from 'token' with class weights
    out_c = linear_cross_entropy(x, w, y, b, return_z_loss=True, **kw)
    want_c = ref_loss.cross_entropy(z.detach().numpy(), y.numpy(), weight=cw.double().numpy(), z_loss=zl,
                                    reduction=reduction)
    assert rel_err(out_c.loss, want_c) <= TOL32
    assert rel_err(out_c.loss - out_c.z_loss, ce.detach().numpy()) <= TOL32
    wy = torch.where(y != -100, cw.double()[y.clamp(min=0)], 0.0)   # 'class': the z term weighted by w_y
    z_rows_c = zl * lse ** 2 * wy
    z_part_c = {"mean": z_rows_c.sum() / wy.sum(), "sum": z_rows_c.sum(), "none": z_rows_c}[reduction]
    assert rel_err(out_c.z_loss, z_part_c.detach().numpy()) <= TOL32


@pytest.mark.parametrize("impl", IMPLS_ALL)
@pytest.mark.parametrize("proba", [False, True], ids=["index", "proba"])
def test_return_accuracy(impl, proba):
    """Token accuracy = mean over non-ignored rows of [argmax_k z_ik == target] (argmax p for
    probability targets); per token with 'none'; it has no gradient and changes nothing else."""
    rng = np.random.default_rng()
    N, D, V = 40, 8, 5     # few classes: both hits and misses
    x, w, b, y = draw(rng, N, D, V, ignore=() if proba else (1, 2, 30))
    t = draw_proba(rng, N, V) if proba else y
    z = x.double() @ w.double().T + b.double()
    cls = t.argmax(1) if proba else y
    valid = torch.ones(N, dtype=torch.bool) if proba else y != -100
    hits = (z.argmax(1) == cls) & valid
    assert 0 < int(hits.sum()) < int(valid.sum())
    kw = dict(impl=impl, return_accuracy=True, **({"max_chunk_bytes": 6 * V * 4 * 4} if impl == "chunked"
                                                   else {}))
    out = linear_cross_entropy(x, w, t, b, **kw)
    assert float(out.accuracy) == pytest.approx(float(hits.sum()) / float(valid.sum()), abs=1e-6)
    assert not out.accuracy.requires_grad and out.lse is None and out.z_loss is None
    assert float(out.loss) == pytest.approx(float(linear_cross_entropy(x, w, t, b, impl=impl)), rel=1e-6)
    per_token = linear_cross_entropy(x, w, t, b, reduction="none", **kw).accuracy
    assert torch.equal(per_token, hits.float())


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def _small():
    x, w = torch.randn(6, 4), torch.randn(5, 4)
    return x, w, torch.full((6, 5), 0.2)


@pytest.mark.parametrize("change, exc, match", [
    (dict(target=torch.full((6, 4), 0.25)), TypeError,
     r"class probabilities \(floating\) of shape x.shape\[:-1\] \+ \(V,\) = \(6, 5\); got dtype torch.float32 "
     r"and shape \(6, 4\)"),
    (dict(target=torch.full((6, 5), -0.5)), ValueError,
     r"target probabilities must be finite and >= 0; got values such as \[-0.5"),
    (dict(target=torch.full((6, 5), float("nan"))), ValueError,
     r"target probabilities must be finite and >= 0; got values such as \[nan"),
    (dict(ignore_index=2), ValueError, r"ignore_index is not supported for floating point target .* got "
                                       r"ignore_index=2"),
    (dict(z_loss_weighting="tokens"), ValueError, r"z_loss_weighting must be one of \('class', 'token'\) .*; "
                                                  r"got 'tokens'"),
    (dict(return_accuracy=1), TypeError, r"return_accuracy must be a bool; got 1"),
])
def test_bad_probability_targets_and_options_raise_clear_errors(change, exc, match):
    x, w, p = _small()
    kw = dict(change)
    p = kw.pop("target", p)
    with pytest.raises(exc, match=match):
        linear_cross_entropy(x, w, p, impl="chunked", **kw)


def test_ignore_index_with_probabilities_raises_pytorchs_error_everywhere():
    from softxent.torch import cross_entropy

    z, p = torch.randn(4, 3), torch.full((4, 3), 1 / 3)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
        F.cross_entropy(z, p, ignore_index=1)          # PyTorch's own rule
    for call in (lambda: cross_entropy(z, p, ignore_index=1),
                 lambda: ref_loss.cross_entropy(z.numpy(), p.numpy(), ignore_index=0)):
        with pytest.raises(ValueError, match="ignore_index is not supported for floating point target"):
            call()
    cross_entropy(z, p, ignore_index=-5)                # negative: matches no class, accepted as by PyTorch


@pytest.mark.skipif("triton" not in IMPLS_ALL, reason="Triton (interpreter) not available")
def test_triton_refuses_to_differentiate_probability_targets_and_auto_does_not():
    x, w, p = _small()
    p.requires_grad_()
    with pytest.raises(ValueError, match=r"impl='triton' does not differentiate probability targets"):
        linear_cross_entropy(x, w, p, impl="triton")
    linear_cross_entropy(x, w, p, impl="auto").backward()   # 'auto' takes 'chunked' then
    assert p.grad is not None and p.grad.shape == p.shape


@pytest.mark.skipif("triton" not in IMPLS_ALL, reason="Triton (interpreter) not available")
def test_triton_probability_targets_in_the_skips_sorted_vocabulary():
    """The skip's vocabulary order with nothing dropped (threshold 1e-30) reads each probability tile at
    its permuted columns: the result equals the natural order's; a large threshold keeps every tile that
    holds target mass (a sparse target: errors stay at float32 level on those rows' classes)."""
    rng = np.random.default_rng()
    N, D, V = 24, 8, 70
    x, w, b, _ = draw(rng, N, D, V)
    p = draw_proba(rng, N, V)
    base = errors("triton", x, w, b, p, torch.ones(()), label_smoothing=0.1)
    sorted_ = errors("triton", x, w, b, p, torch.ones(()), label_smoothing=0.1, skip_threshold=1e-30)
    for out_a, out_b in zip(base[1][:4], sorted_[1][:4]):
        assert rel_err(out_b, out_a.double().numpy()) <= 1e-6
    assert max(sorted_[0].values()) <= TOL32, sorted_[0]


@pytest.mark.parametrize("impl", IMPLS_ALL)
def test_probability_targets_with_shift_and_normalizer(impl):
    """shift=k slices the probability target's sequence axis (the one before the classes), as
    x[..., :-k, :] and p[..., k:, :] by hand; a normalizer divides the sum."""
    rng = np.random.default_rng()
    B, T, D, V = 2, 6, 5, 11
    x, w, b, _ = draw(rng, None, D, V, lead=(B, T))
    p = draw_proba(rng, B * T, V).reshape(B, T, V)
    sw = torch.from_numpy(rng.uniform(0, 2, (B, T))).float()
    kw = dict(impl=impl, label_smoothing=0.1, reduction="sum", normalizer=7.0)
    got = linear_cross_entropy(x, w, p, b, shift=2, sample_weight=sw, **kw)
    want = linear_cross_entropy(x[:, :-2].contiguous(), w, p[:, 2:].contiguous(), b,
                                sample_weight=sw[:, 2:].contiguous(), **kw)
    assert rel_err(got, want.double().numpy()) <= 1e-6
    ref = ref_loss.cross_entropy((x[:, :-2].double() @ w.double().T + b.double()).numpy(), p[:, 2:].double().numpy(),
                                 sample_weight=sw[:, 2:].double().numpy(), label_smoothing=0.1, reduction="sum") / 7
    assert rel_err(got, ref) <= TOL32

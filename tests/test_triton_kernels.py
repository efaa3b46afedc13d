"""The Triton kernels of the fused linear + cross-entropy against the float64 NumPy reference.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py or below),
hence the tiny shapes.  The reference: ``z = x W^T + b`` in float64 from the very operands the kernels
get (so only the kernels' own rounding is measured), ``zh = c tanh(z/c)``, ``lse`` and ``softmax`` from
softxent.loss, and the kernels' contract
``delta = (alpha softmax(zh) - beta onehot(y) - gamma cw) (1 - tanh^2)``; the plain mean case is also
checked against softxent.loss.cross_entropy_with_grad.

Tolerances: float32 inputs -- relative 1e-5 plus 3x the error delta inherits from float32 logits and
lse (``float32_logit_floor``; measured: the kernels' error is 0.9x it in the median, at most 1.6x, over
100 peaked draws, where it reached 1.1e-5 by itself).  16-bit inputs --
the forward accumulates in float32 from the same operands (1e-5 again); the gradients round delta to the
input dtype before the products and dx once more at the end, like PyTorch's own backward of F.linear, so
their error must stay within 1.5x that of "round delta, multiply exactly, round dx" -- with the rounding
the platform does: nearest-even on a GPU, truncation for bfloat16 in Triton's interpreter (measured: the
kernels' error equals that floor to three digits).
"""

import math
import os
import shutil

if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from softxent import loss as ref_loss  # noqa: E402
from softxent.torch import _triton_kernels as K  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if torch.cuda.is_available() and not INTERPRETED:
    DEVICE = torch.device("cuda")
elif INTERPRETED:
    DEVICE = torch.device("cpu")
else:  # pragma: no cover
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

IGNORE = -100
SMALL = K.TileConfig(16, 16, 16, group_m=2, num_warps=1, num_stages=1)


# --------------------------------------------------------------------------------------------------
# data and the float64 reference
# --------------------------------------------------------------------------------------------------
def make_problem(rng, N, D, V, *, dtype=torch.float32, bias=False, class_weight=False,
                 ignore_index=IGNORE, n_ignored=0, scale=1.0):
    x = torch.from_numpy(rng.standard_normal((N, D))).to(dtype)
    W = torch.from_numpy(rng.standard_normal((V, D)) * (scale / np.sqrt(D))).to(dtype)
    b = torch.from_numpy(rng.standard_normal(V)).to(dtype) if bias else None
    y = torch.from_numpy(rng.integers(0, V, N)).long()
    if n_ignored:
        y[torch.from_numpy(rng.choice(N, n_ignored, replace=False))] = ignore_index
    if 0 <= ignore_index < V:  # make sure some rows really do have the ignored class as target
        y[: max(1, N // 8)] = ignore_index
    cw = torch.from_numpy(rng.uniform(0.2, 2.0, V)).float() if class_weight else None
    return [t if t is None else t.to(DEVICE) for t in (x, W, b, y, cw)]


def coefficients(rng, N, *, with_beta=True, with_gamma=True, zero_rows=0):
    alpha = rng.uniform(0.1, 1.0, N) * rng.choice([-1.0, 1.0], N)  # any grad_output sign
    if zero_rows:
        alpha[:zero_rows] = 0.0
    beta = rng.uniform(0.1, 1.0, N) if with_beta else None
    gamma = rng.uniform(0.0, 0.05, N) if with_gamma else None
    as_t = lambda a: None if a is None else torch.tensor(a, dtype=torch.float32, device=DEVICE)  # noqa: E731
    return as_t(alpha), as_t(beta), as_t(gamma)


def f64(t):
    return None if t is None else t.detach().cpu().double().numpy()


def reference(x, W, b, y, *, ignore_index, softcap, cw, alpha=None, beta=None, gamma=None):
    """float64 forward statistics and, given coefficients, delta and the three gradients."""
    x64, W64, y64 = f64(x), f64(W), y.cpu().numpy()
    z = x64 @ W64.T
    if b is not None:
        z = z + f64(b)
    if softcap is not None:
        t = np.tanh(z / softcap)
        zh, dcap = softcap * t, 1.0 - t * t
    else:
        zh, dcap = z, np.ones_like(z)
    N, V = zh.shape
    cw64 = np.ones(V) if cw is None else f64(cw)
    valid = y64 != ignore_index
    rows = np.arange(N)
    p = ref_loss.softmax(zh)
    not_target = np.ones_like(p, dtype=bool)
    not_target[rows[valid], y64[valid]] = False
    out = dict(lse=ref_loss.logsumexp(zh), zmax=zh.max(axis=1),
               zt=np.where(valid, zh[rows, np.where(valid, y64, 0)], 0.0),
               ws=(zh * cw64).sum(axis=1),
               q=np.where(not_target, p, 0.0).sum(axis=1))  # 1 - p_y, summed without the target
    if alpha is not None:
        a = f64(alpha)
        delta = a[:, None] * ref_loss.softmax(zh)
        if beta is not None:
            delta[rows[valid], y64[valid]] -= f64(beta)[valid]
        if gamma is not None:
            delta -= f64(gamma)[:, None] * cw64[None, :]
        delta *= dcap
        out.update(delta=delta, dx=delta @ W64, dw=delta.T @ x64, db=delta.sum(axis=0))
        out["f32_floor"] = float32_logit_floor(x64, W64, b, softcap, zh, p, out["lse"], a, dcap, out)
    return out


def float32_logit_floor(x64, W64, b, softcap, zh, p, lse, a, dcap, out):
    """The relative dx and dW errors that delta inherits from logits and lse held in float32 (any
    float32 implementation: z accumulated in float32, lse stored in float32), to first order
    ``d delta = alpha p (dzh - dlse) (1 - tanh^2)``.  On peaked, Zipf-like data dW's frequent-class
    columns cancel and this floor alone reaches 1e-5 (measured: 1.1e-5 on 1 draw in 100)."""
    z32 = (x64.astype(np.float32) @ W64.T.astype(np.float32)).astype(np.float64)
    if b is not None:
        z32 = z32 + f64(b)
    zh32 = z32 if softcap is None else softcap * np.tanh(z32 / softcap)
    dlse = lse.astype(np.float32).astype(np.float64) - lse
    dd = a[:, None] * p * ((zh32 - zh) - dlse[:, None]) * dcap
    return {name: np.linalg.norm(g) / max(np.linalg.norm(out[name]), 1e-300)
            for name, g in (("dx", dd @ W64), ("dw", dd.T @ x64))}


def rel(a, ref):
    a = np.asarray(a, dtype=np.float64)
    n = np.linalg.norm(ref)
    return np.linalg.norm(a - ref) / (n if n > 0 else 1.0)


def round_to(a, dtype):
    """float64 -> dtype -> float64 as the kernels' stores round: to nearest even on a GPU, but the
    interpreter truncates float32 -> bfloat16 (it drops the low 16 bits)."""
    if dtype == torch.float32 or dtype == torch.float64:
        return np.asarray(a, np.float32).astype(np.float64) if dtype == torch.float32 else a
    if dtype == torch.bfloat16 and INTERPRETED:
        bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
        return bits.view(np.float32).astype(np.float64)
    return torch.from_numpy(np.asarray(a, np.float64)).to(dtype).double().numpy()


def rounding_floor(delta, other, dtype, out_dtype):
    """Relative error of ``round(round(delta) @ other)`` (float64 product): what rounding delta to the
    input dtype, and the result to its output dtype, costs any implementation that feeds delta to 16-bit
    tensor cores (PyTorch's backward of F.linear included)."""
    return rel(round_to(round_to(delta, dtype) @ other, out_dtype), delta @ other)


def check_forward(got, ref, need_ws):
    if len(got) == 4:  # with the target complement q = 1 - p_y: to float32's relative precision
        q = f64(got[3])
        np.testing.assert_allclose(q, ref["q"], rtol=2e-5, atol=1e-30)
        got = got[:3]
    lse, zt, ws = (f64(t) for t in got)
    np.testing.assert_allclose(lse, ref["lse"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(zt, ref["zt"], rtol=1e-5, atol=1e-5)
    if need_ws:
        np.testing.assert_allclose(ws, ref["ws"], rtol=1e-5, atol=1e-5 * (1 + np.abs(ref["ws"]).max()))
    else:
        assert ws is None


def check_backward(got, ref, x, W, need):
    dx, dw, db = got
    dtype = x.dtype
    for name, g, other, out_dtype in (("dx", dx, f64(W), dtype), ("dw", dw, f64(x), torch.float32)):
        if not need[name]:
            assert g is None, name
            continue
        assert g is not None, name
        assert g.dtype == out_dtype, (name, g.dtype)
        err = rel(f64(g), ref[name])
        if dtype == torch.float32:
            tol = 1e-5 + 3.0 * ref["f32_floor"][name]
        else:
            floor = rounding_floor(ref["delta"] if name == "dx" else ref["delta"].T, other, dtype, out_dtype)
            tol = 1.5 * floor + 1e-6
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"
    if need["db"]:
        assert db is not None and db.dtype == torch.float32
        np.testing.assert_allclose(f64(db), ref["db"], rtol=1e-5, atol=1e-6 * (1 + np.abs(ref["db"]).max()))
    else:
        assert db is None


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
FORWARD_CASES = [
    # N, D, V, dtype, bias, softcap, class_weight, ignore_index, need_ws, config
    (37, 40, 83, torch.float32, True, 5.0, True, IGNORE, True, None),
    (64, 48, 300, torch.float32, False, None, False, 7, True, None),
    (5, 16, 1, torch.float32, True, None, False, IGNORE, True, None),
    (9, 20, 2, torch.float32, False, 2.0, True, 0, False, None),
    (33, 3, 31, torch.float32, True, None, True, IGNORE, False, None),
    (50, 48, 257, torch.float32, True, 30.0, False, IGNORE, True,
     K.TileConfig(32, 16, 16, group_m=3, num_warps=1, num_stages=1, splits=5)),
    (40, 32, 100, torch.float16, True, None, True, IGNORE, True, None),
    (40, 24, 70, torch.bfloat16, False, 4.0, False, 5, True, None),
]


@pytest.mark.parametrize("N,D,V,dtype,bias,softcap,cw,ignore_index,need_ws,config", FORWARD_CASES)
def test_forward_matches_float64(N, D, V, dtype, bias, softcap, cw, ignore_index, need_ws, config):
    rng = np.random.default_rng()
    x, W, b, y, cwt = make_problem(rng, N, D, V, dtype=dtype, bias=bias, class_weight=cw,
                                   ignore_index=ignore_index, n_ignored=N // 5)
    ref = reference(x, W, b, y, ignore_index=ignore_index, softcap=softcap, cw=cwt)
    for need_q in (False, True):
        got = K.lce_forward(x, W, b, y, ignore_index=ignore_index, softcap=softcap, class_weight=cwt,
                            need_weighted_sum=need_ws, need_target_complement=need_q, config=config)
        assert len(got) == 3 + need_q
        assert all(t is None or (t.dtype == torch.float32 and t.shape == (N,)) for t in got)
        check_forward(got, ref, need_ws)
    # the row maxima and the sums of exp(zh - max), from which lse comes (what a caller combining
    # vocabulary shards needs): max + log s == lse
    *got, zmax, s = K.lce_forward(x, W, b, y, ignore_index=ignore_index, softcap=softcap, class_weight=cwt,
                                  need_weighted_sum=need_ws, return_max=True, return_sumexp=True, config=config)
    check_forward(got, ref, need_ws)
    np.testing.assert_allclose(f64(zmax), ref["zmax"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(s), np.exp(ref["lse"] - f64(zmax)), rtol=2e-5)
    np.testing.assert_allclose(f64(zmax + torch.log(s)), f64(got[0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
def test_confident_tokens_keep_their_target_gradient(dtype, splits):
    """Tokens with p_y = 1 - q, q from 1e-2 down to 1e-7: alpha exp(z_y - lse) - alpha loses the
    digits of q to lse's rounding (q ~ ulp(lse) / q relative error), (alpha - beta) - alpha q keeps
    them.  The forward's q (summed without the target, merged over vocabulary splits) is within 2e-5
    of 1 - p_y relatively, and so is the target column of delta; without it the same rows are off by
    far more (checked, so that the test shows what it guards)."""
    rng = np.random.default_rng()
    N, D, V = 12, 16, 64
    # z_ic = x_i . W_c + gap_i [c == i]: features D.. D+N are one-hot row markers that only column i
    # reads, so row i's target i sits gap_i = log(V / q_i) above logits of size ~0.1: p_y ~ 1 - q_i
    gap = np.log(V / np.logspace(-2, -7, N))
    x = np.zeros((N, D + N))
    x[:, :D] = rng.standard_normal((N, D)) * 0.1
    x[np.arange(N), D + np.arange(N)] = gap
    W = np.zeros((V, D + N))
    W[:, :D] = rng.standard_normal((V, D)) * 0.1
    W[np.arange(N), D + np.arange(N)] = 1.0
    y = torch.arange(N)
    x, W, y = (torch.from_numpy(x).to(dtype).to(DEVICE), torch.from_numpy(W).to(dtype).to(DEVICE),
               y.to(DEVICE))
    ref = reference(x, W, None, y, ignore_index=IGNORE, softcap=None, cw=None)
    cfg = K.TileConfig(16, 16, 16, group_m=2, num_warps=1, num_stages=1, splits=splits)
    lse, zt, _, q = K.lce_forward(x, W, None, y, ignore_index=IGNORE, softcap=None, class_weight=None,
                                  need_weighted_sum=False, need_target_complement=True, config=cfg)
    np.testing.assert_allclose(f64(q), ref["q"], rtol=2e-5)
    assert ref["q"].min() < 1e-5  # really confident rows are in the test
    alpha = torch.full((N,), 1.0 / N, device=DEVICE)
    ref = reference(x, W, None, y, ignore_index=IGNORE, softcap=None, cw=None, alpha=alpha, beta=alpha)
    rows = np.arange(N)
    want = ref["delta"][rows, y.cpu().numpy()]  # = -q / N
    kw = dict(ignore_index=IGNORE, softcap=None, class_weight=None, need_dx=False, need_dw=False,
              need_db=True)
    bias0 = torch.zeros(V, dtype=dtype, device=DEVICE)
    # db = column sums of delta: with distinct targets per column this reads the target entries; use
    # the delta itself through a one-row-at-a-time backward to read each row's target entry exactly
    errs = {}
    for use_q in (True, False):
        got = []
        for i in range(N):
            sl = slice(i, i + 1)
            db = K.lce_backward(x[sl].contiguous(), W, bias0, y[sl].contiguous(), lse[sl].contiguous(),
                                alpha[sl].contiguous(), alpha[sl].contiguous(), None,
                                target_complement=q[sl].contiguous() if use_q else None, **kw)[2]
            got.append(float(db[int(y[i])]))
        errs[use_q] = np.abs(np.array(got) - want) / np.abs(want)
    print(f"target column, max relative error: with q {errs[True].max():.1e}, without {errs[False].max():.1e}")
    assert errs[True].max() <= 2e-5, errs[True].max()
    assert errs[False].max() > 10 * max(errs[True].max(), 1e-7), (errs[False].max(), errs[True].max())


def test_forward_large_logits_and_empty_batch():
    """Logits of +-1e3 (exp overflows without the running maximum), and N = 0."""
    rng = np.random.default_rng()
    x, W, b, y, _ = make_problem(rng, 20, 16, 45, scale=400.0)
    got = K.lce_forward(x, W, b, y, ignore_index=IGNORE, softcap=None, class_weight=None,
                        need_weighted_sum=False)
    ref = reference(x, W, b, y, ignore_index=IGNORE, softcap=None, cw=None)
    assert np.abs(ref["lse"]).max() > 200
    np.testing.assert_allclose(f64(got[0]), ref["lse"], rtol=1e-6)
    e = K.lce_forward(x[:0], W, b, y[:0], ignore_index=IGNORE, softcap=None, class_weight=None,
                      need_weighted_sum=True)
    assert [t.shape for t in e] == [(0,)] * 3


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------
ALL = dict(dx=True, dw=True, db=True)
BACKWARD_CASES = [
    # N, D, V, dtype, bias, softcap, cw, ignore_index, beta/gamma, need, chunk_shape
    (37, 40, 83, torch.float32, True, 5.0, True, IGNORE, (True, True), ALL, None),
    (37, 40, 83, torch.float32, True, None, False, 11, (True, False), ALL, (16, 32)),
    (64, 48, 300, torch.float32, False, None, True, IGNORE, (True, True), dict(dx=True, dw=True, db=False),
     (48, 160)),
    (29, 20, 31, torch.float32, True, 3.0, False, IGNORE, (False, False), dict(dx=True, dw=False, db=True), None),
    (29, 20, 31, torch.float32, True, None, True, 0, (True, True), dict(dx=False, dw=True, db=False), (16, 16)),
    (10, 17, 1, torch.float32, True, None, False, IGNORE, (True, True), ALL, None),
    (10, 16, 2, torch.float32, False, 1.5, True, 1, (True, False), dict(dx=True, dw=True, db=False), (5, 1)),
    (21, 32, 50, torch.float32, True, None, False, IGNORE, (True, True), dict(dx=False, dw=False, db=True), (16, 32)),
    (48, 32, 200, torch.float16, True, None, True, IGNORE, (True, True), ALL, (32, 64)),
    (48, 32, 120, torch.bfloat16, False, 10.0, False, IGNORE, (True, False), dict(dx=True, dw=True, db=False),
     None),
    (40, 24, 97, torch.bfloat16, True, None, True, 3, (True, True), ALL, (16, 48)),
]


@pytest.mark.parametrize("N,D,V,dtype,bias,softcap,cw,ignore_index,bg,need,chunk", BACKWARD_CASES)
def test_backward_matches_float64(N, D, V, dtype, bias, softcap, cw, ignore_index, bg, need, chunk):
    rng = np.random.default_rng()
    x, W, b, y, cwt = make_problem(rng, N, D, V, dtype=dtype, bias=bias, class_weight=cw,
                                   ignore_index=ignore_index, n_ignored=N // 6)
    alpha, beta, gamma = coefficients(rng, N, with_beta=bg[0], with_gamma=bg[1], zero_rows=2)
    ref = reference(x, W, b, y, ignore_index=ignore_index, softcap=softcap, cw=cwt,
                    alpha=alpha, beta=beta, gamma=gamma)
    lse = torch.tensor(ref["lse"], dtype=torch.float32, device=DEVICE)
    stats = {}
    got = K.lce_backward(x, W, b, y, lse, alpha, beta, gamma, ignore_index=ignore_index, softcap=softcap,
                         class_weight=cwt, need_dx=need["dx"], need_dw=need["dw"], need_db=need["db"],
                         chunk_shape=chunk, stats=stats)
    check_backward(got, ref, x, W, dict(need, db=need["db"] and bias))
    if chunk is not None:
        assert (stats["plan"].rows, stats["plan"].cols) == (min(chunk[0], N), min(chunk[1], V))


def test_backward_float32_dx_of_16_bit_inputs():
    """dx_dtype=float32 (a rank's partial dx of the vocabulary-parallel sum): the dx of bfloat16 inputs
    accumulated over several vocabulary chunks in float32 and never rounded to bfloat16 -- its error is
    that of the float16 deltas alone -- while dW stays the same; a float32 dx has no low half to borrow
    dW's rows for."""
    rng = np.random.default_rng()
    N, D, V = 40, 24, 97
    x, W, b, y, cwt = make_problem(rng, N, D, V, dtype=torch.bfloat16, bias=True, class_weight=True, n_ignored=5)
    alpha, beta, gamma = coefficients(rng, N, zero_rows=2)
    ref = reference(x, W, b, y, ignore_index=IGNORE, softcap=None, cw=cwt, alpha=alpha, beta=beta, gamma=gamma)
    lse = torch.tensor(ref["lse"], dtype=torch.float32, device=DEVICE)
    kw = dict(ignore_index=IGNORE, softcap=None, class_weight=cwt, need_dx=True, need_dw=True, need_db=False,
              chunk_shape=(N, 32))
    dx, dw, _ = K.lce_backward(x, W, b, y, lse, alpha, beta, gamma, dx_dtype=torch.float32, **kw)
    assert dx.dtype == torch.float32
    floor16 = rounding_floor(ref["delta"], f64(W), torch.float16, torch.float32)
    floor_bf16 = rounding_floor(ref["delta"], f64(W), torch.float16, torch.bfloat16)
    err = rel(f64(dx), ref["dx"])
    assert err <= 1.5 * floor16 + 1e-6 and err < floor_bf16 / 4, (err, floor16, floor_bf16)
    np.testing.assert_array_equal(f64(dw), f64(K.lce_backward(x, W, b, y, lse, alpha, beta, gamma, **kw)[1]))
    with pytest.raises(ValueError, match="a 16-bit dx"):
        K.lce_backward(x, W, b, y, lse, alpha, beta, gamma, dx_dtype=torch.float32, lo_in_dw=True,
                       **dict(kw, chunk_shape=None, workspace_bytes=1))
    with pytest.raises(ValueError, match="dx_dtype must be"):
        K.lce_backward(x, W, b, y, lse, alpha, beta, gamma, dx_dtype=torch.float16, **kw)


def test_backward_chain_rule_of_cross_entropy_with_grad():
    """alpha = beta = 1/n (n non-ignored rows, 0 on ignored ones), gamma = 0 is the plain mean
    cross-entropy: dx, dW, db must be the chain rule through softxent.loss.cross_entropy_with_grad's
    delta, and the forward's lse - z_target its loss."""
    rng = np.random.default_rng()
    N, D, V, c = 45, 36, 70, 8.0
    x, W, b, y, _ = make_problem(rng, N, D, V, bias=True, n_ignored=6)
    for softcap in (None, c):
        lse, zt, _ = K.lce_forward(x, W, b, y, ignore_index=IGNORE, softcap=softcap, class_weight=None,
                                   need_weighted_sum=False)
        z = f64(x) @ f64(W).T + f64(b)
        yv = y.cpu().numpy()
        loss, delta = ref_loss.cross_entropy_with_grad(z, yv, ignore_index=IGNORE, softcap=softcap)
        valid = torch.from_numpy(yv != IGNORE).to(DEVICE)
        n = int(valid.sum())
        kernel_loss = float(((lse - zt) * valid).sum() / n)
        assert abs(kernel_loss - float(loss)) <= 1e-5 * abs(float(loss))
        coef = valid.float() / n
        dx, dw, db = K.lce_backward(x, W, b, y, lse, coef, coef, None, ignore_index=IGNORE, softcap=softcap,
                                    class_weight=None, need_dx=True, need_dw=True, need_db=True)
        assert rel(f64(dx), delta @ f64(W)) < 1e-5
        assert rel(f64(dw), delta.T @ f64(x)) < 1e-5
        assert rel(f64(db), delta.sum(axis=0)) < 1e-5


def test_backward_float16_tiny_coefficients_do_not_underflow():
    """alpha ~ 1e-7 (a mean over 10^7 tokens) makes delta ~ 1e-9, below float16's smallest subnormal;
    the power-of-two scaling of delta keeps dx and dW accurate."""
    rng = np.random.default_rng()
    N, D, V = 32, 16, 40
    x, W, b, y, _ = make_problem(rng, N, D, V, dtype=torch.float16)
    alpha = torch.full((N,), 1e-7, device=DEVICE)
    ref = reference(x, W, b, y, ignore_index=IGNORE, softcap=None, cw=None, alpha=alpha, beta=alpha)
    lse = torch.tensor(ref["lse"], dtype=torch.float32, device=DEVICE)
    dx, dw, _ = K.lce_backward(x, W, b, y, lse, alpha, alpha, None, ignore_index=IGNORE, softcap=None,
                               class_weight=None, need_dx=True, need_dw=True, need_db=False)
    assert rel(f64(dw), ref["dw"]) < 3e-3  # without the scaling delta flushes to 0 and this is 1
    # dx itself (~1e-8) lies among float16's subnormals (spacing 2^-24): it can only be right to that
    assert np.abs(f64(dx) - ref["dx"]).max() <= 2.0**-24


def test_backward_float16_keeps_the_tiny_probabilities_of_confident_rows():
    """Confident rows (1 - p_y ~ 1e-5, every other p below 1e-5): their gradients are made of tiny
    probabilities, which as float16 deltas scaled to at most 1 were subnormal (dW error 1.7e-2 here);
    the float16 headroom of the delta scale keeps them normal numbers (2e-4)."""
    rng = np.random.default_rng()
    N, D, V = 32, 64, 300
    x, W, b, y, _ = make_problem(rng, N, D, V, dtype=torch.float16)
    W = (W.float() / W.float().norm(dim=1, keepdim=True)).half()
    x = (20.0 * W[y].float() + 0.3 * x.float()).half()     # z_y ~ 20, z_j ~ N(0, 2.5^2): p_j < 1e-5
    alpha = torch.full((N,), 1.0 / N, device=DEVICE)
    ref = reference(x, W, None, y, ignore_index=IGNORE, softcap=None, cw=None, alpha=alpha, beta=alpha)
    assert np.median(ref["delta"][np.arange(N), y.cpu().numpy()]) > -1e-4 / N   # confident
    lse = torch.tensor(ref["lse"], dtype=torch.float32, device=DEVICE)
    dx, dw, _ = K.lce_backward(x, W, None, y, lse, alpha, alpha, None, ignore_index=IGNORE, softcap=None,
                               class_weight=None, need_dx=True, need_dw=True, need_db=False,
                               target_complement=-torch.tensor(ref["delta"][np.arange(N), y.cpu().numpy()] * N,
                                                               dtype=torch.float32, device=DEVICE))
    assert rel(f64(dw), ref["dw"]) < 1e-3       # float32 dW: the deltas' own precision shows
    assert np.abs(f64(dx) - ref["dx"]).max() <= 2.0**-24   # float16 dx (~1e-6) is itself subnormal


def _float16_delta_floor(delta, other, delta_scale, out_dtype):
    """``round(round_f16(delta / s) s @ other)`` against ``delta @ other``: the float16 delta's rounding
    (scaled by the kernels' power of two ``s``) and the output's, nothing else."""
    d16 = torch.from_numpy(delta / delta_scale).to(torch.float16).double().numpy() * delta_scale
    return rel(round_to(d16 @ other, out_dtype), delta @ other)


@pytest.mark.parametrize("magnitude", [0, 17])
def test_bf16_inputs_get_float16_deltas(magnitude):
    """bfloat16 inputs: delta is rounded to float16 (3 more bits) by default, and the products convert
    W and x to float16 times a power of two.  The error is then that of rounding delta to float16 and
    the outputs to bfloat16, below the bfloat16 delta's (which ``delta_dtype=torch.bfloat16`` keeps).
    ``magnitude = 17``: W times 2^17 (beyond float16's 65504) and x times 2^-17 (inside its subnormals),
    the same logits: only the operands' power-of-two scales keep the conversion exact."""
    rng = np.random.default_rng()
    N, D, V = 64, 32, 300
    x, W, y = lm_like(rng, N, D, V, torch.bfloat16)
    x, W = x * 2.0 ** -magnitude, W * 2.0 ** magnitude
    alpha = torch.full((N,), 1.0 / N, device=DEVICE)
    ref = reference(x, W, None, y, ignore_index=IGNORE, softcap=None, cw=None, alpha=alpha, beta=alpha,
                    gamma=None)
    lse = torch.tensor(ref["lse"], dtype=torch.float32, device=DEVICE)
    errs = {}
    for dd in (None, torch.bfloat16):
        dx, dw, _ = K.lce_backward(x, W, None, y, lse, alpha, alpha, None, ignore_index=IGNORE, softcap=None,
                                   class_weight=None, need_dx=True, need_dw=True, need_db=False,
                                   dw_dtype=torch.bfloat16, delta_dtype=dd, chunk_shape=(32, 96))
        errs[dd] = rel(f64(dx), ref["dx"]), rel(f64(dw), ref["dw"])
    s = 2.0 ** math.ceil(math.log2(2.0 / N)) * 2.0 ** -14  # the kernels' float16 delta scale
    floors = (_float16_delta_floor(ref["delta"], f64(W), s, torch.bfloat16),
              _float16_delta_floor(ref["delta"].T, f64(x), s, torch.bfloat16))
    bf16_floors = (rounding_floor(ref["delta"], f64(W), torch.bfloat16, torch.bfloat16),
                   rounding_floor(ref["delta"].T, f64(x), torch.bfloat16, torch.bfloat16))
    for i, name in enumerate(("dx", "dw")):
        assert errs[None][i] <= 1.15 * floors[i] + 1e-7, (name, errs, floors)
        assert errs[torch.bfloat16][i] <= 1.5 * bf16_floors[i] + 1e-7, (name, errs, bf16_floors)
        assert errs[None][i] < errs[torch.bfloat16][i], (name, errs)


def test_float16_scale_is_a_power_of_two_that_fits():
    for mx in (3e-9, 1.0, 0.75, 65504.0, 1e6):
        t = torch.tensor([[0.5 * mx, -mx], [0.0, 0.25 * mx]], dtype=torch.bfloat16)
        s = float(K._float16_scale(t))
        assert math.log2(s) == round(math.log2(s))
        assert 2.0 ** 14 <= float(t.float().abs().max()) * s <= 2.0 ** 15
    assert float(K._float16_scale(torch.zeros(3, 2, dtype=torch.bfloat16))) == 1.0
    assert float(K._float16_scale(torch.tensor([1.0, float("inf")], dtype=torch.bfloat16))) == 1.0


@pytest.mark.parametrize("flag_m,flag_k,block_m,block_k", [(16, 16, 16, 16), (16, 32, 64, 16), (64, 32, 16, 32)])
def test_active_k_blocks_lists_exactly_the_kept_blocks(flag_m, flag_k, block_m, block_k):
    """The skip's products loop over a compacted list: per row tile, the K-blocks that hold a kept tile
    (any of its flag rows), in order, then their count."""
    rng = np.random.default_rng()
    M, Kd = int(rng.integers(1, 300)), int(rng.integers(1, 300))
    flags = torch.from_numpy(rng.random((-(-M // flag_m), -(-Kd // flag_k))) < 0.3).to(torch.int8)
    klist, kcount = K._active_k_blocks(flags.to(DEVICE), M, Kd, flag_m, flag_k, block_m, block_k)
    n_mt, n_kb = -(-M // block_m), -(-Kd // block_k)
    assert klist.shape == (n_mt, n_kb) and kcount.shape == (n_mt,)
    f = flags.numpy().astype(bool)
    for t in range(n_mt):
        rows = range(t * block_m, min((t + 1) * block_m, M))
        want = [k for k in range(n_kb) if any(f[r // flag_m, k * block_k // flag_k] for r in rows)]
        assert int(kcount[t]) == len(want)
        assert klist[t, :len(want)].tolist() == want


def test_dw_in_weight_dtype_is_rounded_once():
    """dw_dtype=weight.dtype: one row super-block -> written directly; several -> float32 then cast;
    both equal the float32 result rounded to bfloat16 (up to the interpreter's truncating store)."""
    rng = np.random.default_rng()
    N, D, V = 40, 32, 60
    x, W, b, y, _ = make_problem(rng, N, D, V, dtype=torch.bfloat16)
    alpha, beta, gamma = coefficients(rng, N)
    lse = K.lce_forward(x, W, b, y, ignore_index=IGNORE, softcap=None, class_weight=None,
                        need_weighted_sum=False)[0]
    kw = dict(ignore_index=IGNORE, softcap=None, class_weight=None, need_dx=False, need_dw=True,
              need_db=False)
    dw32 = K.lce_backward(x, W, b, y, lse, alpha, beta, gamma, **kw)[1]
    bf16_ulp = 2.0 ** -7
    for chunk in (None, (16, 64)):
        dw = K.lce_backward(x, W, b, y, lse, alpha, beta, gamma, dw_dtype=torch.bfloat16, chunk_shape=chunk,
                            **kw)[1]
        assert dw.dtype == torch.bfloat16
        diff = (dw.double() - dw32.double()).abs()
        assert bool((diff <= bf16_ulp * dw32.double().abs() + 1e-30).all())


@pytest.mark.parametrize("N,D,V,dtype,dw_f32,chunk,bias,skip", [
    (40, 24, 130, torch.bfloat16, True, (40, 32), True, False),   # float32 dW: 20 rows hold dx_lo
    (48, 32, 48, torch.float16, False, (48, 16), False, False),   # V = N: every chunk is done twice
    (64, 32, 300, torch.bfloat16, False, (64, 96), True, True),   # late chunk straddles V - N; skip
])
def test_dx_low_half_in_dw_tail_equals_the_workspace_path(N, D, V, dtype, dw_f32, chunk, bias, skip):
    """lo_in_dw: dx's low half borrows dW's last rows and the chunks holding them are recomputed for
    dW after dx is final.  Same kernels, same order of sums: bitwise the same dx, dW, db and kept-tile
    count as with dx_lo in the workspace (itself checked against float64 above), and, with a float32
    dW, within the float64 tolerances."""
    rng = np.random.default_rng()
    if skip:  # peaked, trained-LM-like logits, so that tiles do get skipped
        (x, W, y), b = lm_like(rng, N, D, V, dtype), None
        b = torch.zeros(V, dtype=dtype, device=DEVICE) if bias else None
        alpha = beta = torch.full((N,), 1.0 / N, device=DEVICE)
        gamma = None
    else:
        x, W, b, y, _ = make_problem(rng, N, D, V, dtype=dtype, bias=bias)
        alpha, beta, gamma = coefficients(rng, N, with_gamma=False)
    lse = K.lce_forward(x, W, b, y, ignore_index=IGNORE, softcap=None, class_weight=None,
                        need_weighted_sum=False)[0]
    dw_dtype = torch.float32 if dw_f32 else dtype
    kw = dict(ignore_index=IGNORE, softcap=None, class_weight=None, need_dx=True, need_dw=True,
              need_db=bias, dw_dtype=dw_dtype, chunk_shape=chunk,
              skip_threshold=SKIP_EPS / N if skip else None)
    if skip:  # one vocabulary order for both runs (the sorted one keeps the borrowed rows last)
        kw["skip_sorted"] = False
    runs = {}
    for lo_in_dw in (False, True):
        stats = {}
        runs[lo_in_dw] = K.lce_backward(x, W, b, y, lse, alpha, beta, gamma, lo_in_dw=lo_in_dw, stats=stats,
                                        **kw), stats
    (plain, st0), (borrowed, st1) = runs[False], runs[True]
    lo_rows = -(-N * 2 // (4 if dw_f32 else 2))
    assert st1["plan"].lo_in_dw and st1["plan"].lo_rows == lo_rows and not st0["plan"].lo_in_dw
    assert st1["plan"].recompute_cols == V - (V - lo_rows) // chunk[1] * chunk[1]
    assert st1["tiles_kept"] == st0["tiles_kept"]
    if skip:
        assert 0 < st1["tiles_kept"] < st1["tiles"]
    for a, g in zip(plain, borrowed):
        assert (a is None) == (g is None)
        if a is not None:
            assert a.dtype == g.dtype and torch.equal(a, g)
    if dw_f32 and not skip:
        ref = reference(x, W, b, y, ignore_index=IGNORE, softcap=None, cw=None, alpha=alpha, beta=beta,
                        gamma=gamma)
        check_backward(borrowed, ref, x, W, dict(dx=True, dw=True, db=bias))


def test_dx_low_half_in_dw_tail_refuses_where_it_cannot_apply():
    rng = np.random.default_rng()
    for dtype, need_dw, chunk in ((torch.float32, True, (16, 16)), (torch.bfloat16, False, (16, 16)),
                                  (torch.bfloat16, True, (8, 16)), (torch.bfloat16, True, (16, 64))):
        x, W, b, y, _ = make_problem(rng, 16, 16, 40, dtype=dtype)
        alpha, beta, gamma = coefficients(rng, 16)
        lse = K.lce_forward(x, W, b, y, ignore_index=IGNORE, softcap=None, class_weight=None,
                            need_weighted_sum=False)[0]
        with pytest.raises(ValueError, match="lo_in_dw=True needs"):
            K.lce_backward(x, W, b, y, lse, alpha, beta, gamma, ignore_index=IGNORE, softcap=None,
                           class_weight=None, need_dx=True, need_dw=need_dw, need_db=False, chunk_shape=chunk,
                           dw_dtype=dtype, lo_in_dw=True)


def test_no_gradients_requested_allocates_nothing():
    rng = np.random.default_rng()
    x, W, b, y, _ = make_problem(rng, 8, 16, 20, bias=True)
    alpha, beta, gamma = coefficients(rng, 8)
    lse = torch.zeros(8, device=DEVICE)
    assert K.lce_backward(x, W, b, y, lse, alpha, beta, gamma, ignore_index=IGNORE, softcap=None,
                          class_weight=None, need_dx=False, need_dw=False, need_db=False) == (None, None, None)
    # need_db without a bias: nothing to do either
    assert K.lce_backward(x, W, None, y, lse, alpha, beta, gamma, ignore_index=IGNORE, softcap=None,
                          class_weight=None, need_dx=False, need_dw=False, need_db=True) == (None, None, None)


# --------------------------------------------------------------------------------------------------
# opt-in block skip
# --------------------------------------------------------------------------------------------------
def lm_like(rng, N, D, V, dtype):
    """Trained-LM-like logits: a steep Zipf prior over a frequency-sorted vocabulary riding on x[:, 0]
    (CCE sorts the vocabulary by mean logit for the same reason: the small probabilities gather in
    whole tiles), plus a per-token intended class boosted by kappa ~ U(0, 24); targets drawn from the
    model's own softmax.  At V = 300 about 93% of the probabilities are below 2.4e-4."""
    prior = -3.0 * np.log(np.arange(V) + 10.0)
    W = rng.standard_normal((V, D)) / np.sqrt(D)
    W[:, 0] = prior / 4.0
    intended = rng.choice(V, N, p=np.exp(prior) / np.exp(prior).sum())
    G = W[intended].copy()
    G[:, 0] = 0
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    x = rng.standard_normal((N, D)) + rng.uniform(0, 24, (N, 1)) * G
    x[:, 0] = 4.0
    x_t, W_t = torch.from_numpy(x).to(dtype), torch.from_numpy(W).to(dtype)
    z = f64(x_t) @ f64(W_t).T
    g = rng.gumbel(size=z.shape)
    y = torch.from_numpy((z + g).argmax(axis=1)).long()
    return x_t.to(DEVICE), W_t.to(DEVICE), y.to(DEVICE)


def tile_mask(p_term, has_target_tile, gamma_rows, threshold, BM, BV):
    """Which BM x BV tiles the skip rule keeps (numpy mirror of the kernel's rule, for the test)."""
    N, V = p_term.shape
    keep = np.zeros((-(-N // BM), -(-V // BV)), bool)
    for i in range(keep.shape[0]):
        for j in range(keep.shape[1]):
            sl = (slice(i * BM, (i + 1) * BM), slice(j * BV, (j + 1) * BV))
            keep[i, j] = has_target_tile[sl].any() or gamma_rows[sl[0]].any()
            keep[i, j] |= (np.abs(p_term[sl]) >= threshold).any()
    return keep


SKIP_EPS = float(torch.finfo(torch.bfloat16).eps) / 32  # CCE's "high" filter for bf16: p < 2.4e-4


@pytest.mark.parametrize("dtype,chunk,mm", [
    (torch.float32, None, None),
    (torch.float32, (32, 48), K.TileConfig(32, 16, 16, group_m=2, num_warps=1, num_stages=1)),
    (torch.bfloat16, (48, 96), None),
])
def test_skip_threshold_drops_exactly_the_small_tiles(dtype, chunk, mm):
    """The plain skip rule (natural order, no correction): the result equals the exact gradient of delta
    with the skippable tiles zeroed (so the flags, the masked K-blocks and the untouched accumulators
    are right), most tiles are skipped
    on peaked data, and the error against the exact gradient is bounded by the dropped mass.

    Measured on this data (N=64, D=32, V=300, 16 x 16 tiles, threshold = eps(bf16)/32 * max alpha,
    i.e. CCE's "probability below eps/32" rule): 30-40% of the tiles skipped (at V = 300 the targets
    and frequent classes of a 16-row block touch many of its 19 vocabulary tiles; the GPU benchmark
    measures the fraction at LLM scale); max |error| / max |exact| about 1e-3 for dx and 2e-4 for dW
    in float32 (run with -s to print it).
    """
    rng = np.random.default_rng()
    N, D, V = 64, 32, 300
    x, W, y = lm_like(rng, N, D, V, dtype)
    alpha = torch.full((N,), 1.0 / N, device=DEVICE)
    gamma = torch.zeros(N, device=DEVICE)
    gamma[5] = 0.01 / N  # one row with a class-weight term: its tiles must all stay
    ref = reference(x, W, None, y, ignore_index=IGNORE, softcap=None, cw=None, alpha=alpha, beta=alpha,
                    gamma=gamma)
    lse = torch.tensor(ref["lse"], dtype=torch.float32, device=DEVICE)
    threshold = SKIP_EPS / N  # = eps * max alpha: CCE's rule on the probabilities
    configs = {"delta": SMALL, "matmul": mm or SMALL}  # 16 x 16 tiles, also on a GPU
    stats = {}
    zero_bias = torch.zeros(V, dtype=dtype, device=DEVICE)  # only to get db (the column sums of delta)
    dx, dw, db = K.lce_backward(x, W, zero_bias, y, lse, alpha, alpha, gamma, ignore_index=IGNORE,
                                softcap=None, class_weight=None, need_dx=True, need_dw=True, need_db=True,
                                skip_threshold=threshold, skip_sorted=False, skip_correction=False,
                                chunk_shape=chunk, configs=configs, stats=stats)
    p_term = (1.0 / N) * ref_loss.softmax(f64(x) @ f64(W).T)
    onehot = np.zeros((N, V), bool)
    onehot[np.arange(N), y.cpu().numpy()] = True
    R, C = stats["plan"].rows, stats["plan"].cols
    keep_el = np.zeros((N, V), bool)
    n_keep = 0
    for r0 in range(0, N, R):  # tiles are laid out per (row super-block, vocabulary chunk)
        for c0 in range(0, V, C):
            sub = (slice(r0, r0 + R), slice(c0, c0 + C))
            km = tile_mask(p_term[sub], onehot[sub], f64(gamma)[sub[0]] != 0, threshold, 16, 16)
            n_keep += km.sum()
            keep_el[sub] = np.kron(km, np.ones((16, 16), bool))[: min(R, N - r0), : min(C, V - c0)]
    assert stats["tiles_kept"] == n_keep
    assert n_keep <= 0.8 * stats["tiles"], (n_keep, stats["tiles"])
    assert keep_el[5].all()
    kept_delta = np.where(keep_el, ref["delta"], 0.0)
    sub_ref = dict(ref, delta=kept_delta, dx=kept_delta @ f64(W), dw=kept_delta.T @ f64(x),
                   db=kept_delta.sum(axis=0))
    check_backward((dx, dw, db), sub_ref, x, W, dict(dx=True, dw=True, db=True))
    # error against the exact gradient: bounded by the dropped deltas (each < threshold)
    dropped = np.abs(np.where(keep_el, 0.0, ref["delta"]))
    assert dropped.max() < threshold
    err_dx = np.abs(f64(dx) - ref["dx"]).max()
    err_dw = np.abs(f64(dw) - ref["dw"]).max()
    tol16 = 1e-5 if dtype == torch.float32 else 3 * 2.0 ** -8  # rounding of the kept part
    assert err_dx <= (dropped @ np.abs(f64(W))).max() * (1 + 1e-6) + tol16 * np.abs(ref["dx"]).max()
    assert err_dw <= (dropped.T @ np.abs(f64(x))).max() * (1 + 1e-6) + tol16 * np.abs(ref["dw"]).max()
    print(f"skip: kept {n_keep}/{stats['tiles']} tiles; max error / max |exact|: "
          f"dx {err_dx / np.abs(ref['dx']).max():.2e}, dW {err_dw / np.abs(ref['dw']).max():.2e}")


def first_order_reference(ref, x, W, y, gamma, order, threshold, R, C, BM, BV):
    """float64 mirror of the sorted, corrected skip: in the vocabulary ``order``, per (row super-block,
    chunk) and BM x BV tile, a kept tile's delta is used as is and a skipped one is replaced by its
    first-order part (row sums x the tile's mean weight row for dx, column sums x the row tile's mean
    hidden state for dW); db keeps every column sum.  Returns the expected gradients and the number of
    kept tiles."""
    N, V = ref["delta"].shape
    xd, Wd = f64(x), f64(W)
    delta = ref["delta"][:, order]                       # columns in position order
    Wp = Wd[order]
    p_term = ((1.0 / N) * ref_loss.softmax(xd @ Wd.T))[:, order]
    onehot = np.zeros((N, V), bool)
    onehot[np.arange(N), y.cpu().numpy()] = True
    onehot = onehot[:, order]
    dx, dwp, n_keep = np.zeros_like(xd), np.zeros((V, xd.shape[1])), 0
    for r0 in range(0, N, R):
        for c0 in range(0, V, C):
            rs, cs = slice(r0, min(r0 + R, N)), slice(c0, min(c0 + C, V))
            keep = tile_mask(p_term[rs, cs], onehot[rs, cs], f64(gamma)[rs] != 0, threshold, BM, BV)
            n_keep += keep.sum()
            for i in range(keep.shape[0]):
                for j in range(keep.shape[1]):
                    ri = slice(r0 + i * BM, min(r0 + (i + 1) * BM, rs.stop))
                    cj = slice(c0 + j * BV, min(c0 + (j + 1) * BV, cs.stop))
                    d = delta[ri, cj]
                    if keep[i, j]:
                        dx[ri] += d @ Wp[cj]
                        dwp[cj] += d.T @ xd[ri]
                    else:
                        dx[ri] += np.outer(d.sum(axis=1), Wp[cj].mean(axis=0))
                        dwp[cj] += np.outer(d.sum(axis=0), xd[ri].mean(axis=0))
    dw = np.empty_like(dwp)
    dw[order] = dwp
    return dict(ref, dx=dx, dw=dw, db=ref["delta"].sum(axis=0)), n_keep


@pytest.mark.parametrize("dtype,chunk,lo_in_dw,tile", [
    (torch.float32, None, None, 16),
    (torch.float32, (32, 48), None, 16),             # row super-blocks, several chunks
    (torch.bfloat16, (64, 96), True, 16),            # dx's low half in dW's tail: those rows stay last
    (torch.float32, (64, 96), None, 32),             # 32 x 32 skip tiles, 16 x 16 product tiles
])
def test_sorted_corrected_skip_equals_its_float64_mirror(dtype, chunk, lo_in_dw, tile):
    """The default skip (sorted vocabulary, first-order part of each skipped tile) computes its float64
    mirror: the gathered W rows, scattered dW rows, per-tile sums and thin extra products are right,
    and the correction brings dx closer to exact than zeroing the same tiles does."""
    rng = np.random.default_rng()
    N, D, V = 64, 32, 300
    x, W, y = lm_like(rng, N, D, V, dtype)
    alpha = torch.full((N,), 1.0 / N, device=DEVICE)
    gamma = torch.zeros(N, device=DEVICE)
    gamma[5] = 0.01 / N
    ref = reference(x, W, None, y, ignore_index=IGNORE, softcap=None, cw=None, alpha=alpha, beta=alpha,
                    gamma=gamma)
    lse = torch.tensor(ref["lse"], dtype=torch.float32, device=DEVICE)
    # 32 x 32 tiles on 64 rows are few (20) and each holds more probabilities: a larger threshold
    # keeps some of them skipped on every draw (at eps/32 all were kept on ~1 draw in 20)
    threshold = SKIP_EPS / N * (tile // 16) ** 2
    stats = {}
    zero_bias = torch.zeros(V, dtype=dtype, device=DEVICE)
    cfg = {"delta": K.TileConfig(tile, tile, 16, group_m=2, num_warps=1, num_stages=1), "matmul": SMALL}
    dx, dw, db = K.lce_backward(x, W, zero_bias, y, lse, alpha, alpha, gamma, ignore_index=IGNORE,
                                softcap=None, class_weight=None, need_dx=True, need_dw=True, need_db=True,
                                skip_threshold=threshold, chunk_shape=chunk, lo_in_dw=lo_in_dw,
                                configs=cfg, stats=stats)
    plan = stats["plan"]
    assert bool(lo_in_dw) == plan.lo_in_dw
    tail = plan.lo_rows if plan.lo_in_dw else 0
    order = K.skip_order(x, W, tail).cpu().numpy().astype(np.int64)
    assert sorted(order) == list(range(V))
    assert set(order[V - tail:]) == set(range(V - tail, V))
    expected, n_keep = first_order_reference(ref, x, W, y, gamma, order, threshold, plan.rows, plan.cols,
                                             tile, tile)
    assert stats["tiles_kept"] == n_keep < stats["tiles"]
    check_backward((dx, dw, db), expected, x, W, dict(dx=True, dw=True, db=True))
    zeroed = K.lce_backward(x, W, None, y, lse, alpha, alpha, gamma, ignore_index=IGNORE, softcap=None,
                            class_weight=None, need_dx=True, need_dw=False, need_db=False,
                            skip_threshold=threshold, skip_correction=False, chunk_shape=chunk,
                            lo_in_dw=False, configs=cfg)[0]
    if tail == 0:  # the same tiles skipped: the first-order part beats zero
        assert rel(f64(dx), ref["dx"]) < rel(f64(zeroed), ref["dx"])


@pytest.mark.parametrize("dtype,chunk", [(torch.float32, (24, 40)), (torch.bfloat16, None)])
def test_sorted_order_with_every_option_matches_float64(dtype, chunk):
    """The skip's vocabulary order with a threshold that drops nothing: bias, class weights, softcap,
    ignored rows, beta and gamma all follow the permutation (gathered W, b and class-weight entries,
    targets matched to the permuted rows, dW rows scattered, db added back by index), so the result is
    the exact gradient."""
    rng = np.random.default_rng()
    N, D, V, ignore_index = 40, 24, 150, 7
    x, W, b, y, cwt = make_problem(rng, N, D, V, dtype=dtype, bias=True, class_weight=True,
                                   ignore_index=ignore_index, n_ignored=N // 6)
    alpha, beta, gamma = coefficients(rng, N, zero_rows=2)
    ref = reference(x, W, b, y, ignore_index=ignore_index, softcap=20.0, cw=cwt, alpha=alpha, beta=beta,
                    gamma=gamma)
    lse = torch.tensor(ref["lse"], dtype=torch.float32, device=DEVICE)
    order = K.skip_order(x, W)
    assert not torch.equal(order.cpu(), torch.arange(V, dtype=torch.int32))
    got = K.lce_backward(x, W, b, y, lse, alpha, beta, gamma, ignore_index=ignore_index, softcap=20.0,
                         class_weight=cwt, need_dx=True, need_dw=True, need_db=True, chunk_shape=chunk,
                         skip_threshold=1e-30, configs={"delta": SMALL, "matmul": SMALL})
    check_backward(got, ref, x, W, dict(dx=True, dw=True, db=True))


# --------------------------------------------------------------------------------------------------
# planning and argument checks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,D,V", [(8192, 4096, 128256), (16384, 2304, 256000), (4096, 4096, 32000),
                                   (100, 64, 50257), (300, 64, 320)])
@pytest.mark.parametrize("dw_in_float32", [True, False])
@pytest.mark.parametrize("budget", [None, 40 * 2**20, 256 * 2**20])
def test_plan_backward_fits_the_budget(N, D, V, dw_in_float32, budget):
    p = K.plan_backward(N, V, D, 2, need_dx=True, need_dw=True, workspace_bytes=budget,
                        dw_in_float32=dw_in_float32)
    assert 1 <= p.rows <= N and 1 <= p.cols <= V
    assert p.cols == V or p.cols % 128 == 0
    lo = p.rows * D * 2 if (p.cols < V and not p.lo_in_dw) else 0
    dw_acc = V * D * 4 if (p.rows < N and not dw_in_float32) else 0
    assert p.rows * p.cols * 2 + -(-p.rows // 128) * p.cols * 4 + lo + dw_acc == p.workspace_bytes
    assert 0 < p.workspace_bytes <= (K.DEFAULT_WORKSPACE_BYTES if budget is None else budget)
    if not dw_in_float32:  # no room for a float32 dW: one row super-block, dW written once
        assert p.rows == N
    if p.lo_in_dw:  # dx's low half in dW's last rows: one row super-block, and those rows are re-done
        assert p.rows == N and p.cols < V
        assert p.lo_rows == (N if not dw_in_float32 else -(-N // 2)) and p.lo_rows <= V
        assert p.recompute_cols == V - (V - p.lo_rows) // p.cols * p.cols >= p.lo_rows
    else:
        assert p.lo_rows == p.recompute_cols == 0
    # a budget holding everything gives one chunk
    big = K.plan_backward(N, V, D, 2, need_dx=True, need_dw=True, workspace_bytes=2 * N * V * 3)
    assert (big.rows, big.cols, big.lo_in_dw) == (N, V, False)


@pytest.mark.parametrize("N,D,V", [(8192, 4096, 128256), (16384, 2304, 256000)])
def test_plan_backward_default_keeps_llm_shapes_under_a_tenth_of_a_gib(N, D, V):
    """The issue's memory target at the LLM shapes: with dW in bf16 (what softxent.torch asks for) the
    default plan borrows dW's tail for dx's low half, so that the whole 96 MiB go to the delta chunk,
    and recomputes at most N + C vocabulary rows (under 10 % of V here); without borrowing the same budget would leave the delta
    chunk a quarter of that (more re-reads of dx)."""
    p = K.plan_backward(N, V, D, 2, need_dx=True, need_dw=True, dw_in_float32=False)
    assert p.lo_in_dw and p.workspace_bytes <= K.DEFAULT_WORKSPACE_BYTES < 0.1 * 2**30
    assert p.lo_rows <= p.recompute_cols < p.lo_rows + p.cols and p.recompute_cols <= 0.1 * V
    no_borrow = K.plan_backward(N, V, D, 2, need_dx=True, need_dw=True, dw_in_float32=False, lo_in_dw=False)
    assert p.traffic_bytes < no_borrow.traffic_bytes
    # with the corrected skip, its buffers come out of the same 96 MiB
    s = K.plan_backward(N, V, D, 2, need_dx=True, need_dw=True, dw_in_float32=False, skip_corrected=True)
    n_rb, n_vb = -(-s.rows // 128), -(-s.cols // 128)
    extra = 4 * (s.rows * n_vb + s.cols * n_rb + (n_vb + n_rb) * D) + 12 * V   # the skip's buffers
    assert s.lo_in_dw and 0 < extra and s.cols * s.rows * 2 + n_rb * s.cols * 4 + extra <= s.workspace_bytes
    assert s.workspace_bytes <= K.DEFAULT_WORKSPACE_BYTES


def test_plan_backward_relaxes_an_impossible_budget():
    p = K.plan_backward(4096, 32000, 4096, 2, need_dx=True, need_dw=True, workspace_bytes=1000)
    assert p.workspace_bytes > 1000 and p.cols >= 128


def test_bad_arguments_raise_clear_errors():
    rng = np.random.default_rng()
    x, W, b, y, _ = make_problem(rng, 8, 16, 20, bias=True)
    kw = dict(ignore_index=IGNORE, softcap=None, class_weight=None, need_weighted_sum=False)
    with pytest.raises(ValueError, match="weight must have shape"):
        K.lce_forward(x, W[:, :8].contiguous(), b, y, **kw)
    with pytest.raises(ValueError, match="weight must have shape .* dtype"):
        K.lce_forward(x, W.double().float().half(), b, y, **kw)
    with pytest.raises(ValueError, match="x must be a contiguous"):
        K.lce_forward(x.t(), W, b, y, **kw)
    with pytest.raises(ValueError, match="target must be"):
        K.lce_forward(x, W, b, y.int(), **kw)
    with pytest.raises(ValueError, match="bias must be"):
        K.lce_forward(x, W, b[:5], y, **kw)
    with pytest.raises(ValueError, match="softcap"):
        K.lce_forward(x, W, b, y, **dict(kw, softcap=-1.0))
    with pytest.raises(TypeError, match="ignore_index"):
        K.lce_forward(x, W, b, y, **dict(kw, ignore_index=1.5))
    alpha, beta, gamma = coefficients(rng, 8)
    bkw = dict(ignore_index=IGNORE, softcap=None, class_weight=None, need_dx=True, need_dw=True, need_db=True)
    lse = torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match="alpha must be"):
        K.lce_backward(x, W, b, y, lse, alpha.double(), beta, gamma, **bkw)
    with pytest.raises(ValueError, match="skip_threshold"):
        K.lce_backward(x, W, b, y, lse, alpha, beta, gamma, skip_threshold=0.0, **bkw)
    with pytest.raises(ValueError, match="dw_dtype"):
        K.lce_backward(x, W, b, y, lse, alpha, beta, gamma, dw_dtype=torch.float16, **bkw)
    with pytest.raises(ValueError, match="block_k"):
        K.lce_backward(x, W, b, y, lse, alpha, beta, gamma,
                       configs={"delta": SMALL, "matmul": K.TileConfig(16, 16, 32)}, **bkw)


# --------------------------------------------------------------------------------------------------
# GPU compilation, without a GPU
# --------------------------------------------------------------------------------------------------
_AOT_SCRIPT = r'''
import json, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from softxent.torch import _triton_kernels as K

def compile_for(fn, args, cfg, target):
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = args[name]
        if isinstance(v, str) and v.startswith("*"):
            sig[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif v is None or isinstance(v, bool) or name.isupper() or v == 1:  # the JIT specialises 1 too
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, int):
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    try:
        src = ASTSource(fn, sig, consts, attrs)
    except TypeError as e:  # another Triton version's AOT API
        print(json.dumps({"api_mismatch": repr(e)}))
        sys.exit(0)
    ck = triton.compile(src, target=target, options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx, ttgir = ck.asm["ptx"], ck.asm["ttgir"]
    return {"shared": ck.metadata.shared, "async_copies": "cp.async" in ptx,
            "wgmma": "wgmma.mma_async" in ptx, "register_a": "dot_op<{opIdx = 0" in ttgir}

cfgs = K.default_configs(torch.bfloat16)
f, d, m = cfgs["forward"], cfgs["delta"], cfgs["matmul"]
common = dict(x_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", y_ptr="*i64", cw_ptr="*fp32", D=4096, stride_x=4096,
              stride_w=4096, ignore_index=-100, softcap=30.0, HAS_BIAS=True, HAS_SOFTCAP=True, HAS_CW=True,
              EVEN_K=False, DOT_F32=False, PRECISION="tf32", BLOCK_K=64)
out = {}
target = GPUTarget("cuda", 90, 32)
no_proba = dict(p_ptr=None, stride_p=0, HAS_PROBA=False)
proba = dict(p_ptr="*bf16", stride_p=128256, HAS_PROBA=True)   # probability targets (issue 17)
forward_args = dict(
    common, part_ptr="*fp32", N=8192, V=128256, cols_per_split=16128, n_splits=8, plane=65536, NEED_WSUM=True,
    BLOCK_M=f.block_m, BLOCK_V=f.block_n, GROUP_M=f.group_m)
out["forward"] = compile_for(K._lce_forward_kernel, dict(forward_args, NEED_Q=True, **no_proba), f, target)
out["forward_proba"] = compile_for(K._lce_forward_kernel, dict(forward_args, NEED_Q=False, **proba), f, target)
delta_args = dict(
    common, lse_ptr="*fp32", alpha_ptr="*fp32", beta_ptr="*fp32", gamma_ptr="*fp32", q_ptr="*fp32",
    scale_ptr="*fp32",
    delta_ptr="*bf16", flag_ptr="*i8", dbpart_ptr="*fp32", perm_ptr="*i32", rowsum_ptr="*fp32",
    colsum_ptr="*fp32", row0=0, n_rows=8192, v0=0, n_cols=1920,
    stride_delta=1920, stride_flag=15, stride_dbpart=1920, stride_rowsum=15, stride_colsum=64,
    skip_ptr="*fp32", HAS_GAMMA=True, WRITE_DELTA=True, NEED_DB=True, HAS_SKIP=True, HAS_PERM=True,
    HAS_CORR=True, BLOCK_M=d.block_m, BLOCK_V=d.block_n, GROUP_M=d.group_m)
out["delta"] = compile_for(K._lce_delta_kernel, dict(delta_args, HAS_BETA=True, HAS_Q=True, **no_proba),
                           d, target)
out["delta_proba"] = compile_for(K._lce_delta_kernel, dict(delta_args, HAS_BETA=False, HAS_Q=False, **proba),
                                 d, target)
mm = dict(a_ptr="*bf16", b_ptr="*bf16", scale_ptr="*fp32", M=8192, N=4096, K=1920, stride_bk=4096,
          stride_bn=1, stride_cm=4096, stride_cn=1, FLAG_M=d.block_m, FLAG_K=d.block_n, EVEN_K=True,
          DOT_F32=False, PRECISION="tf32", BLOCK_M=m.block_m, BLOCK_N=m.block_n, BLOCK_K=m.block_k,
          GROUP_M=m.group_m, stride_fm=15, stride_fk=1, klist_ptr="*i32", kcount_ptr="*i32", stride_kl=32)
no_flags = dict(flag_ptr=None, klist_ptr=None, kcount_ptr=None, stride_kl=0)
plain = dict(bperm_ptr=None, cperm_ptr=None, a2_ptr=None, b2_ptr=None, K2=0, stride_a2m=0, stride_b2k=0,
             PERM_B=False, PERM_C=False, HAS_EXTRA=False, bscale_ptr=None, CAST_B=False)
f16 = dict(a_ptr="*fp16", bscale_ptr="*fp32", CAST_B=True)  # float16 delta, bfloat16 W / x converted
sorted_skip = dict(bperm_ptr="*i32", cperm_ptr="*i32", a2_ptr="*fp32", b2_ptr="*fp32", K2=15,
                   stride_a2m=15, stride_b2k=4096, HAS_EXTRA=True, bscale_ptr=None, CAST_B=False)
out["matmul_dx"] = compile_for(K._matmul_kernel, dict(
    mm, **plain, c_ptr="*bf16", lo_ptr="*bf16", **no_flags, stride_am=1920, stride_ak=1, ACCUMULATE=True,
    SPLIT_LO=True, HAS_FLAGS=False), m, target)
out["matmul_dw_skip"] = compile_for(K._matmul_kernel, dict(
    mm, **plain, c_ptr="*fp32", lo_ptr=None, flag_ptr="*i8", stride_am=1, stride_ak=1920, ACCUMULATE=True,
    SPLIT_LO=False, HAS_FLAGS=True), m, target)
out["matmul_dx_sorted_skip"] = compile_for(K._matmul_kernel, dict(
    mm, **sorted_skip, PERM_B=True, PERM_C=False, c_ptr="*bf16", lo_ptr="*bf16", flag_ptr="*i8",
    stride_am=1920, stride_ak=1, ACCUMULATE=True, SPLIT_LO=True, HAS_FLAGS=True), m, target)
out["matmul_dw_sorted_skip"] = compile_for(K._matmul_kernel, dict(
    mm, **sorted_skip, PERM_B=False, PERM_C=True, c_ptr="*bf16", lo_ptr=None, flag_ptr="*i8",
    stride_am=1, stride_ak=1920, ACCUMULATE=False, SPLIT_LO=False, HAS_FLAGS=True), m, target)
out["matmul_dx_f16"] = compile_for(K._matmul_kernel, dict(
    mm, **dict(plain, **f16), c_ptr="*bf16", lo_ptr="*bf16", **no_flags, stride_am=1920, stride_ak=1,
    ACCUMULATE=True, SPLIT_LO=True, HAS_FLAGS=False), m, target)
out["matmul_dw_f16_sorted_skip"] = compile_for(K._matmul_kernel, dict(
    mm, **dict(sorted_skip, **f16), PERM_B=False, PERM_C=True, c_ptr="*bf16", lo_ptr=None, flag_ptr="*i8",
    stride_am=1, stride_ak=1920, ACCUMULATE=False, SPLIT_LO=False, HAS_FLAGS=True), m, target)
out["active_k_blocks"] = compile_for(K._active_k_blocks_kernel, dict(
    flag_ptr="*i8", klist_ptr="*i32", kcount_ptr="*i32", n_flag_rows=64, n_kb=88, stride_fm=15, stride_fk=1,
    stride_kl=88, G=1, M_PER_FLAG=1, K_PER_FLAG=2, MAX_KB=128), K.TileConfig(16, 16, 16, num_warps=4), target)
out["tile_mean"] = compile_for(K._tile_mean_kernel, dict(
    src_ptr="*bf16", idx_ptr="*i32", out_ptr="*fp32", n_rows=1920, D=4096, stride_src=4096, HAS_IDX=True,
    BLOCK_R=128, BLOCK_D=64), m, target)
print(json.dumps({"shared": out, "stage_bytes": {
    "forward": (f.block_m + f.block_n) * f.block_k * 2, "matmul_dx": (m.block_m + m.block_n) * m.block_k * 2}}))
'''


def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter runs the kernels' Python, not Triton's compiler: compile the main bf16 variants for
    sm_90 ahead of time (Triton bundles ptxas; no GPU needed) so that GPU-only compile errors fail here,
    and check that the GEMM loops are software-pipelined (shared memory holds more than one stage)."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if "api_mismatch" in res:
        pytest.skip(f"this Triton's ahead-of-time API differs: {res['api_mismatch']}")
    kernels, stage = res["shared"], res["stage_bytes"]
    assert kernels["forward"]["shared"] >= 2 * stage["forward"], kernels
    assert kernels["matmul_dx"]["shared"] >= 2 * stage["matmul_dx"], kernels
    # every GEMM loop, the skip's compacted ones included, loads through pipelined async copies and
    # multiplies on Hopper's wgmma
    for name, k in kernels.items():
        if name not in ("tile_mean", "active_k_blocks"):
            assert k["async_copies"] and k["wgmma"], (name, k)
    # the float16-delta products convert their bfloat16 operand in registers, as wgmma's first operand
    assert kernels["matmul_dx_f16"]["register_a"] and kernels["matmul_dw_f16_sorted_skip"]["register_a"], kernels

"""Fused linear + cross-entropy in pure PyTorch, rows in chunks (``impl='chunked'``): any device.

For hidden states ``x`` ``(N, D)``, the output layer ``W`` ``(V, D)`` and bias ``b`` ``(V,)``, the logits
``z = x W^T + b`` are formed ``R`` rows at a time into one reused float32 buffer ``(R, V)``; the buffer
goes logits -> exp -> the seed's delta in place (notation of softxent.torch._row_terms)::

    delta_ik = r_i (a_i h_ik - coef_y_i [k = y_i] - coef_u_i w_k) (1 - tanh^2(z_ik / c))
    dx = delta W,    dW = delta^T x,    db = sum_i delta_i

(for index targets the target term is kept out of the products and subtracted apart --
``dx_i -= beta_i W_{y_i}``, ``dW_{y_i} -= beta_i x_i`` -- so that it does not cancel inside them).

Two schedules:

* gradients in forward -- reduction ``'mean'`` / ``'sum'`` with a gradient needed: the reduction's
  factor is known in forward (``1 / sum omega``, ``1 / normalizer`` or 1) and ``grad_output`` is one
  scalar, so each chunk's delta is formed right after its logits and multiplied into dx / dW / db at
  once; backward only scales those by ``grad_output``.  Three matrix products in all, like the naive
  ``x @ W.T`` + ``F.cross_entropy`` + backward, and one ``exp`` per logit instead of two.
* recompute -- reduction ``'none'`` (``grad_output`` has one value per row, unknown in forward), or a
  probability target that needs its gradient ``dL/dp_ik = r_i coef_p_i w_k (lse_i - zhat_ik)`` (which
  needs the complete ``lse``): forward keeps ``lse`` ``(N,)`` only, backward recomputes each chunk of
  logits (four products).  A gradient reaching a differentiable ``lse`` (``dlse_i/dzhat_i = h_i``) joins
  ``alpha``; after gradients in forward it costs one more pass over recomputed logits, only when it
  arrives.

Precision: the math runs in float32 (float64 for float64 inputs).  For float16 / bfloat16 inputs the
weight is upcast once to float32 (``V D 4`` bytes) and every product runs in float32, so nothing is
rounded to the input precision before the loss and the gradients; ``dW`` and ``db`` are accumulated in
float32 over all chunks and cast once.  Gradients come back in the inputs' dtypes, scaled by the
reduction's factor; backward multiplies by ``grad_output`` (exact when it is 1, as in ``loss.backward()``).
Only the gradients of inputs that require one are computed or allocated; under ``torch.no_grad`` (or
with nothing requiring a gradient) forward computes the loss only.

Peak extra memory (bytes, beyond the inputs and the returned gradients), with ``R`` rows per chunk::

    R V 4 (1 + [softcap and a gradient is needed]       the chunk buffer(s): <= max_chunk_bytes
           + 3 [probability targets])                    (the targets' block, times w, times zhat)
  + V D 4 [W is float16/bfloat16]                        the float32 copy of W
  + V D 4 [dW needed and W is not float32]               the float32 dW accumulator (cast once at the end)
  + R D 4 [x is float16/bfloat16]                        float32 copies of a chunk of x and of its dx
  + R D 4 [index targets]                                the target term's rows (W_{y_i} or x_i beta_i)
  + O(N + V)                                             per-row and per-class vectors

    R = clamp(max_chunk_bytes // (V 4 (1 + [softcap and a gradient is needed] + 3 [probabilities])), 1, N)

(float64 inputs count 8 bytes per element instead of 4).  In the gradients-in-forward schedule the
returned gradients (``dx`` N D, ``dW`` V D, ``db`` V, in the inputs' dtypes) exist from forward on
instead of from backward on.  Example: (N, D, V) = (8192, 512, 32000) float32 with the default
64 MiB: R = 524 rows, measured peak 167 MiB including the 78.5 MiB of gradients (217 MiB with 128 MiB
chunks), against 3009 MiB for naive PyTorch and 183 MiB for PyTorch 2.13's built-in
F.linear_cross_entropy with its default options (benchmarks/linear_ce_cpu.py; the peak is measured
as the process's resident set, so it includes the allocator's and BLAS's own buffers).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import _row_terms as rt
from . import _validation as val

DEFAULT_MAX_CHUNK_BYTES = 64 * 2**20
"""Default bound on the chunk buffers: 64 MiB (524 rows at V = 32000 in float32).  With
benchmarks/linear_ce_cpu.py on a shared 2-core CPU, 32, 64 and 128 MiB timed alike at N = 2048 (within
the noise, each about 0.8x naive PyTorch); at (8192, 512, 32000), alternated, three rounds, load
average ~6: 64 MiB 20.4 s, 128 MiB 21.3 s, 32 MiB 25.2 s (thinner products), with peaks of 167, 217
and 167 MiB -- 64 MiB is the largest that stays under PyTorch's built-in (183 MiB) there.  Still ~130
rows per product at V = 128256 (thick enough for a GPU's chunked fallback)."""


@dataclass(frozen=True)
class ChunkConfig:
    ignore_index: int
    label_smoothing: float
    reduction: str
    z_loss: float
    softcap: float | None
    max_chunk_bytes: int
    need_dx: bool
    need_dw: bool
    need_db: bool
    z_loss_weighting: str = "class"
    need_dp: bool = False          # the gradient of probability targets
    want_correct: bool = False     # return_accuracy: whether each row's target logit is its maximum
    # dx left in the compute dtype: one rank's partial dx of a vocabulary-parallel sum, rounded to x's
    # dtype once after the reduction instead of once per rank and again after it
    partial_dx: bool = False


def chunk_rows(n_rows: int, n_classes: int, itemsize: int, n_buffers: int, max_chunk_bytes: int) -> int:
    """Rows per chunk: as many as fit ``n_buffers`` buffers of ``(R, V)`` in ``max_chunk_bytes``."""
    per_row = max(1, n_classes * itemsize * n_buffers)
    return int(max(1, min(max(n_rows, 1), max_chunk_bytes // per_row)))


@contextlib.contextmanager
def autocast_off(device_type: str):
    """Run our own float32 products as written, even inside a user's ``torch.autocast`` region."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


class _Products:
    """The three products in the compute dtype; float16/bfloat16 operands are upcast (W once)."""

    def __init__(self, x, weight, bias, cdt):
        self.cdt = cdt
        self.upcast = x.dtype != cdt
        self.w = weight.to(cdt) if weight.dtype != cdt else weight
        self.b = None if bias is None else bias.to(cdt)

    def x_chunk(self, xc):
        return xc.to(self.cdt) if self.upcast else xc

    def logits(self, xc, out):
        """``out = xc W^T + b``."""
        if self.b is None:
            return torch.mm(xc, self.w.t(), out=out)
        return torch.addmm(self.b, xc, self.w.t(), out=out)

    def dx(self, delta, out, target=None):
        """``out = delta W - beta_i W_{y_i}`` (out in x's dtype; ``target = (y, beta)`` or None)."""
        r = torch.mm(delta, self.w, out=out) if out.dtype == self.cdt else delta @ self.w
        if target is not None:
            idx, beta = target
            r.addcmul_(self.w[idx], beta[:, None], value=-1)
        if r is not out:
            out.copy_(r)

    def dw_accumulate(self, acc, delta, xc, target=None):
        """``acc += delta^T xc``, then ``acc_{y_i} -= beta_i xc_i``, in the compute dtype."""
        acc.addmm_(delta.t(), xc)
        if target is not None:
            idx, beta = target
            acc.index_add_(0, idx, xc * beta[:, None], alpha=-1)


def _finish_delta(buf, alpha, beta, gamma, terms, class_weight, tanh_buf):
    """``buf`` holds ``exp(zhat - shift)``; turn it into delta in place (module docstring), where
    ``alpha_i`` includes the normalisation of the exponentials -- except, for index targets, the target
    term ``-beta_i [k = y_i]``, returned as ``(y, beta')`` (``beta'`` times the softcap's factor at the
    target) for the products to subtract apart: inside ``delta W`` it would cancel against the row's sum
    of ``h_k W_k`` and cost float32 digits of dx (20x the error at (1024, 512, 32000)).  For probability
    targets ``beta_i w_k p_ik`` is subtracted in place, and None returned."""
    buf.mul_(alpha[:, None])
    target = None
    if terms.proba is not None:
        buf.addcmul_(rt.class_weighted(terms.proba.to(buf.dtype), class_weight), beta[:, None], value=-1)
    else:
        target = (terms.idx, beta)
    if gamma is not None:
        if class_weight is None:
            buf.sub_(gamma[:, None])
        else:
            buf.addr_(gamma, class_weight, alpha=-1)
    if tanh_buf is not None:  # chain rule through zhat = c tanh(z / c): times 1 - tanh^2
        if target is not None:
            t_y = tanh_buf.gather(1, terms.idx[:, None])[:, 0]
            target = (terms.idx, beta * (1 - t_y * t_y))
        tanh_buf.mul_(tanh_buf)
        buf.addcmul_(buf, tanh_buf, value=-1)
    return target


def _capped_logits(prod, xc, buf, tanh_buf, softcap):
    """``buf = zhat`` for the rows ``xc`` (and ``tanh_buf = tanh(z/c)`` when given)."""
    prod.logits(xc, out=buf)
    if softcap is not None:
        if tanh_buf is None:
            buf.div_(softcap).tanh_().mul_(softcap)
        else:
            torch.div(buf, softcap, out=tanh_buf)
            tanh_buf.tanh_()
            torch.mul(tanh_buf, softcap, out=buf)


def _logit_chunks(prod, x, n_classes, softcap, need_grad, keep_tanh, max_chunk_bytes, proba=False):
    """For each chunk of rows of ``x``: ``(i0, i1, xc, zb, tb)`` with ``xc`` the rows ``i0:i1`` in the
    compute dtype, ``zb = zhat`` of those rows and, when ``keep_tanh``, ``tb = tanh(z / c)`` (else None).
    ``zb`` and ``tb`` are views of buffers reused by every chunk, so the caller may overwrite them in
    place before asking for the next chunk.

    The rows per chunk (:func:`chunk_rows`) leave room for the tanh buffer whenever a gradient is needed
    with a softcap, whether or not this pass keeps it: a forward and the backward that recomputes its
    logits then chunk alike and see bitwise the same ``z`` (BLAS rounding depends on the chunk's shape),
    so ``exp(zhat - lse)`` agrees with the forward's ``lse`` (V = 1: exactly 1, a zero gradient).
    With probability targets (``proba``) the rows leave room for three more ``(R, V)`` temporaries (the
    targets' block in the compute dtype, times the class weights, times the logits)."""
    N = x.shape[0]
    n_buf = (2 if (softcap is not None and need_grad) else 1) + (3 if proba else 0)
    R = chunk_rows(N, n_classes, torch.finfo(prod.cdt).bits // 8, n_buf, max_chunk_bytes)
    buf = torch.empty(min(R, N), n_classes, dtype=prod.cdt, device=x.device)
    tbuf = torch.empty_like(buf) if keep_tanh else None
    for i0 in range(0, N, R):
        i1 = min(N, i0 + R)
        zb = buf[: i1 - i0]
        tb = None if tbuf is None else tbuf[: i1 - i0]
        xc = prod.x_chunk(x[i0:i1])
        _capped_logits(prod, xc, zb, tb, softcap)
        yield i0, i1, xc, zb, tb


class _Gradients:
    """The gradients being formed chunk by chunk: ``dx`` ``(N, D)`` in x's dtype (or ``dx_dtype``),
    ``dW`` ``(V, D)`` and
    ``db`` ``(V,)`` summed over the chunks in the compute dtype; None where not needed."""

    def __init__(self, x, n_classes, cdt, need_dx, need_dw, need_db, dx_dtype=None):
        self.dx = torch.empty_like(x, dtype=dx_dtype or x.dtype) if need_dx else None
        self.dw = torch.zeros(n_classes, x.shape[1], dtype=cdt, device=x.device) if need_dw else None
        self.db = torch.zeros(n_classes, dtype=cdt, device=x.device) if need_db else None

    def add_chunk(self, prod, delta, xc, i0, i1, target=None):
        """Rows ``i0:i1``: ``dx[i0:i1] = delta W``, ``dW += delta^T xc``, ``db += sum_i delta_i``, each
        minus the target term ``beta_i e_{y_i}`` given apart (``target = (y, beta)``, see _finish_delta)."""
        if self.dx is not None:
            prod.dx(delta, out=self.dx[i0:i1], target=target)
        if self.dw is not None:
            prod.dw_accumulate(self.dw, delta, xc, target=target)
        if self.db is not None:
            self.db += delta.sum(dim=0)
            if target is not None:
                self.db.index_add_(0, target[0], target[1], alpha=-1)

    def in_input_dtypes(self, weight, bias):
        """``(dx, dW, db)`` cast once to the dtypes of x, weight and bias."""
        return (self.dx, None if self.dw is None else self.dw.to(weight.dtype),
                None if self.db is None else self.db.to(bias.dtype))


def finish_forward(ctx, terms, lse, b_sum, lin, factor, reduction, z_loss, cdt, recompute_inputs=None,
                   also_saved=()):
    """The end of a fused forward: the loss and its z-loss part (in ``cdt``) from the row terms, ``lse``
    ``(N,)``, ``b_i`` and ``lin_i = sum_k B_ik zhat_ik`` (softxent.torch._row_terms).  With
    ``recompute_inputs = (x, weight, bias, target, class_weight)`` (``target``: the indices, or the
    probabilities) also saves what a backward that recomputes the logits needs (read back by
    :func:`recompute_state`), followed by ``also_saved`` (read back as ``ctx.saved_tensors[10:]``).
    Returns ``(loss, z_part)`` (the caller marks z_part non-differentiable)."""
    loss = rt.reduce_loss(rt.row_loss(b_sum, lin, terms, lse, z_loss), reduction, factor, cdt)
    z_part = rt.reduce_loss(rt.z_term(terms, lse, z_loss), reduction, factor, cdt)
    if recompute_inputs is not None:
        a = rt.softmax_coefficient(b_sum, terms.zeta, lse, z_loss)
        ctx.save_for_backward(*recompute_inputs, lse, a, terms.coef_y, terms.coef_u, factor, *also_saved)
    return loss, z_part


class RecomputeState(NamedTuple):
    """What :func:`finish_forward` saved, with the row coefficients scaled by ``grad_output``: ``alpha = r a
    + g`` (``g`` the gradient reaching ``lse``), ``beta = r coef_y``, ``gamma = r coef_u`` (None without
    label smoothing), all ``(N,)`` and contiguous, ``r_i = grad_output_i`` for ``'none'``, else
    ``grad_output`` times the reduction's factor (softxent.torch._row_terms); ``terms`` the row terms of
    the target (``idx`` or ``proba``) with ``beta``, ``gamma`` as ``coef_y``, ``coef_u``."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    target: torch.Tensor
    class_weight: torch.Tensor | None
    lse: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor | None
    r: torch.Tensor

    def terms(self) -> rt.RowTerms:
        """The scaled coefficients as :class:`_row_terms.RowTerms` (target weights ``r B``)."""
        proba = self.target if self.target.is_floating_point() else None
        return rt.RowTerms(self.alpha, self.alpha, self.beta, self.gamma, None,
                           idx=None if proba is not None else self.target, proba=proba)


def recompute_state(ctx, grad_loss, grad_lse, reduction) -> RecomputeState:
    """Read back :func:`finish_forward`'s saved tensors and scale them by ``grad_loss`` (in the compute
    dtype; the product with the float64 factor is rounded once); a None gradient counts as 0."""
    x, weight, bias, target, cw, lse, a, coef_y, coef_u, factor = ctx.saved_tensors[:10]
    N = x.shape[0]
    cdt = val.compute_dtype(x.dtype)
    if grad_loss is None:
        r = torch.zeros(N, dtype=cdt, device=x.device)
    else:
        r = grad_loss.to(cdt)
        r = r.reshape(N) if reduction == "none" else (r * factor).to(cdt).expand(N)
    alpha = a * r
    if grad_lse is not None:
        alpha = alpha + grad_lse.reshape(N).to(cdt)
    return RecomputeState(x, weight, bias, target, cw, lse, alpha.contiguous(), (coef_y * r).contiguous(),
                          None if coef_u is None else (coef_u * r).contiguous(), r)


def row_terms(target, num_classes, cfg, sample_weight, class_weight, cdt) -> rt.RowTerms:
    """:func:`_row_terms.target_terms` with the options of ``cfg`` (a :class:`ChunkConfig` or its dict)."""
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    return rt.target_terms(target, num_classes, ignore_index=get("ignore_index"),
                           label_smoothing=get("label_smoothing"), reduction=get("reduction"),
                           z_loss_weighting=get("z_loss_weighting"), sample_weight=sample_weight,
                           class_weight=class_weight, dtype=cdt)


def predicted_class_hits(terms, ignore_index, target) -> torch.Tensor:
    """The class whose logit each row's accuracy checks: ``y_i`` (index targets), ``argmax_k p_ik``
    (probability targets), and which rows count (not ignored)."""
    if terms.proba is not None:
        return terms.proba.argmax(dim=1), torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
    return terms.idx, target != ignore_index


@val.first_derivatives_only
class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Inputs: x ``(N, D)``, weight ``(V, D)``, bias ``(V,)`` or None, target ``(N,)`` int64 or ``(N, V)``
    probabilities, sample weights ``(N,)`` or None, class weights ``(V,)`` or None, normalizer 0-d or
    None, :class:`ChunkConfig`.  Outputs: the loss, lse ``(N,)`` (differentiable), the z-loss part of the
    loss and, with ``want_correct``, whether each row's target logit is the row's maximum (``(N,)``
    bool; empty otherwise); the last two not differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, sample_weight, class_weight, normalizer, cfg):
        ctx.set_materialize_grads(False)
        N = x.shape[0]
        V = weight.shape[0]
        cdt = val.compute_dtype(x.dtype)
        dev = x.device
        cw = None if class_weight is None else class_weight.to(cdt)
        terms = row_terms(target, V, cfg, sample_weight, cw, cdt)
        proba = terms.proba is not None
        factor = rt.reduction_factor(cfg.reduction, terms.omega, normalizer)
        need_db = cfg.need_db and bias is not None
        need_grad = cfg.need_dx or cfg.need_dw or need_db or cfg.need_dp
        # gradients in forward need grad_output to be one scalar, and the target's gradient lse
        grads_now = cfg.reduction != "none" and need_grad and not cfg.need_dp
        prod = _Products(x, weight, bias, cdt)
        w_sum = float(V) if cw is None else cw.sum()

        lse = torch.empty(N, dtype=cdt, device=dev)
        b_sum = terms.b_sum if not proba else torch.empty(N, dtype=cdt, device=dev)
        lin = torch.empty(N, dtype=cdt, device=dev)
        hit_class, counted = predicted_class_hits(terms, cfg.ignore_index, target) if cfg.want_correct \
            else (None, None)
        correct = torch.zeros(N if cfg.want_correct else 0, dtype=torch.bool, device=dev)
        grads = f = None
        if grads_now:
            f = factor.to(cdt)
            grads = _Gradients(x, V, cdt, cfg.need_dx, cfg.need_dw, need_db)
        for i0, i1, xc, zb, tb in _logit_chunks(prod, x, V, cfg.softcap, need_grad,
                                                grads_now and cfg.softcap is not None, cfg.max_chunk_bytes,
                                                proba=proba):
            tc = terms[i0:i1]
            z_ws = None if tc.coef_u is None else (zb.sum(dim=1) if cw is None else zb @ cw)
            if proba:
                pw = rt.class_weighted(tc.proba.to(cdt), cw)
                b_sum[i0:i1], lin[i0:i1] = rt.proba_target_sums(tc, pw, zb, w_sum, z_ws)
                del pw
            else:
                lin[i0:i1] = rt.index_target_sum(tc, zb.gather(1, tc.idx[:, None])[:, 0], z_ws)
            m = zb.amax(dim=1)
            if cfg.want_correct:
                correct[i0:i1] = (zb.gather(1, hit_class[i0:i1, None])[:, 0] == m) & counted[i0:i1]
            zb.sub_(m[:, None]).exp_()
            s = zb.sum(dim=1)
            lse_c = torch.log(s).add_(m)
            lse[i0:i1] = lse_c
            if grads is None:
                continue
            a = rt.softmax_coefficient(b_sum[i0:i1], tc.zeta, lse_c, cfg.z_loss)
            target = _finish_delta(zb, a * f / s, tc.coef_y * f, None if tc.coef_u is None else tc.coef_u * f,
                                   tc, cw, tb)
            grads.add_chunk(prod, zb, xc, i0, i1, target)
        ctx.cfg = cfg
        ctx.grads_now = grads_now
        recompute_inputs = None
        if need_grad:  # (also for a gradient reaching lse after gradients in forward)
            recompute_inputs = (x, weight, bias, target if proba else terms.idx, cw)
        # saved tensors (not ctx attributes): autograd frees them after the backward
        loss, z_part = finish_forward(ctx, terms, lse, b_sum, lin, factor, cfg.reduction, cfg.z_loss, cdt,
                                      recompute_inputs,
                                      grads.in_input_dtypes(weight, bias) if grads_now else ())
        ctx.mark_non_differentiable(z_part, correct)
        return loss, lse, z_part, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_z_part, grad_correct):
        with autocast_off(x_device_type(ctx)):
            return ChunkedLinearCrossEntropy._backward(ctx, grad_loss, grad_lse)

    @staticmethod
    def _backward(ctx, grad_loss, grad_lse):
        cfg = ctx.cfg
        if ctx.grads_now:
            # A 0-d grad_output does not promote: the products keep the gradients' dtypes and are
            # computed at the operation's float32 precision (exact when grad_output is 1).
            g = grad_loss
            grads = tuple(None if t is None else (t * g if g is not None else torch.zeros_like(t))
                          for t in ctx.saved_tensors[10:])
            if grad_lse is None:
                return (*grads, None, None, None, None, None)
            # lse's gradient g_i h_i: one more pass over recomputed logits, without the target
            st = recompute_state(ctx, None, grad_lse, cfg.reduction)
            extra = _recomputed_gradients(cfg, st._replace(beta=torch.zeros_like(st.beta), gamma=None))
            return (*(a if b is None else a + b for a, b in zip(grads, extra[:3])), None, None, None, None,
                    None)
        st = recompute_state(ctx, grad_loss, grad_lse, cfg.reduction)
        return _recomputed_gradients(cfg, st) + (None, None, None, None)


def x_device_type(ctx) -> str:
    return ctx.saved_tensors[0].device.type


def _recomputed_gradients(cfg, st: RecomputeState):
    """``(dx, dW, db, dP)`` from logits recomputed chunk by chunk (``dP``: the probability targets'
    gradient ``r_i coef_p_i w_k (lse_i - zhat_ik)``, when needed; st.beta is ``r coef_p`` there)."""
    x, weight, bias = st.x, st.weight, st.bias
    cdt = val.compute_dtype(x.dtype)
    need_db = cfg.need_db and bias is not None
    prod = _Products(x, weight, bias, cdt)
    V = weight.shape[0]
    grads = _Gradients(x, V, cdt, cfg.need_dx, cfg.need_dw, need_db, cdt if cfg.partial_dx else None)
    terms = st.terms()
    proba = terms.proba is not None
    d_proba = torch.empty_like(terms.proba) if (proba and cfg.need_dp) else None
    for i0, i1, xc, zb, tb in _logit_chunks(prod, x, V, cfg.softcap, True, cfg.softcap is not None,
                                            cfg.max_chunk_bytes, proba=proba):
        zb.sub_(st.lse[i0:i1, None])          # zhat - lse
        if d_proba is not None:
            d_proba[i0:i1] = rt.class_weighted(zb * (-st.beta[i0:i1])[:, None], st.class_weight)
        zb.exp_()
        target = _finish_delta(zb, st.alpha[i0:i1], st.beta[i0:i1],
                               None if st.gamma is None else st.gamma[i0:i1], terms[i0:i1], st.class_weight, tb)
        grads.add_chunk(prod, zb, xc, i0, i1, target)
    return (*grads.in_input_dtypes(weight, bias), d_proba)

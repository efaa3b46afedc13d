"""Fused linear + cross-entropy in pure PyTorch, rows in chunks (``impl='chunked'``): any device.

For hidden states ``x`` ``(N, D)``, the output layer ``W`` ``(V, D)`` and bias ``b`` ``(V,)``, the logits
``z = x W^T + b`` are formed ``R`` rows at a time into one reused float32 buffer ``(R, V)``; the buffer
goes logits -> exp -> the seed's delta in place (notation of softxent.torch._row_terms)::

    delta_ik = r_i (a_i h_ik - coef_y_i [k = y_i] - coef_u_i w_k) (1 - tanh^2(z_ik / c))
    dx = delta W,    dW = delta^T x,    db = sum_i delta_i

Two schedules:

* gradients in forward -- reduction ``'mean'`` / ``'sum'`` with a gradient needed: the reduction's
  factor is known in forward (``1 / sum omega``, ``1 / normalizer`` or 1) and ``grad_output`` is one
  scalar, so each chunk's delta is formed right after its logits and multiplied into dx / dW / db at
  once; backward only scales those by ``grad_output``.  Three matrix products in all, like the naive
  ``x @ W.T`` + ``F.cross_entropy`` + backward, and one ``exp`` per logit instead of two.
* recompute -- reduction ``'none'`` (``grad_output`` has one value per row, unknown in forward):
  forward keeps ``lse`` ``(N,)`` only, backward recomputes each chunk of logits (four products).

Precision: the math runs in float32 (float64 for float64 inputs).  For float16 / bfloat16 inputs the
weight is upcast once to float32 (``V D 4`` bytes) and every product runs in float32, so nothing is
rounded to the input precision before the loss and the gradients; ``dW`` and ``db`` are accumulated in
float32 over all chunks and cast once.  Gradients come back in the inputs' dtypes, scaled by the
reduction's factor; backward multiplies by ``grad_output`` (exact when it is 1, as in ``loss.backward()``).
Only the gradients of inputs that require one are computed or allocated; under ``torch.no_grad`` (or
with nothing requiring a gradient) forward computes the loss only.

Peak extra memory (bytes, beyond the inputs and the returned gradients), with ``R`` rows per chunk::

    R V 4 (1 + [softcap and a gradient is computed])    the chunk buffer(s): <= max_chunk_bytes
  + V D 4 [W is float16/bfloat16]                        the float32 copy of W
  + V D 4 [dW needed and W is not float32]               the float32 dW accumulator (cast once at the end)
  + R D 4 [x is float16/bfloat16]                        float32 copies of a chunk of x and of its dx
  + O(N + V)                                             per-row and per-class vectors

    R = clamp(max_chunk_bytes // (V 4 (1 + [softcap and a gradient is computed])), 1, N)

(float64 inputs count 8 bytes per element instead of 4).  In the gradients-in-forward schedule the
returned gradients (``dx`` N D, ``dW`` V D, ``db`` V, in the inputs' dtypes) exist from forward on
instead of from backward on.  Example: (N, D, V) = (8192, 512, 32000) float32 with the default
128 MiB: R = 1048 rows, 128 MiB of buffers, measured peak 217 MiB including the 78.5 MiB of gradients,
against 3009 MiB for naive PyTorch (benchmarks/linear_ce_cpu.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from . import _row_terms as rt
from . import _validation as val

DEFAULT_MAX_CHUNK_BYTES = 128 * 2**20
"""Default bound on the chunk buffers: 128 MiB (1048 rows at V = 32000 in float32).  With
benchmarks/linear_ce_cpu.py on a shared 2-core CPU, 32, 64 and 128 MiB timed alike (within the noise,
each about 0.8x naive PyTorch at N = 2048); 128 MiB keeps the products thick (GPUs need them) while the
peak stays far under 1/8 of naive PyTorch's."""


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

    def dx(self, delta, out):
        """``out = delta W`` (out in x's dtype)."""
        if out.dtype == self.cdt:
            torch.mm(delta, self.w, out=out)
        else:
            out.copy_(delta @ self.w)

    def dw_accumulate(self, acc, delta, xc):
        """``acc += delta^T xc`` in the compute dtype."""
        acc.addmm_(delta.t(), xc)


def _finish_delta(buf, alpha, beta, gamma, idx, class_weight, tanh_buf):
    """``buf`` holds ``exp(zhat - shift)``; turn it into delta in place (module docstring), where
    ``alpha_i`` includes the normalisation of the exponentials."""
    buf.mul_(alpha[:, None])
    buf.scatter_add_(1, idx[:, None], (-beta)[:, None])
    if gamma is not None:
        if class_weight is None:
            buf.sub_(gamma[:, None])
        else:
            buf.addr_(gamma, class_weight, alpha=-1)
    if tanh_buf is not None:  # chain rule through zhat = c tanh(z / c): times 1 - tanh^2
        tanh_buf.mul_(tanh_buf)
        buf.addcmul_(buf, tanh_buf, value=-1)


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


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Inputs: x ``(N, D)``, weight ``(V, D)``, bias ``(V,)`` or None, target ``(N,)`` int64, sample weights
    ``(N,)`` or None, class weights ``(V,)`` or None, normalizer 0-d or None, :class:`ChunkConfig`.
    Outputs: the loss and lse ``(N,)`` (not differentiable)."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, sample_weight, class_weight, normalizer, cfg):
        N, D = x.shape
        V = weight.shape[0]
        cdt = val.compute_dtype(x.dtype)
        dev = x.device
        terms = rt.index_terms(target, V, ignore_index=cfg.ignore_index,
                               label_smoothing=cfg.label_smoothing, sample_weight=sample_weight,
                               class_weight=class_weight, dtype=cdt)
        cw = None if class_weight is None else class_weight.to(cdt)
        factor = rt.reduction_factor(cfg.reduction, terms.omega, normalizer)
        need_db = cfg.need_db and bias is not None
        grads_now = cfg.reduction != "none" and (cfg.need_dx or cfg.need_dw or need_db)
        softcap = cfg.softcap
        n_buf = 2 if (softcap is not None and grads_now) else 1
        itemsize = torch.finfo(cdt).bits // 8
        R = chunk_rows(N, V, itemsize, n_buf, cfg.max_chunk_bytes)
        prod = _Products(x, weight, bias, cdt)

        lse = torch.empty(N, dtype=cdt, device=dev)
        z_t = torch.empty(N, dtype=cdt, device=dev)
        z_ws = None if terms.coef_u is None else torch.empty(N, dtype=cdt, device=dev)
        dx = dw = db = None
        if grads_now:
            f = factor.to(cdt)
            dx = torch.empty_like(x) if cfg.need_dx else None
            dw = torch.zeros(V, D, dtype=cdt, device=dev) if cfg.need_dw else None
            db = torch.zeros(V, dtype=cdt, device=dev) if need_db else None
        buf = torch.empty(min(R, N), V, dtype=cdt, device=dev)
        tbuf = torch.empty_like(buf) if n_buf == 2 else None
        for i0 in range(0, N, R):
            i1 = min(N, i0 + R)
            n = i1 - i0
            zb = buf[:n]
            tb = None if tbuf is None else tbuf[:n]
            xc = prod.x_chunk(x[i0:i1])
            _capped_logits(prod, xc, zb, tb, softcap)
            tc = terms[i0:i1]
            z_t[i0:i1] = zb.gather(1, tc.idx[:, None])[:, 0]
            if z_ws is not None:
                z_ws[i0:i1] = zb.sum(dim=1) if cw is None else zb @ cw
            m = zb.amax(dim=1)
            zb.sub_(m[:, None]).exp_()
            s = zb.sum(dim=1)
            lse_c = torch.log(s).add_(m)
            lse[i0:i1] = lse_c
            if not grads_now:
                continue
            a = rt.softmax_coefficient(tc.b_sum, tc.omega, lse_c, cfg.z_loss)
            _finish_delta(zb, a * f / s, tc.coef_y * f, None if tc.coef_u is None else tc.coef_u * f,
                          tc.idx, cw, tb)
            if dx is not None:
                prod.dx(zb, out=dx[i0:i1])
            if dw is not None:
                prod.dw_accumulate(dw, zb, xc)
            if db is not None:
                db += zb.sum(dim=0)
        del buf, tbuf
        row_loss = rt.index_row_loss(terms, lse, z_t, z_ws, cfg.z_loss)
        loss = rt.reduce_loss(row_loss, cfg.reduction, factor, cdt)
        ctx.cfg = cfg
        ctx.grads_now = grads_now
        if grads_now:
            ctx.save_for_backward(dx, None if dw is None else dw.to(weight.dtype),
                                  None if db is None else db.to(bias.dtype))
        elif cfg.need_dx or cfg.need_dw or need_db:
            a = rt.softmax_coefficient(terms.b_sum, terms.omega, lse, cfg.z_loss)
            ctx.save_for_backward(x, weight, bias, terms.idx, terms.coef_y, terms.coef_u, a, lse, cw,
                                  factor)
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_lse):
        with autocast_off(grad_loss.device.type):
            return ChunkedLinearCrossEntropy._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        cfg = ctx.cfg
        if ctx.grads_now:
            dx, dw, db = ctx.saved_tensors
            # A 0-d grad_output does not promote: the products keep the gradients' dtypes and are
            # computed at the operation's float32 precision (exact when grad_output is 1).
            g = grad_loss
            return (None if dx is None else dx * g, None if dw is None else dw * g,
                    None if db is None else db * g, None, None, None, None, None)
        x, weight, bias, idx, coef_y, coef_u, a, lse, cw, factor = ctx.saved_tensors
        N, D = x.shape
        V = weight.shape[0]
        cdt = val.compute_dtype(x.dtype)
        dev = x.device
        r = grad_loss.to(cdt)
        r = r.reshape(N) if cfg.reduction == "none" else r * factor.to(cdt)
        alpha, beta = a * r, coef_y * r
        gamma = None if coef_u is None else coef_u * r
        need_db = cfg.need_db and bias is not None
        softcap = cfg.softcap
        n_buf = 2 if softcap is not None else 1
        R = chunk_rows(N, V, torch.finfo(cdt).bits // 8, n_buf, cfg.max_chunk_bytes)
        prod = _Products(x, weight, bias, cdt)
        dx = torch.empty_like(x) if cfg.need_dx else None
        dw = torch.zeros(V, D, dtype=cdt, device=dev) if cfg.need_dw else None
        db = torch.zeros(V, dtype=cdt, device=dev) if need_db else None
        buf = torch.empty(min(R, N), V, dtype=cdt, device=dev)
        tbuf = torch.empty_like(buf) if n_buf == 2 else None
        for i0 in range(0, N, R):
            i1 = min(N, i0 + R)
            zb = buf[: i1 - i0]
            tb = None if tbuf is None else tbuf[: i1 - i0]
            xc = prod.x_chunk(x[i0:i1])
            _capped_logits(prod, xc, zb, tb, softcap)
            zb.sub_(lse[i0:i1, None]).exp_()
            _finish_delta(zb, alpha[i0:i1], beta[i0:i1], None if gamma is None else gamma[i0:i1],
                          idx[i0:i1], cw, tb)
            if dx is not None:
                prod.dx(zb, out=dx[i0:i1])
            if dw is not None:
                prod.dw_accumulate(dw, zb, xc)
            if db is not None:
                db += zb.sum(dim=0)
        return (dx, None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None, None, None, None, None)

"""``softxent.torch.cross_entropy``: softxent.loss.cross_entropy as a torch.autograd.Function.

Same options and semantics as the NumPy reference (classes on the LAST axis; class-index or probability
targets; ``weight``, ``sample_weight``, ``ignore_index``, ``label_smoothing``, ``reduction``, ``z_loss``,
``softcap``; a mean over nothing is 0 with a zero gradient).  The math runs in float32 for float16 /
bfloat16 / float32 logits (float64 for float64); the loss comes back in that dtype and the gradient in
the logits' dtype.  Forward keeps the row statistics (max ``m_i`` and ``sum_k exp(zhat_ik - m_i)``, two
``(N,)`` vectors) and references the logits; backward recomputes the softmax from them, so any
``grad_output`` works (a scalar, or one value per row for ``reduction='none'``) and no ``N x K`` buffer
is kept between forward and backward.  Gradients flow to the logits and to probability targets (as in
``F.cross_entropy``); weights are constants.
"""

from __future__ import annotations

import torch

from ..loss import PROBA_IGNORE_INDEX_MESSAGE
from . import _row_terms as rt
from . import _validation as val


def _capped(z: torch.Tensor, softcap):
    """``(zhat, tanh(z/c))``: the softcapped logits and the tanh (None without a softcap)."""
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


def _shift(zhat: torch.Tensor) -> torch.Tensor:
    """Row maxima, with non-finite ones replaced by 0 (softxent.loss._shift)."""
    m = zhat.amax(dim=-1)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _masked_row_sum(zhat: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``sum_k w_k zhat_ik`` with zero-weight classes left out (so ``-inf`` there is harmless)."""
    if w is None:
        return zhat.sum(dim=-1)
    return torch.where(w == 0, torch.zeros((), dtype=zhat.dtype, device=zhat.device), zhat * w).sum(-1)


@val.first_derivatives_only
class _CrossEntropyFunction(torch.autograd.Function):
    """Inputs: logits ``(M, K)``, target ``(M,)`` int64 or ``(M, K)`` floating, sample weights ``(M,)``
    or None, class weights ``(K,)`` or None, normalizer 0-d or None, and a dict of options.
    Outputs: the loss (reduced, or ``(M,)``), ``lse`` ``(M,)`` (differentiable: ``dlse/dzhat = h``) and
    the z-loss part of the loss, reduced like it (not differentiable)."""

    @staticmethod
    def forward(ctx, logits, target, sample_weight, class_weight, normalizer, opt):
        ctx.set_materialize_grads(False)
        cdt = val.compute_dtype(logits.dtype)
        M, K = logits.shape
        z = logits.to(cdt)
        zhat, _ = _capped(z, opt["softcap"])
        m = _shift(zhat)
        ssum = torch.exp(zhat - m[:, None]).sum(dim=-1)
        lse = torch.log(ssum) + m
        sw = None if sample_weight is None else sample_weight.to(cdt)
        cw = None if class_weight is None else class_weight.to(cdt)
        terms = rt.target_terms(target, K, ignore_index=opt["ignore_index"],
                                label_smoothing=opt["label_smoothing"], reduction=opt["reduction"],
                                z_loss_weighting=opt["z_loss_weighting"], sample_weight=sw, class_weight=cw,
                                dtype=cdt)
        z_ws = None if terms.coef_u is None else _masked_row_sum(zhat, cw)
        if opt["index"]:
            z_t = zhat.gather(1, terms.idx[:, None])[:, 0]
            b_sum, lin = terms.b_sum, rt.index_target_sum(terms, z_t, z_ws)
        else:
            w_sum = float(K) if cw is None else cw.sum()
            pw = rt.class_weighted(target.to(cdt), cw)
            b_sum, lin = rt.proba_target_sums(terms, pw, torch.where(pw == 0, 0.0, zhat), w_sum, z_ws)
        row_loss = rt.row_loss(b_sum, lin, terms, lse, opt["z_loss"])
        factor = rt.reduction_factor(opt["reduction"], terms.omega, normalizer)
        loss = rt.reduce_loss(row_loss, opt["reduction"], factor, cdt)
        z_part = rt.reduce_loss(rt.z_term(terms, lse, opt["z_loss"]), opt["reduction"], factor, cdt)
        a = rt.softmax_coefficient(b_sum, terms.zeta, lse, opt["z_loss"])
        ctx.opt = opt
        ctx.terms = terms
        ctx.save_for_backward(logits, target if not opt["index"] else None, cw, m, ssum, lse, a, factor)
        ctx.mark_non_differentiable(z_part)
        return loss, lse, z_part

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_z_part):
        logits, proba, cw, m, ssum, lse, a, factor = ctx.saved_tensors
        terms, opt = ctx.terms, ctx.opt
        need_logits, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cdt = val.compute_dtype(logits.dtype)
        M, K = logits.shape
        if grad_loss is None:
            r = torch.zeros(M, dtype=cdt, device=logits.device)
        else:
            r = grad_loss.to(cdt)
            r = r.reshape(M) if opt["reduction"] == "none" else (r * factor.to(cdt)).expand(M)
        zhat, t = _capped(logits.to(cdt), opt["softcap"])
        d_logits = d_target = None
        if need_target and grad_loss is not None:
            # dloss_i/dp_ik = coef_p_i w_k (lse_i - zhat_ik), times r_i
            g = rt.safe_mul(rt.class_weighted((r * terms.coef_y)[:, None].expand(M, K), cw),
                            lse[:, None] - zhat)
            d_target = g.to(proba.dtype)
        if need_logits:
            ar = a * r
            if grad_lse is not None:
                ar = ar + grad_lse.reshape(M).to(cdt)
            # A row that carries no loss (ignored, zero weight) gets an exact 0, even where its softmax
            # is NaN (softxent.loss._backward).
            scale = torch.where(ar == 0, torch.zeros_like(ar), ar / ssum)
            g = torch.exp(zhat - m[:, None]) * scale[:, None]
            if opt["index"]:
                g.scatter_add_(1, terms.idx[:, None], (-(terms.coef_y * r))[:, None])
                if terms.coef_u is not None:
                    u = terms.coef_u * r
                    g -= u[:, None] if cw is None else u[:, None] * cw
            else:
                pw = rt.class_weighted(proba.to(cdt), cw)
                g -= rt.proba_target_weights(terms, pw, cw) * r[:, None]
            if t is not None:
                g *= 1 - t * t
            d_logits = g.to(logits.dtype)
        return d_logits, d_target, None, None, None, None


def _cross_entropy(logits, target, *, weight=None, sample_weight=None, ignore_index=-100,
                   label_smoothing=0.0, reduction="mean", z_loss=0.0, softcap=None, normalizer=None,
                   z_loss_weighting="class", target_name="target"):
    """Validated, flattened call of the Function; returns ``(loss, lse, z_part)``, lse of shape ``(...)``
    (differentiable), z_part the z-loss part of the loss (shaped like the loss, not differentiable)."""
    val.check_options(reduction, label_smoothing, z_loss, softcap)
    val.check_z_loss_weighting(z_loss_weighting)
    ignore_index = val.check_ignore_index(ignore_index)
    val.check_float_tensor(logits, "logits")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have at least one class on the last axis, shape (..., K) with "
                         f"K >= 1; got shape {tuple(logits.shape)}")
    K = logits.shape[-1]
    lead = tuple(logits.shape[:-1])
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{target_name} must be a torch.Tensor; got {type(target).__name__}")
    val.check_not_dtensor(target, target_name)
    index = not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool)
    if index:
        if tuple(target.shape) != lead:
            raise ValueError(f"{target_name} of class indices must have shape {lead} (logits "
                             f"{tuple(logits.shape)} without the class axis); got shape "
                             f"{tuple(target.shape)}")
    elif target.dtype == torch.bool or target.is_complex() or tuple(target.shape) != tuple(logits.shape):
        raise TypeError(f"{target_name} must hold integer class indices of shape {lead}, or class "
                        f"probabilities (floating) of shape {tuple(logits.shape)}; got dtype "
                        f"{target.dtype} and shape {tuple(target.shape)}")
    if not index and ignore_index >= 0:
        raise ValueError(PROBA_IGNORE_INDEX_MESSAGE.format(ignore_index=ignore_index))
    val.check_same_device({"logits": logits, target_name: target})
    dev = logits.device
    cw = val.check_weights_tensor(weight, (K,), "weight", dev)
    sw = val.check_weights_tensor(sample_weight, lead, "sample_weight", dev)
    norm = val.check_normalizer(normalizer, reduction, dev)
    flat_target = target.reshape(-1) if index else target.reshape(-1, K)
    if index:
        flat_target = flat_target.to(torch.int64)
    weights = [("weight", cw), ("sample_weight", sw)]
    if not index:
        weights.append((f"{target_name} probabilities", flat_target.detach()))
    val.check_values(target=flat_target if index else None, num_classes=K, ignore_index=ignore_index,
                     weights=weights, normalizer=norm, target_name=target_name)
    opt = dict(index=index, ignore_index=ignore_index, label_smoothing=float(label_smoothing),
               reduction=reduction, z_loss=float(z_loss), z_loss_weighting=z_loss_weighting,
               softcap=None if softcap is None else float(softcap))
    loss, lse, z_part = _CrossEntropyFunction.apply(
        logits.reshape(-1, K), flat_target, None if sw is None else sw.reshape(-1), cw, norm, opt)
    if reduction == "none":
        loss, z_part = loss.reshape(lead), z_part.reshape(lead)
    return loss, lse.reshape(lead), z_part


def cross_entropy(logits, target, *, weight=None, sample_weight=None, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean", z_loss: float = 0.0,
                  softcap: float | None = None, z_loss_weighting: str = "class") -> torch.Tensor:
    """Softmax cross-entropy with PyTorch's options, classes on the LAST axis (softxent.loss semantics).

    For logits ``z`` ``(..., K)`` and targets turned into per-class weights ``B`` (see
    softxent.loss.cross_entropy)::

        loss_i = sum_k B_ik (lse(zhat_i) - zhat_ik) + z_loss omega_i lse(zhat_i)^2,  zhat = c tanh(z/c) or z
        'mean': sum_i loss_i / sum_i omega_i  (0 when that sum is 0),  'sum': sum_i loss_i,  'none': loss_i

    Args:
        logits: ``(..., K)`` float16 / bfloat16 / float32 / float64.
        target: integer class indices ``(...)``, or class probabilities ``(..., K)`` (floating; rows
            need not sum to 1; differentiable).
        weight: ``(K,)`` non-negative class weights.
        sample_weight: ``(...)`` non-negative row weights (also weight the 'mean' denominator).
        ignore_index: index targets equal to it contribute nothing (may lie inside ``[0, K)``).
        label_smoothing: ``eps`` in [0, 1]: the target becomes ``(1 - eps) y + eps / K``.
        reduction: ``'mean'``, ``'sum'`` or ``'none'`` (per-row losses of shape ``(...)``).
        z_loss: adds ``z_loss * lse^2`` per row, weighted like the target.
        softcap: ``c > 0`` caps the logits to ``c tanh(z / c)`` before the softmax.
        z_loss_weighting: ``'class'`` (default: the z term weighted like the row, ``s_i w_{y_i}``) or
            ``'token'`` (PaLM / Liger: ``s_i`` only, its 'mean' over the non-ignored rows' ``s_i``);
            softxent.torch._row_terms explains both.  The same for probability targets.

    Returns:
        the loss in float32 (float64 for float64 logits): a 0-d tensor, or ``(...)`` for 'none'.  Its
        gradient reaches the logits (in their dtype) and probability targets, for any grad_output.
        First derivatives only: differentiating a ``create_graph=True`` gradient raises RuntimeError.

    >>> import torch
    >>> z = torch.tensor([[2.0, 0.0, 0.0]], requires_grad=True)
    >>> loss = cross_entropy(z, torch.tensor([0]))
    >>> round(loss.item(), 6)
    0.239545
    >>> loss.backward(); z.grad   # h(z) - y, the seed's delta
    tensor([[-0.2129,  0.1065,  0.1065]])
    """
    loss, _, _ = _cross_entropy(logits, target, weight=weight, sample_weight=sample_weight,
                                ignore_index=ignore_index, label_smoothing=label_smoothing,
                                reduction=reduction, z_loss=z_loss, softcap=softcap,
                                z_loss_weighting=z_loss_weighting)
    return loss

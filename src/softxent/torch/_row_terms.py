"""The per-row coefficients of the cross-entropy, on tensors: softxent.loss._forward's notation.

Write the (smoothed, weighted) target of row ``i`` as per-class weights ``B_i``.  For a class-index
target ``y_i`` with sample weight ``s_i``, class weights ``w`` (1 if None), smoothing ``eps`` and ``V``
classes::

    B_ik    = s_i ((1 - eps) w_k [k = y_i] + eps/V w_k)          (0 for an ignored row)
            = coef_y_i [k = y_i] + coef_u_i w_k,    coef_y_i = omega_i (1 - eps),  coef_u_i = s_i eps / V
    omega_i = s_i w_{y_i}                                         (the row's weight in the 'mean')
    loss_i  = b_i lse_i - coef_y_i zhat_{i,y_i} - coef_u_i sum_k w_k zhat_ik + z_loss omega_i lse_i^2
    dloss_i/dzhat_ik = a_i h_ik - B_ik,   a_i = b_i + 2 z_loss omega_i lse_i,   b_i = sum_k B_ik

(``V = 1``: ``coef_y = coef_u = b = 0``, since ``h = 1`` makes the target term vanish identically.)

where ``zhat = softcap tanh(z / softcap)`` (or ``z``), ``lse_i = logsumexp_k zhat_ik`` and
``h_i = softmax(zhat_i)``; with a softcap the gradient on ``z`` gets the factor ``1 - tanh(z/c)^2``.
So a row needs only three numbers from the logits (``lse_i``, ``zhat_{i,y_i}`` and, with smoothing,
``sum_k w_k zhat_ik``), which is what lets the fused linear + cross-entropy never hold the logits.

The reduction puts a factor ``r_i`` in front of each row's gradient: ``grad_output / sum_i omega_i``
for ``'mean'`` (0 when that sum is 0: the mean over nothing is 0 with a zero gradient),
``grad_output / normalizer`` for ``'sum'`` with a normalizer (0 when it is 0), ``grad_output`` for
``'sum'`` and ``grad_output_i`` for ``'none'``.  The Triton kernels take ``alpha = r a``,
``beta = r coef_y`` and ``gamma = r coef_u``.

This is the same math as softxent.loss (the float64 NumPy reference the tests compare against).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class IndexTerms:
    """Per-row coefficients for class-index targets, all ``(N,)`` in the compute dtype."""

    idx: torch.Tensor            # int64 y_i where valid, else 0 (safe to gather / scatter)
    omega: torch.Tensor          # s_i w_{y_i}, 0 when ignored
    coef_y: torch.Tensor         # omega_i (1 - eps)
    coef_u: torch.Tensor | None  # s_i eps / V, 0 when ignored; None when eps == 0
    b_sum: torch.Tensor          # sum_k B_ik

    def __getitem__(self, sl) -> "IndexTerms":
        return IndexTerms(self.idx[sl], self.omega[sl], self.coef_y[sl],
                          None if self.coef_u is None else self.coef_u[sl], self.b_sum[sl])


def index_terms(target: torch.Tensor, num_classes: int, *, ignore_index: int, label_smoothing: float,
                sample_weight: torch.Tensor | None, class_weight: torch.Tensor | None,
                dtype: torch.dtype) -> IndexTerms:
    """:class:`IndexTerms` for flat targets ``(N,)`` (weights already flat and on the device)."""
    valid = target != ignore_index
    idx = torch.where(valid, target, 0).to(torch.int64)
    zero = torch.zeros((), dtype=dtype, device=target.device)
    s = None if sample_weight is None else sample_weight.to(dtype)
    if class_weight is None:
        omega = torch.where(valid, s if s is not None else torch.ones((), dtype=dtype,
                                                                       device=target.device), zero)
        w_sum = float(num_classes)
    else:
        cw = class_weight.to(dtype)
        wy = cw[idx]
        omega = torch.where(valid, wy if s is None else s * wy, zero)
        w_sum = cw.sum()
    omega = omega.expand(target.shape).contiguous() if omega.dim() == 0 else omega
    if num_classes == 1:
        # One class: h = 1 and lse = zhat, so the target term vanishes whatever B is; dropping it (rather
        # than forming b h - B, whose float sums need not cancel: -6e-8 with smoothing) gives an exact 0
        # loss and gradient, as PyTorch does (softxent.loss._coefficients).  The z-loss term remains.
        zeros = torch.zeros_like(omega)
        return IndexTerms(idx, omega, zeros, None, zeros)
    eps = float(label_smoothing)
    coef_y = omega * (1.0 - eps)
    coef_u = None
    b_sum = coef_y
    if eps > 0:
        s_valid = torch.where(valid, s if s is not None else torch.ones((), dtype=dtype,
                                                                        device=target.device), zero)
        coef_u = s_valid.expand(target.shape) * (eps / num_classes)
        b_sum = coef_y + coef_u * w_sum
    return IndexTerms(idx, omega, coef_y, coef_u, b_sum)


def safe_mul(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``coef * x`` with ``0 * (+-inf or NaN) = 0``: a zero weight means the term is absent."""
    return torch.where(coef == 0, torch.zeros((), dtype=x.dtype, device=x.device), coef * x)


def index_row_loss(terms: IndexTerms, lse: torch.Tensor, z_target: torch.Tensor,
                   z_wsum: torch.Tensor | None, z_loss: float) -> torch.Tensor:
    """``loss_i`` from ``lse_i``, ``zhat_{i,y_i}`` and ``sum_k w_k zhat_ik`` (module docstring)."""
    loss = safe_mul(terms.b_sum, lse) - safe_mul(terms.coef_y, z_target)
    if terms.coef_u is not None:
        loss = loss - safe_mul(terms.coef_u, z_wsum)
    if z_loss > 0:
        loss = loss + safe_mul(terms.omega * z_loss, lse * lse)
    return loss


def softmax_coefficient(b_sum: torch.Tensor, omega: torch.Tensor, lse: torch.Tensor,
                        z_loss: float) -> torch.Tensor:
    """``a_i = b_i + 2 z_loss omega_i lse_i``: the factor in front of ``h_i`` in the gradient."""
    if z_loss > 0:
        return b_sum + safe_mul(omega * (2.0 * z_loss), lse)
    return b_sum


def _sum64(t: torch.Tensor) -> torch.Tensor:
    """A sum accumulated in float64 where the device has it (the reference sums in float64)."""
    if t.device.type == "mps":
        return t.sum()
    return t.sum(dtype=torch.float64)


def reduction_factor(reduction: str, omega: torch.Tensor, normalizer: torch.Tensor | None):
    """The scalar in front of every row's gradient (before grad_output), as a 0-d float64 tensor
    (float32 on MPS), or None for ``'none'`` -- without any host synchronisation."""
    if reduction == "none":
        return None
    if reduction == "mean":
        denom = _sum64(omega)
    elif normalizer is not None:
        denom = normalizer.to(torch.float64) if normalizer.device.type != "mps" else normalizer
    else:
        return torch.ones((), dtype=torch.float64 if omega.device.type != "mps" else torch.float32,
                          device=omega.device)
    positive = denom > 0
    one = torch.ones((), dtype=denom.dtype, device=denom.device)
    return torch.where(positive, one / torch.where(positive, denom, one), torch.zeros_like(one))


def reduce_loss(row_loss: torch.Tensor, reduction: str, factor, out_dtype: torch.dtype) -> torch.Tensor:
    """``'none'``: the per-row losses; otherwise ``sum_i loss_i * factor`` summed in float64."""
    if reduction == "none":
        return row_loss.to(out_dtype)
    return (_sum64(row_loss) * factor).to(out_dtype)

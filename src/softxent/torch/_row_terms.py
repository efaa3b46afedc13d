"""The per-row coefficients of the cross-entropy, on tensors: softxent.loss._forward's notation.

Write the (smoothed, weighted) target of row ``i`` as per-class weights ``B_i``, with sample weight
``s_i``, class weights ``w`` (1 if None), smoothing ``eps`` and ``V`` classes.  For a class-index target
``y_i`` and for a probability target ``p_i`` (a row of ``(N, V)``, need not sum to 1)::

    index:  B_ik = s_i ((1 - eps) w_k [k = y_i] + eps/V w_k)  = coef_y_i [k = y_i]  + coef_u_i w_k
            coef_y_i = omega_i (1 - eps),  omega_i = s_i w_{y_i}          (0 for an ignored row)
    proba:  B_ik = s_i w_k ((1 - eps) p_ik + eps/V)             = coef_p_i w_k p_ik + coef_u_i w_k
            coef_p_i = s_i (1 - eps),       omega_i = s_i                  (PyTorch: 'mean' over N)
    coef_u_i = s_i eps / V  (0 for an ignored row)
    loss_i  = b_i lse_i - lin_i + z_loss zeta_i lse_i^2,    b_i = sum_k B_ik,   lin_i = sum_k B_ik zhat_ik
    dloss_i/dzhat_ik = a_i h_ik - B_ik,   a_i = b_i + 2 z_loss zeta_i lse_i

where ``zhat = softcap tanh(z / softcap)`` (or ``z``), ``lse_i = logsumexp_k zhat_ik`` and
``h_i = softmax(zhat_i)``; with a softcap the gradient on ``z`` gets the factor ``1 - tanh(z/c)^2``.
For index targets a row needs only three numbers from the logits (``lse_i``, ``zhat_{i,y_i}`` and, with
smoothing, ``sum_k w_k zhat_ik``); for probability targets ``sum_k w_k p_ik zhat_ik`` replaces the
target logit.  That is what lets the fused linear + cross-entropy never hold the logits.
(``V = 1``: ``coef_y = coef_u = b = 0``, since ``h = 1`` makes the target term vanish identically.)

``zeta_i``, the z-loss's row weight (``z_loss_weighting``): ``'class'`` (the default, softxent.loss's)
weights it like the target, ``zeta = omega`` -- each row's loss, z term included, counts by the same
weight and ``'none'.sum() / sum omega == 'mean'``; ``'token'`` (PaLM / Liger's ``lse_square_scale``)
leaves class weights out, ``zeta_i = s_i [not ignored]``, and its ``'mean'`` averages the z term over
``sum_i zeta_i`` (tokens) while the cross-entropy term stays over ``sum_i omega_i``: implemented as
``zeta_i sum omega / sum zeta`` under the one factor below.  Probability targets: both give ``s_i``.

The reduction puts a factor ``r_i`` in front of each row's gradient: ``grad_output / sum_i omega_i``
for ``'mean'`` (0 when that sum is 0: the mean over nothing is 0 with a zero gradient),
``grad_output / normalizer`` for ``'sum'`` with a normalizer (0 when it is 0), ``grad_output`` for
``'sum'`` and ``grad_output_i`` for ``'none'``.  A differentiable ``lse`` (``return_lse``) adds its
upstream gradient ``g_i`` to ``r_i a_i`` (``dlse_i / dzhat_i = h_i``).  The Triton kernels take
``alpha = r a + g``, ``beta = r coef_y`` (or ``r coef_p``) and ``gamma = r coef_u``.

This is the same math as softxent.loss (the float64 NumPy reference the tests compare against).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


Z_LOSS_WEIGHTINGS = ("class", "token")


@dataclass
class RowTerms:
    """Per-row coefficients (module docstring), all ``(N,)`` in the compute dtype; either ``idx`` (index
    targets) or ``proba`` (probability targets) is set."""

    omega: torch.Tensor           # the row's weight in the 'mean'
    zeta: torch.Tensor            # the z-loss's row weight
    coef_y: torch.Tensor          # index: omega_i (1 - eps); proba: coef_p_i = s_i (1 - eps)
    coef_u: torch.Tensor | None   # s_i eps / V, 0 when ignored; None when eps == 0
    b_sum: torch.Tensor | None    # sum_k B_ik (proba: None, formed chunk by chunk from the targets)
    idx: torch.Tensor | None = None    # int64 y_i where valid, else 0 (safe to gather / scatter)
    proba: torch.Tensor | None = None  # (N, V) the caller's probabilities, never copied whole

    def __getitem__(self, sl) -> "RowTerms":
        def cut(t):
            return None if t is None else t[sl]
        return RowTerms(self.omega[sl], self.zeta[sl], self.coef_y[sl], cut(self.coef_u), cut(self.b_sum),
                        cut(self.idx), cut(self.proba))


def _mean_z_weights(zeta, omega, reduction):
    """``zeta`` for the 'mean' of ``'token'`` weighting: ``zeta sum omega / sum zeta`` (0 when either
    sum is 0), so that the one factor ``1 / sum omega`` averages the z term over ``sum zeta``."""
    if reduction != "mean":
        return zeta
    z_sum, o_sum = _sum64(zeta), _sum64(omega)
    ok = (z_sum > 0) & (o_sum > 0)
    ratio = torch.where(ok, o_sum / torch.where(ok, z_sum, torch.ones_like(z_sum)), torch.zeros_like(z_sum))
    return zeta * ratio.to(zeta.dtype)


def index_terms(target: torch.Tensor, num_classes: int, *, ignore_index: int, label_smoothing: float,
                sample_weight: torch.Tensor | None, class_weight: torch.Tensor | None,
                dtype: torch.dtype, z_loss_weighting: str = "class", reduction: str = "mean") -> RowTerms:
    """:class:`RowTerms` for flat targets ``(N,)`` (weights already flat and on the device)."""
    valid = target != ignore_index
    idx = torch.where(valid, target, 0).to(torch.int64)
    zero = torch.zeros((), dtype=dtype, device=target.device)
    s = None if sample_weight is None else sample_weight.to(dtype)
    s_valid = torch.where(valid, s if s is not None else torch.ones((), dtype=dtype, device=target.device),
                          zero).expand(target.shape)
    if class_weight is None:
        omega = s_valid.contiguous()
        w_sum = float(num_classes)
    else:
        cw = class_weight.to(dtype)
        wy = cw[idx]
        omega = torch.where(valid, wy if s is None else s * wy, zero)
        w_sum = cw.sum()
    zeta = omega if z_loss_weighting == "class" else _mean_z_weights(s_valid.contiguous(), omega, reduction)
    if num_classes == 1:
        # One class: h = 1 and lse = zhat, so the target term vanishes whatever B is; dropping it (rather
        # than forming b h - B, whose float sums need not cancel: -6e-8 with smoothing) gives an exact 0
        # loss and gradient, as PyTorch does (softxent.loss._coefficients).  The z-loss term remains.
        zeros = torch.zeros_like(omega)
        return RowTerms(omega, zeta, zeros, None, zeros, idx=idx)
    eps = float(label_smoothing)
    coef_y = omega * (1.0 - eps)
    coef_u = None
    b_sum = coef_y
    if eps > 0:
        coef_u = s_valid * (eps / num_classes)
        b_sum = coef_y + coef_u * w_sum
    return RowTerms(omega, zeta, coef_y, coef_u, b_sum, idx=idx)


def proba_terms(proba: torch.Tensor, *, label_smoothing: float, sample_weight: torch.Tensor | None,
                dtype: torch.dtype, num_classes: int | None = None) -> RowTerms:
    """:class:`RowTerms` for probability targets ``(N, V)`` (``b_sum`` left to :func:`proba_target_sums`).
    ``num_classes``: the ``V`` of ``eps / V`` when ``proba`` holds only some of the classes' columns (a
    vocabulary shard's); default ``proba.shape[1]``."""
    N = proba.shape[0]
    V = proba.shape[1] if num_classes is None else num_classes
    s = (torch.ones(N, dtype=dtype, device=proba.device) if sample_weight is None
         else sample_weight.to(dtype).contiguous())
    eps = float(label_smoothing)
    coef_u = s * (eps / V) if eps > 0 else None
    return RowTerms(s, s, s * (1.0 - eps), coef_u, None, proba=proba)


def target_terms(target: torch.Tensor, num_classes: int, *, ignore_index: int, label_smoothing: float,
                 reduction: str, z_loss_weighting: str, sample_weight: torch.Tensor | None,
                 class_weight: torch.Tensor | None, dtype: torch.dtype) -> RowTerms:
    """:class:`RowTerms` of flat targets: ``(N,)`` class indices or ``(N, V)`` probabilities."""
    if target.is_floating_point():
        return proba_terms(target, label_smoothing=label_smoothing, sample_weight=sample_weight, dtype=dtype,
                           num_classes=num_classes)
    return index_terms(target, num_classes, ignore_index=ignore_index, label_smoothing=label_smoothing,
                       sample_weight=sample_weight, class_weight=class_weight, dtype=dtype,
                       z_loss_weighting=z_loss_weighting, reduction=reduction)


def class_weighted(t: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor:
    """``t_ik w_k`` (``t`` itself without class weights)."""
    return t if class_weight is None else t * class_weight


def proba_target_sums(terms: RowTerms, pw: torch.Tensor, zhat: torch.Tensor,
                      w_sum, z_wsum: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b_i, lin_i)`` of a block of rows with probability targets, from ``pw = p w`` (``(R, V)``),
    the capped logits, ``sum_k w_k`` and ``z_wsum_i = sum_k w_k zhat_ik`` (needed with smoothing)."""
    return proba_target_sums_from(terms, *proba_row_sums(pw, zhat), w_sum, z_wsum)


def proba_row_sums(pw: torch.Tensor, zhat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_k p_ik w_k, sum_k p_ik w_k zhat_ik)`` of a block of rows from ``pw = p w``; a zero target
    weight drops its logit (``0 * -inf`` is not NaN).  Sums over disjoint column blocks add up (the
    vocabulary-parallel path sums the shards')."""
    pz = torch.where(pw == 0, torch.zeros((), dtype=zhat.dtype, device=zhat.device), pw * zhat).sum(dim=1)
    return pw.sum(dim=1), pz


def proba_target_sums_from(terms: RowTerms, p_w: torch.Tensor, pz: torch.Tensor, w_sum,
                           z_wsum: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b_i, lin_i)`` from the row sums ``p_w_i = sum_k p_ik w_k`` and ``pz_i = sum_k p_ik w_k zhat_ik``:
    ``b_i = coef_p_i p_w_i + coef_u_i sum_k w_k``, ``lin_i = coef_p_i pz_i + coef_u_i z_wsum_i``."""
    b = terms.coef_y * p_w
    lin = safe_mul(terms.coef_y, pz)
    if terms.coef_u is not None:
        b = b + terms.coef_u * w_sum
        lin = lin + safe_mul(terms.coef_u, z_wsum)
    return b, lin


def class_weighted_rowsum(proba: torch.Tensor, class_weight: torch.Tensor | None, cdt: torch.dtype,
                          block_bytes: int = 2**26) -> torch.Tensor:
    """``sum_k p_ik w_k`` in ``cdt``, over row blocks of ``block_bytes`` so that a ``p`` of another dtype
    is never converted whole."""
    N, V = proba.shape
    out = torch.empty(N, dtype=cdt, device=proba.device)
    R = max(1, block_bytes // max(1, V * 4))
    for i0 in range(0, N, R):
        out[i0:i0 + R] = class_weighted(proba[i0:i0 + R].to(cdt), class_weight).sum(dim=1)
    return out


def proba_target_weights(terms: RowTerms, pw: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor:
    """``B_ik = coef_p_i w_k p_ik + coef_u_i w_k`` for a block of rows, from ``pw = p w``."""
    B = pw * terms.coef_y[:, None]
    if terms.coef_u is not None:
        B = B + (terms.coef_u[:, None] if class_weight is None else terms.coef_u[:, None] * class_weight)
    return B


def safe_mul(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``coef * x`` with ``0 * (+-inf or NaN) = 0``: a zero weight means the term is absent."""
    return torch.where(coef == 0, torch.zeros((), dtype=x.dtype, device=x.device), coef * x)


def index_target_sum(terms: RowTerms, z_target: torch.Tensor, z_wsum: torch.Tensor | None) -> torch.Tensor:
    """``lin_i = sum_k B_ik zhat_ik`` for index targets, from ``zhat_{i,y_i}`` and ``sum_k w_k zhat_ik``."""
    lin = safe_mul(terms.coef_y, z_target)
    if terms.coef_u is not None:
        lin = lin + safe_mul(terms.coef_u, z_wsum)
    return lin


def z_term(terms: RowTerms, lse: torch.Tensor, z_loss: float) -> torch.Tensor:
    """The z-loss's per-row term ``z_loss zeta_i lse_i^2`` (0 where ``zeta_i = 0``)."""
    return safe_mul(terms.zeta * z_loss, lse * lse)


def row_loss(b_sum: torch.Tensor, lin: torch.Tensor, terms: RowTerms, lse: torch.Tensor,
             z_loss: float) -> torch.Tensor:
    """``loss_i = b_i lse_i - lin_i + z_loss zeta_i lse_i^2`` (module docstring)."""
    loss = safe_mul(b_sum, lse) - lin
    if z_loss > 0:
        loss = loss + z_term(terms, lse, z_loss)
    return loss


def softmax_coefficient(b_sum: torch.Tensor, zeta: torch.Tensor, lse: torch.Tensor,
                        z_loss: float) -> torch.Tensor:
    """``a_i = b_i + 2 z_loss zeta_i lse_i``: the factor in front of ``h_i`` in the gradient."""
    if z_loss > 0:
        return b_sum + safe_mul(zeta * (2.0 * z_loss), lse)
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

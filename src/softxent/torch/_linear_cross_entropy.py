"""``softxent.torch.linear_cross_entropy``: the output layer and the cross-entropy in one call, without
holding the ``N x V`` logits.

Semantics, as code (up to float32 rounding, and the mean over nothing being 0 instead of NaN)::

    z = (x @ weight.T + bias).float()                    # x (..., D), weight (V, D), bias (V,)
    if shift: z, target = z[..., :-shift, :], target[..., shift:]   # causal LM: token t predicts t+1
    loss = softxent.torch.cross_entropy(z, target, weight=class_weight, sample_weight=sample_weight,
                                        ignore_index=..., label_smoothing=..., z_loss=..., softcap=...,
                                        reduction=reduction, z_loss_weighting=...)
    if normalizer is not None: loss = loss_sum / normalizer   # reduction='sum' only (0 if it is 0)

and equal to PyTorch's ``F.linear_cross_entropy(x, weight, target, linear_bias=bias,
weight=class_weight, ...)`` (2.13) on every option the two share, index and probability targets
(tests/test_torch_interop.py runs its OpInfo samples).

Implementations (``impl``):

* ``'chunked'`` -- pure PyTorch, rows in chunks of at most ``max_chunk_bytes`` of float32 logits; any
  device (softxent.torch._chunked documents the schedule and the peak-memory formula).
* ``'triton'`` -- the Triton kernels of softxent.torch._triton_kernels: forward = blockwise products
  with an online log-sum-exp and the target logit (or the probability-weighted logit sum), no ``N x V``
  buffer; backward recomputes the logit
  blocks and forms delta in float32.  CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).
  ``skip_threshold`` opts into the kernels' block skip (approximate; exact by default).  ``dW`` is
  asked for in the weight's dtype: the kernels then write it once (rounded once) when one row
  super-block covers N, and otherwise accumulate it in float32 and cast once -- never a per-chunk
  rounding, and no ``V x D`` float32 buffer when it can be avoided.
* ``'torch'`` -- the plain materialising path (``F.linear`` in the input dtype, then
  softxent.torch.cross_entropy): the reference the others are checked against, and a baseline.
* ``'auto'`` -- ``'triton'`` for CUDA tensors when Triton and the kernels import, ``'chunked'`` otherwise.

Shapes and dtypes: ``x`` ``(..., D)`` and ``target`` ``(...)`` (integer class indices) or ``(..., V)``
(probabilities, any float dtype, read chunk by chunk or tile by tile, never copied whole); ``weight``
``(V, D)`` and ``bias`` ``(V,)`` in ``x``'s dtype (float16, bfloat16, float32 or float64; under
``torch.autocast`` all three are cast to the autocast dtype first, as ``F.linear`` would).  The math runs
in float32 (float64 for float64 inputs); the loss is float32 (float64); gradients come back in the
inputs' dtypes; only the inputs that require a gradient get one.  ``lse`` (``return_lse``) is
differentiable; the z-loss part and the accuracy are not.

Validation: shapes, dtypes, devices and options are checked up front; the values (class indices in
``[0, V)``, non-negative weights and normalizer) in one device-to-host read per call in eager mode (a
synchronisation on CUDA), skipped while torch.compile traces and during CUDA-graph capture.  No other
host synchronisation: the 'mean' denominator, the zero-weight case and the skip threshold are handled
on the device.
"""

from __future__ import annotations

import numbers
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _row_terms as rt
from . import _validation as val
from ._chunked import (DEFAULT_MAX_CHUNK_BYTES, ChunkConfig, ChunkedLinearCrossEntropy, autocast_off,
                       finish_forward, predicted_class_hits, recompute_state, row_terms)
from ._cross_entropy import _cross_entropy

_TRITON_STATE: dict = {}


def _triton_kernels():
    """The kernel module, imported on first use (Triton is optional)."""
    from . import _triton_kernels

    return _triton_kernels


def triton_available() -> bool:
    """Whether Triton and softxent's kernels import (cached; the failure is kept for the error of
    ``impl='triton'``)."""
    if "ok" not in _TRITON_STATE:
        try:
            _triton_kernels()
            _TRITON_STATE["ok"] = True
        # Not only ImportError: a Triton whose API moved fails while the kernels are decorated
        # (AttributeError, RuntimeError, ...), and impl='auto' must then still run (on 'chunked').
        except Exception as exc:
            _TRITON_STATE["ok"] = False
            _TRITON_STATE["error"] = f"{type(exc).__name__}: {exc}"
    return _TRITON_STATE["ok"]


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The implementation that runs: ``'auto'`` is ``'triton'`` for CUDA tensors of float16 / bfloat16 /
    float32 when Triton and the kernels import, ``'chunked'`` otherwise; ``'triton'`` is checked (device,
    an importable Triton, dtype) and refused with the reason."""
    if impl == "auto":
        return ("triton" if device.type == "cuda" and dtype != torch.float64 and triton_available()
                else "chunked")
    if impl == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for Triton's "
                             f"CPU interpreter); got tensors on {device}. Use impl='chunked' or 'auto'")
        if not triton_available():
            raise ValueError(f"impl='triton' needs the triton package and softxent's kernels (pip "
                             f"install 'softxent[triton]'), which failed to import "
                             f"({_TRITON_STATE['error']}); use impl='chunked' or 'auto'")
        if dtype == torch.float64:
            raise ValueError("impl='triton' takes float16, bfloat16 or float32 inputs; got float64 "
                             "(use impl='chunked')")
    return impl


@val.first_derivatives_only
class TritonLinearCrossEntropy(torch.autograd.Function):
    """The Triton path: same inputs and outputs as ChunkedLinearCrossEntropy (its ChunkConfig's fields in
    a dict, plus ``skip_threshold``).  Forward calls ``lce_forward`` (lse, the target logit or the
    probability-weighted logit sum, the weighted logit sum), the host turns them into losses; backward
    calls ``lce_backward`` with ``alpha = r a + g``, ``beta = r coef_y``, ``gamma = r coef_u``
    (softxent.torch._row_terms).  The gradient of probability targets is not computed here (the
    dispatcher sends a target that requires one to 'chunked')."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, sample_weight, class_weight, normalizer, cfg):
        ctx.set_materialize_grads(False)
        K = _triton_kernels()
        N, V = x.shape[0], weight.shape[0]
        cdt = torch.float32
        cw = None if class_weight is None else class_weight.to(cdt).contiguous()
        terms = row_terms(target, V, cfg, sample_weight, cw, cdt)
        proba = terms.proba is not None
        need_grad = cfg["need_dx"] or cfg["need_dw"] or (cfg["need_db"] and bias is not None)
        hit_class, counted = predicted_class_hits(terms, cfg["ignore_index"], target) \
            if cfg["want_correct"] else (None, None)
        # The kernels' index target: y (index targets), or for probability targets the class whose
        # logit the accuracy reads (argmax p), else nothing (every row "ignored" by the one-hot term).
        y = target if not proba else (hit_class if hit_class is not None else
                                      torch.full((N,), -1, dtype=torch.int64, device=x.device))
        with autocast_off(x.device.type):
            lse, z_t, z_ws, *extra = K.lce_forward(
                x, weight, bias, y, ignore_index=cfg["ignore_index"] if not proba else -1,
                softcap=cfg["softcap"], class_weight=cw, need_weighted_sum=terms.coef_u is not None,
                need_target_complement=need_grad and not proba, target_proba=target if proba else None,
                return_max=cfg["want_correct"])
        # 1 - p_y, summed without the target: the backward's target column keeps its digits on confident
        # tokens (an intermediate of this Function, so kept on ctx rather than save_for_backward)
        ctx.target_complement = extra.pop(0) if (need_grad and not proba) else None
        if proba:
            w_sum = float(V) if cw is None else cw.sum()
            p_w = rt.class_weighted_rowsum(target, cw, cdt)
            b_sum, lin = rt.proba_target_sums_from(terms, p_w, extra.pop(0), w_sum, z_ws)
        else:
            b_sum, lin = terms.b_sum, rt.index_target_sum(terms, z_t, z_ws)
        correct = torch.zeros(N if cfg["want_correct"] else 0, dtype=torch.bool, device=x.device)
        if cfg["want_correct"]:
            correct = (z_t == extra.pop(0)) & counted
        factor = rt.reduction_factor(cfg["reduction"], terms.omega, normalizer)
        ctx.cfg = cfg
        loss, z_part = finish_forward(ctx, terms, lse, b_sum, lin, factor, cfg["reduction"], cfg["z_loss"], cdt,
                                      (x, weight, bias, target if proba else terms.idx, cw) if need_grad else None)
        ctx.mark_non_differentiable(z_part, correct)
        return loss, lse, z_part, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_z_part, grad_correct):
        cfg = ctx.cfg
        st = recompute_state(ctx, grad_loss, grad_lse, cfg["reduction"])
        dx, dw, db = triton_gradients(
            st, None if st.target.is_floating_point() else st.target, ignore_index=cfg["ignore_index"],
            target_complement=ctx.target_complement, vocab_size=st.weight.shape[0], softcap=cfg["softcap"],
            need_dx=cfg["need_dx"], need_dw=cfg["need_dw"], need_db=cfg["need_db"],
            skip_threshold=cfg["skip_threshold"], workspace_bytes=cfg["max_chunk_bytes"])
        return dx, dw, db, None, None, None, None, None


def triton_gradients(st, y, *, ignore_index: int, target_complement, vocab_size: int, softcap, need_dx: bool,
                     need_dw: bool, need_db: bool, skip_threshold, workspace_bytes, dx_dtype=None):
    """``(dx, dW, db)`` (None where not needed; dW and db in the weight's and bias's dtypes) of the
    Triton backward for the scaled row coefficients ``st`` (softxent.torch._chunked.recompute_state):
    ``y`` the class indices (entries equal to ``ignore_index`` have no target column here; None for
    probability targets, read from ``st.target``), ``vocab_size`` the ``V`` of ``skip_threshold='auto'``
    (the whole vocabulary's, also on a shard), ``dx_dtype`` as in ``lce_backward``."""
    x, weight, bias = st.x, st.weight, st.bias
    proba = st.target.is_floating_point()
    N = x.shape[0]
    K = _triton_kernels()
    skip = skip_threshold
    if skip == "auto":
        skip = K.auto_skip_threshold(x.dtype, vocab_size)
    if skip is not None:
        # The kernels skip a tile when every |alpha_i p_ij| < t; relative to the largest row weight,
        # t = skip_threshold * max |alpha| means "every probability below skip_threshold" for
        # uniformly weighted rows (CCE's rule).  On the device: the kernel reads t, no host sync.
        skip = (skip * st.alpha.abs().amax()).reshape(1) if N else None
    if proba:
        y, ignore_index = torch.full((N,), -1, dtype=torch.int64, device=x.device), -1
    need_db = need_db and bias is not None
    with autocast_off(x.device.type):
        dx, dw, db = K.lce_backward(
            x, weight, bias, y, st.lse, st.alpha, st.beta, st.gamma,
            target_complement=target_complement, target_proba=st.target if proba else None,
            ignore_index=ignore_index, softcap=softcap, class_weight=st.class_weight, need_dx=need_dx,
            need_dw=need_dw, need_db=need_db, skip_threshold=skip, workspace_bytes=workspace_bytes,
            dw_dtype=weight.dtype, dx_dtype=dx_dtype)
    return (dx if need_dx else None,
            dw.to(weight.dtype) if (need_dw and dw is not None) else None,
            db.to(bias.dtype) if (need_db and db is not None) else None)


def _check_shift(shift) -> int:
    if isinstance(shift, bool):
        return int(shift)
    if isinstance(shift, numbers.Integral) and int(shift) >= 0:
        return int(shift)
    raise ValueError(f"shift must be a bool or an int >= 0 (positions between a hidden state and its "
                     f"target); got {shift!r}")


def check_call_options(*, reduction, label_smoothing, z_loss, softcap, ignore_index, impl, max_chunk_bytes,
                       skip_threshold, shift, return_lse, return_z_loss, return_accuracy,
                       z_loss_weighting) -> tuple[int, int]:
    """The checks of :func:`linear_cross_entropy`'s options that need no tensor (shared with the
    vocabulary-parallel path); returns ``(ignore_index, shift)`` as ints."""
    val.check_options(reduction, label_smoothing, z_loss, softcap)
    ignore_index = val.check_ignore_index(ignore_index)
    val.check_impl(impl)
    val.check_max_chunk_bytes(max_chunk_bytes)
    val.check_skip_threshold(skip_threshold, impl)
    k_shift = _check_shift(shift)
    for flag, name in ((return_lse, "return_lse"), (return_z_loss, "return_z_loss"),
                       (return_accuracy, "return_accuracy")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool; got {flag!r}")
    val.check_z_loss_weighting(z_loss_weighting)
    return ignore_index, k_shift


def linear_cross_entropy(x, weight, target, bias=None, *, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean", sample_weight=None,
                         class_weight=None, z_loss: float = 0.0, softcap: float | None = None,
                         normalizer=None, shift: bool | int = False, return_lse: bool = False,
                         impl: str = "auto", max_chunk_bytes: int | None = None,
                         skip_threshold: float | str | None = None, z_loss_weighting: str = "class",
                         return_z_loss: bool = False, return_accuracy: bool = False, process_group=None):
    """Cross-entropy of the linear layer ``z = x W^T + b`` without materialising ``z``.

    Args:
        x: hidden states ``(..., D)`` (leading dims such as ``(B, T)`` are flattened).
        weight: the output layer ``W`` ``(V, D)``, same dtype and device as ``x``.
        target: integer class indices of shape ``x.shape[:-1]``, or class probabilities (any floating
            dtype) of shape ``x.shape[:-1] + (V,)``: rows need not sum to 1 (as in PyTorch; the gradient
            is then ``h sum(p) - p``), entries must be >= 0 and not NaN.  Never copied whole; their
            gradient is returned when they require one (not by ``'triton'``: ``'auto'`` then picks
            ``'chunked'``).  ``ignore_index >= 0`` is refused with them, as by PyTorch; the 'mean'
            divides by ``sum_i s_i`` (N without sample weights), as PyTorch's.
        bias: ``(V,)`` or None.
        ignore_index: targets equal to it contribute nothing (may lie inside ``[0, V)``).
        label_smoothing: ``eps`` in [0, 1] (PyTorch's: the target becomes ``(1 - eps) y + eps / V``).
        reduction: ``'mean'`` (over the weights ``omega_i = s_i w_{y_i}`` of non-ignored rows; 0 when
            there are none), ``'sum'``, or ``'none'`` (per-token losses, shaped like the target).
        sample_weight: non-negative per-token weights shaped like ``target``.
        class_weight: non-negative per-class weights ``(V,)`` (``F.cross_entropy``'s ``weight``).
        z_loss: adds ``z_loss * lse^2`` per token (PaLM), weighted like the target.
        softcap: ``c > 0``: the logits become ``c tanh(z / c)`` (Gemma 2).
        normalizer: with ``reduction='sum'`` only: divide the sum by it (a number or a one-element
            tensor, e.g. the token count of all micro-batches / ranks: HF's ``num_items_in_batch``), so
            that gradients accumulated over micro-batches equal the full batch's.  0 gives 0.
        shift: ``True`` (or an int ``k >= 1``) for causal LMs: the hidden state at position ``t``
            predicts the target at ``t + k``.  Performs ``x = x[..., :-k, :]``,
            ``target = target[..., k:]`` (and the same on ``sample_weight``), so ``x`` needs a sequence
            axis ``(..., T, D)`` and the per-token losses of ``'none'`` have shape ``(..., T - k)``.
        return_lse: also return ``lse = logsumexp_k zhat_k`` per token (float32, shaped like the
            per-token losses), differentiable (``dlse/dzhat = softmax``): build your own z-loss or
            distillation term from it; its gradient joins the loss's in one backward (with
            ``reduction`` 'mean' / 'sum' on 'chunked', one more pass over recomputed logits, only when
            a gradient does reach lse).
        impl: ``'auto'``, ``'chunked'``, ``'triton'`` or ``'torch'`` (module docstring).
        max_chunk_bytes: bound on the scratch buffers: the ``'chunked'`` path's logit chunks (default
            64 MiB), the ``'triton'`` backward's workspace (default: the kernels' 96 MiB, so that
            its extra memory stays under 0.1 GiB; more trades memory for fewer re-reads of dx).
        skip_threshold: ``'triton'`` only, opt-in and approximate: ``'auto'`` or a number in (0, 1).
            The backward skips the dx/dW products of the tiles in which every probability is below the
            threshold (precisely: every ``|alpha_i| p_ij`` below ``skip_threshold * max_i |alpha_i|``,
            ``alpha_i`` the row's weight in the gradient) and that hold no target and no label
            smoothing, in a vocabulary sorted by average logit, and replaces each by its first-order
            part (the kernels' module docstring).  ``'auto'`` is ``eps(dtype) * min(1, 1024 / V)``: on
            trained-LM-like data at the Llama-3, Gemma-2 and 32k-vocabulary shapes it skipped 73-86 %
            of the tiles with dx and dW errors 0.48-0.96x naive PyTorch's bf16 errors (benchmarks/
            RESULTS.md); CCE's ``2**-7 / 32`` skips more at up to 1.4x naive's dx error.  Ignored by
            the exact ``'chunked'`` path that ``'auto'`` picks off CUDA.
        z_loss_weighting: ``'class'`` (default) weights each token's z term like its cross-entropy
            (``s_i w_{y_i}``) and the 'mean' divides both by ``sum_i s_i w_{y_i}``, so that
            ``'none'.sum() / sum omega == 'mean'`` and softxent.loss is the reference; ``'token'``
            reproduces PaLM / Liger (``lse_square_scale``): the z term left unweighted by class weights
            and averaged over the non-ignored tokens (``sum_i s_i``).  They differ only with class weights.
        return_z_loss: also return the z-loss part of the loss (reduced like it, detached; Liger's).
        return_accuracy: also return the token accuracy (no gradient): the fraction of non-ignored rows
            whose target logit is the row's maximum (ties count as hits), the target of a probability
            row being its largest probability; per token (1.0 / 0.0, 0.0 where ignored) for
            ``reduction='none'``.
        process_group: a torch.distributed group over which ``weight`` (and ``bias``, ``class_weight``)
            is split by vocabulary rows (tensor parallel): each rank passes its rows, ``x`` and class-index
            ``target`` (global ids) replicated, probability targets as this rank's columns (sharded like
            the weight's rows).  A DTensor weight sharded ``Shard(0)`` on a 1-D mesh does this over the
            mesh's group.  Every option works sharded.  See
            softxent.torch.vocab_parallel_linear_cross_entropy.

    Returns:
        the loss (float32; float64 for float64 inputs), or ``(loss, lse)`` with ``return_lse`` only, or
        with ``return_z_loss`` / ``return_accuracy`` a :class:`LinearCrossEntropyOutput`
        ``(loss, lse, z_loss, accuracy)`` holding None for what was not asked for.

    Raises:
        ValueError / TypeError naming the argument for bad shapes, dtypes, devices, options, class indices
        outside ``[0, V)`` (checked on the host in eager mode, skipped under torch.compile and CUDA-graph
        capture) and DTensor weights placed other than ``Shard(0)`` / ``Replicate()``; ``ValueError`` for
        ``impl='triton'`` without CUDA, without an importable Triton (naming the import error) or with
        float64.  A gradient taken with
        ``create_graph=True`` raises ``RuntimeError`` when differentiated again (no double backward).

    >>> import torch
    >>> x = torch.randn(2, 5, 8, requires_grad=True); W = torch.randn(11, 8, requires_grad=True)
    >>> y = torch.randint(0, 11, (2, 5))
    >>> loss = linear_cross_entropy(x, W, y, shift=True)
    >>> ref = torch.nn.functional.cross_entropy((x @ W.T)[:, :-1].reshape(-1, 11), y[:, 1:].reshape(-1))
    >>> bool(torch.allclose(loss, ref, atol=1e-5))
    True
    """
    if process_group is not None or val.is_dtensor(weight):  # vocabulary-parallel: its own module
        from ._vocab_parallel import vocab_parallel_linear_cross_entropy

        return vocab_parallel_linear_cross_entropy(
            x, weight, target, bias, process_group=process_group, ignore_index=ignore_index,
            label_smoothing=label_smoothing, reduction=reduction, sample_weight=sample_weight,
            class_weight=class_weight, z_loss=z_loss, softcap=softcap, normalizer=normalizer, shift=shift,
            return_lse=return_lse, impl=impl, max_chunk_bytes=max_chunk_bytes, skip_threshold=skip_threshold,
            z_loss_weighting=z_loss_weighting, return_z_loss=return_z_loss, return_accuracy=return_accuracy)
    ignore_index, k_shift = check_call_options(
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        ignore_index=ignore_index, impl=impl, max_chunk_bytes=max_chunk_bytes, skip_threshold=skip_threshold,
        shift=shift, return_lse=return_lse, return_z_loss=return_z_loss, return_accuracy=return_accuracy,
        z_loss_weighting=z_loss_weighting)
    val.check_float_tensor(x, "x")
    val.check_float_tensor(weight, "weight")
    if x.dim() < 1:
        raise ValueError(f"x must have shape (..., D); got a 0-d tensor")
    D = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"weight must have shape (V, D) with D = x.shape[-1] = {D}; got shape "
                         f"{tuple(weight.shape)}")
    V = weight.shape[0]
    if V == 0:
        raise ValueError(f"weight must have at least one class (row); got shape {tuple(weight.shape)}")
    if bias is not None:
        val.check_float_tensor(bias, "bias")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape (V,) = ({V},) to match weight {tuple(weight.shape)}; "
                             f"got shape {tuple(bias.shape)}")
    proba = val.check_target(target, tuple(x.shape[:-1]), V, ignore_index)
    val.check_same_device({"x": x, "weight": weight, "bias": bias, "target": target})
    dev = x.device
    x, weight, bias = val.autocast_and_check_dtypes(x, weight, bias)
    lead = tuple(x.shape[:-1])
    sw = val.check_weights_tensor(sample_weight, lead, "sample_weight", dev)
    cw = val.check_weights_tensor(class_weight, (V,), "class_weight", dev)
    norm = val.check_normalizer(normalizer, reduction, dev)
    if k_shift:
        if x.dim() < 2:
            raise ValueError(f"shift needs x with a sequence axis, shape (..., T, D); got shape "
                             f"{tuple(x.shape)}")
        T = x.shape[-2]
        if k_shift >= T:
            raise ValueError(f"shift must be in [0, T) for sequences of length T = {T}; got {shift!r}")
        x = x[..., : T - k_shift, :]
        # the sequence axis of the target: its last (indices) or the one before the classes (probabilities)
        target = target[..., k_shift:, :] if proba else target[..., k_shift:]
        sw = None if sw is None else sw[..., k_shift:]
    out_shape = tuple(x.shape[:-1])
    x2 = x.reshape(-1, D)
    t2 = target.reshape(-1, V) if proba else target.reshape(-1).to(torch.int64)
    sw2 = None if sw is None else sw.reshape(-1)
    weights = [("sample_weight", sw2), ("class_weight", cw)]
    val.check_values(target=None if proba else t2, num_classes=V, ignore_index=ignore_index,
                     weights=weights + ([("target probabilities", t2.detach())] if proba else []),
                     normalizer=norm)

    need_dp = proba and torch.is_grad_enabled() and t2.requires_grad
    impl = _resolve_impl("chunked" if (impl == "auto" and need_dp) else impl, dev, x.dtype)
    if impl == "triton" and need_dp:
        raise ValueError("impl='triton' does not differentiate probability targets, and target requires "
                         "grad; pass target.detach(), or use impl='chunked' (or 'auto')")
    if impl == "torch":
        z = F.linear(x2, weight, bias)
        loss, lse, z_part = _cross_entropy(
            z, t2, weight=cw, sample_weight=sw2, ignore_index=ignore_index, label_smoothing=label_smoothing,
            reduction=reduction, z_loss=z_loss, softcap=softcap, normalizer=norm,
            z_loss_weighting=z_loss_weighting)
        correct = _correct_rows(z.detach(), t2, ignore_index) if return_accuracy else None
    else:
        grad_on = torch.is_grad_enabled()
        need = dict(need_dx=grad_on and x2.requires_grad, need_dw=grad_on and weight.requires_grad,
                    need_db=grad_on and bias is not None and bias.requires_grad, need_dp=need_dp)
        sw2 = None if sw2 is None else sw2.detach()
        cw = None if cw is None else cw.detach()
        common = dict(ignore_index=ignore_index, label_smoothing=float(label_smoothing),
                      reduction=reduction, z_loss=float(z_loss),
                      softcap=None if softcap is None else float(softcap), z_loss_weighting=z_loss_weighting,
                      want_correct=return_accuracy)
        if impl == "triton":
            skip = skip_threshold if skip_threshold in (None, "auto") else float(skip_threshold)
            cfg = dict(common, skip_threshold=skip,
                       max_chunk_bytes=None if max_chunk_bytes is None else int(max_chunk_bytes), **need)
            t2 = t2 if not proba or V == 1 or t2.stride(1) == 1 else t2.contiguous()
            loss, lse, z_part, correct = TritonLinearCrossEntropy.apply(
                x2.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                t2.contiguous() if not proba else t2, sw2, cw, norm, cfg)
        else:
            cfg = ChunkConfig(max_chunk_bytes=DEFAULT_MAX_CHUNK_BYTES if max_chunk_bytes is None
                              else int(max_chunk_bytes), **common, **need)
            with autocast_off(dev.type):
                loss, lse, z_part, correct = ChunkedLinearCrossEntropy.apply(x2, weight, bias, t2, sw2, cw,
                                                                             norm, cfg)
    return package_outputs(loss, lse, z_part, correct, t2, ignore_index=ignore_index, reduction=reduction,
                           out_shape=out_shape, return_lse=return_lse, return_z_loss=return_z_loss,
                           return_accuracy=return_accuracy)


def package_outputs(loss, lse, z_part, correct, target, *, ignore_index: int, reduction: str,
                    out_shape: tuple, return_lse: bool, return_z_loss: bool, return_accuracy: bool):
    """What :func:`linear_cross_entropy` returns, from the flat ``(N,)`` results of an implementation
    (``target``: its flat class indices, or probability rows)."""
    if reduction == "none":
        loss, z_part = loss.reshape(out_shape), z_part.reshape(out_shape)
    lse = lse.reshape(out_shape)
    if not (return_z_loss or return_accuracy):
        return (loss, lse) if return_lse else loss
    accuracy = None
    if return_accuracy:
        accuracy = _accuracy(correct, target, target.is_floating_point(), ignore_index, reduction,
                             loss.dtype).reshape(out_shape if reduction == "none" else ())
    return LinearCrossEntropyOutput(loss, lse if return_lse else None, z_part if return_z_loss else None,
                                    accuracy)


class LinearCrossEntropyOutput(NamedTuple):
    """:func:`linear_cross_entropy`'s result with ``return_z_loss`` or ``return_accuracy``: the loss,
    then ``lse`` (differentiable), the z-loss part of the loss (detached) and the token accuracy (no
    gradient), each None unless asked for."""

    loss: torch.Tensor
    lse: torch.Tensor | None
    z_loss: torch.Tensor | None
    accuracy: torch.Tensor | None


def _correct_rows(z: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Whether each row's target logit (the largest probability's for probability targets) is the row's
    maximum (ties count), False where ignored: the 'torch' impl's, from its materialised logits."""
    if target.is_floating_point():
        return z.gather(1, target.argmax(dim=1, keepdim=True))[:, 0] == z.amax(dim=1)
    valid = target != ignore_index
    idx = torch.where(valid, target, 0)
    return (z.gather(1, idx[:, None])[:, 0] == z.amax(dim=1)) & valid


def _accuracy(correct, target, proba: bool, ignore_index: int, reduction: str, dtype) -> torch.Tensor:
    """Per-row hits (``'none'``) or their fraction over the counted (non-ignored) rows, 0 when none."""
    hits = correct.to(dtype)
    if reduction == "none":
        return hits
    counted = (torch.ones_like(hits) if proba else (target != ignore_index).to(dtype)).sum()
    return torch.where(counted > 0, hits.sum() / counted.clamp(min=1), torch.zeros_like(counted))

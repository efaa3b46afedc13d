"""Vocabulary-parallel (tensor-parallel) fused linear + cross-entropy on torch.distributed: the output
layer ``W`` ``(V, D)`` split by vocabulary rows across a process group, the logits never gathered.

Layout (P ranks; ``x`` and the targets replicated, each rank holding a contiguous block of vocabulary
rows ``[v_r, v_r + V_r)``, ``sum_r V_r = V``, the last block may be shorter or empty)::

              x (N, D), target (N,)  -- the same on every rank, targets are global ids in [0, V)
                 |               |               |
    rank 0: W[v_0 : v_1]    rank 1: W[v_1 : v_2]  ...  rank P-1: W[v_{P-1} : V]     (+ bias, class_weight)
                 |               |               |
    per row i:  lse_i^r = logsumexp_{k in shard r} zhat_ik,   zhat_{i,y_i} if y_i in shard r else 0,
                sum_{k in shard r} w_k zhat_ik (label smoothing),  w_{y_i} if y_i in shard r else 0
                 \\______________ all-reduce MAX of lse^r (N), then SUM of a (N, 2..4) buffer _____/
    lse_i = m_i + log sum_r exp(lse_i^r - m_i),  m_i = max_r lse_i^r;  the loss, identical on every rank

Backward: each rank forms its shard's columns of ``delta`` from the global ``lse`` and the global row
coefficients (softxent.torch._row_terms; no communication), ``dW_r = delta_r^T x``, ``db_r``, and a
partial ``dx_r = delta_r W_r``; ``dx = sum_r dx_r`` is one all-reduce of ``N x D``.  Nothing of size
``N x V_r`` ever crosses the group: forward sends ``N (1 + c)`` numbers (``c`` = 2 to 4 columns) plus one
small all-gather of per-rank facts, backward ``N D``.

Before any collective whose shapes depend on the input, every call all-gathers a few numbers per rank
(shard size, ``N``, ``D``, dtype, a hash of the options, the targets' range and checksum, the weights'
validity, and with ``SOFTXENT_CHECK_REPLICATED=1`` a checksum of ``x``), so that a bad input raises the
same ``ValueError`` on every rank instead of hanging a collective or giving silently wrong losses.  The
shards' offsets ``v_r`` are the prefix sums of the gathered sizes in rank order (or ``vocab_start``,
checked to tile ``[0, V)``).

The per-shard work is softxent.torch._chunked's (its logit chunks and its recomputing backward, run on
the shard with the global coefficients); the math is softxent.torch._row_terms's.  With
``sequence_parallel=True`` each rank holds a block of the rows of ``x``: they are all-gathered before the
above and ``dx`` is reduce-scattered instead of all-reduced.  A gradient reaching the returned ``lse``
joins each shard's ``alpha`` (softxent.torch._chunked's recompute).  Not yet: the Triton kernels on shards,
the gradients-in-forward schedule (backward recomputes the shard's logits: four products instead of three),
and of linear_cross_entropy's options probability targets, ``return_z_loss``, ``return_accuracy`` and
``z_loss_weighting='token'`` (refused with a ValueError naming them, on every rank).
"""

from __future__ import annotations

import math
import os
import types
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import _row_terms as rt
from . import _validation as val
from ._chunked import (DEFAULT_MAX_CHUNK_BYTES, ChunkConfig, ChunkedLinearCrossEntropy, _logit_chunks,
                       _Products, autocast_off, finish_forward)

CHECK_REPLICATED_ENV = "SOFTXENT_CHECK_REPLICATED"
"""Set to 1 to compare a checksum of ``x`` across the ranks on every call (a debugging aid: ``O(N D)``
reads; the targets' checksum is always compared)."""


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's rows sit in the vocabulary: ``[vocab_start, vocab_start + rows)`` of
    ``vocab_size`` classes, split over ``group``."""

    group: object
    vocab_start: int
    rows: int
    vocab_size: int


@dataclass(frozen=True)
class VocabParallelConfig:
    chunk: ChunkConfig
    shard: VocabShard
    reduce_dx: bool = True  # False under sequence parallelism: _GatherRows's backward reduce-scatters dx


# --------------------------------------------------------------------------------------------------
# the per-rank facts gathered before any other collective
# --------------------------------------------------------------------------------------------------
_FACTS = ("rows", "D", "N", "dtype", "options", "vocab_start", "target_min", "target_max",
          "target_checksum", "bad_weights", "x_checksum", "local_error")
_NO_TARGET_MIN, _NO_TARGET_MAX = 2.0**62, -(2.0**62)
_CHECKSUM_MOD = 2**31 - 1


def _target_facts(target: torch.Tensor, ignore_index: int):
    """(min, max, checksum) of the non-ignored targets: the checksum weights position i by i mod 1009
    + 1 and is taken mod 2^31 - 1 in int64, so it is exact in float64."""
    if target.numel() == 0:
        return torch.tensor([_NO_TARGET_MIN, _NO_TARGET_MAX, 0.0], dtype=torch.float64, device=target.device)
    valid = target != ignore_index
    big = torch.tensor(2**62, dtype=torch.int64, device=target.device)
    tmin = torch.where(valid, target, big).min()
    tmax = torch.where(valid, target, -big).max()
    pos = torch.arange(target.numel(), device=target.device) % 1009 + 1
    check = ((target % _CHECKSUM_MOD) * pos % _CHECKSUM_MOD).sum() % _CHECKSUM_MOD
    return torch.stack([tmin, tmax, check]).to(torch.float64)


def _bad_weights_code(sample_weight, class_weight, normalizer, device) -> torch.Tensor:
    """Bit 0: sample_weight, bit 1: class_weight, bit 2: normalizer not finite and >= 0."""
    code = torch.zeros((), dtype=torch.float64, device=device)
    for bit, w in enumerate((sample_weight, class_weight, normalizer)):
        if w is not None and w.numel():
            bad = (~((w >= 0) & torch.isfinite(w))).any() if w.is_floating_point() else (w < 0).any()
            code = code + bad.to(torch.float64) * 2**bit
    return code


def _x_checksum(x: torch.Tensor) -> torch.Tensor:
    """Two float64 sums of x (plain and position-weighted): equal on ranks holding the same x."""
    if not x.numel():
        return torch.zeros((), dtype=torch.float64, device=x.device)
    x64 = x.detach().to(torch.float64).reshape(-1)
    pos = torch.arange(x64.numel(), device=x.device, dtype=torch.float64) % 997 + 1
    return x64.sum() + (x64 * pos).sum() * math.pi


def _options_hash(options: tuple) -> float:
    return float(zlib.crc32(repr(options).encode()))


def _gather_facts(group, facts: torch.Tensor) -> list[dict]:
    """All-gather the per-rank facts (``len(_FACTS)`` float64 each); one dict per rank, in rank order."""
    P = dist.get_world_size(group)
    out = [torch.empty_like(facts) for _ in range(P)]
    dist.all_gather(out, facts, group=group)
    return [dict(zip(_FACTS, t.tolist())) for t in torch.stack(out).cpu()]


def _agree(per_rank: list[dict], key: str, what: str) -> None:
    values = [r[key] for r in per_rank]
    if len(set(values)) > 1:
        shown = ", ".join(f"rank {i}: {v:g}" for i, v in enumerate(values))
        raise ValueError(f"{what} must be the same on every rank of the process group; got {shown}")


def _shard_from_facts(per_rank: list[dict], rank: int, group, given_start) -> VocabShard:
    rows = [int(r["rows"]) for r in per_rank]
    V = sum(rows)
    if V == 0:
        raise ValueError(f"the weight shards hold no vocabulary row on any rank (shard sizes {rows})")
    starts = [int(r["vocab_start"]) for r in per_rank]
    if given_start is None:
        starts = [sum(rows[:i]) for i in range(len(rows))]
    else:
        if min(starts) < 0:
            raise ValueError(f"vocab_start must be given on every rank (an int >= 0) or on none; got "
                             f"{['missing' if s < 0 else s for s in starts]}")
        blocks = sorted((s, s + n) for s, n in zip(starts, rows) if n)
        edges = [0] + [e for _, e in blocks]
        if [s for s, _ in blocks] != edges[:-1] or edges[-1] != V:
            raise ValueError(f"the shards [vocab_start, vocab_start + rows) must tile [0, V) without gaps or "
                             f"overlaps, V = {V} (the sum of the shard sizes); got "
                             + ", ".join(f"rank {i}: [{s}, {s + n})" for i, (s, n) in
                                         enumerate(zip(starts, rows))))
    return VocabShard(group=group, vocab_start=starts[rank], rows=rows[rank], vocab_size=V)


def check_across_ranks(per_rank: list[dict], rank: int, *, ignore_index: int, sample_weight,
                       class_weight, normalizer, group, vocab_start) -> VocabShard:
    """Every check that needs the other ranks' facts; the same verdict (and message) on every rank."""
    _agree(per_rank, "D", "the hidden size D (x.shape[-1] = weight.shape[1])")
    _agree(per_rank, "N", "the number of rows of x and target (after shift)")
    _agree(per_rank, "dtype", "the dtype of x (index into float16, bfloat16, float32, float64)")
    _agree(per_rank, "options", "the call's options (reduction, ignore_index, label_smoothing, z_loss, "
                                "softcap, shift, which of bias / sample_weight / class_weight / normalizer "
                                "are given, which inputs require grad; shown hashed)")
    shard = _shard_from_facts(per_rank, rank, group, vocab_start)
    V = shard.vocab_size
    _agree(per_rank, "target_checksum", "target (replicated: the same global class ids on every rank; "
                                        "shown as a checksum)")
    if os.environ.get(CHECK_REPLICATED_ENV) == "1":
        _agree(per_rank, "x_checksum", f"x (replicated across the group; {CHECK_REPLICATED_ENV}=1 compares "
                                       "a float64 checksum)")
    lo, hi = min(r["target_min"] for r in per_rank), max(r["target_max"] for r in per_rank)
    if lo < 0 or hi >= V:
        value = int(lo) if lo < 0 else int(hi)
        raise ValueError(f"target holds class index {value}, outside [0, {V}) for V={V} classes (the "
                         f"vocabulary of all {len(per_rank)} shards) and not ignore_index={ignore_index}")
    codes = [int(r["bad_weights"]) for r in per_rank]
    if any(codes):
        names = ("sample_weight", "class_weight", "normalizer")
        if codes[rank]:  # this rank's own, detailed message
            val.check_values(weights=[("sample_weight", sample_weight), ("class_weight", class_weight)],
                             normalizer=normalizer)
        bad = [(i, [n for b, n in enumerate(names) if c >> b & 1]) for i, c in enumerate(codes) if c]
        raise ValueError("weights must be finite and >= 0; got other values on "
                         + "; ".join(f"rank {i} ({', '.join(n)})" for i, n in bad))
    return shard


# --------------------------------------------------------------------------------------------------
# the algorithm on one shard
# --------------------------------------------------------------------------------------------------
def local_targets(target: torch.Tensor, shard: VocabShard, ignore_index: int):
    """``(idx, is_local)``: the targets' rows in this shard (0 where the target lies elsewhere or is
    ignored: safe to gather) and whether the target lies in this shard."""
    rel = target - shard.vocab_start
    is_local = (target != ignore_index) & (rel >= 0) & (rel < shard.rows)
    return torch.where(is_local, rel, 0), is_local


def shard_row_stats(prod, x, idx, is_local, class_weight, n_rows, cfg: ChunkConfig, need_grad: bool,
                    weighted_sum: bool):
    """Over this shard's classes ``k``: ``lse_i^r = logsumexp_k zhat_ik`` (-inf for an empty shard),
    ``zhat_{i,y_i}`` where the target is local (else 0) and, when ``weighted_sum``, ``sum_k w_k zhat_ik``
    -- chunked like softxent.torch._chunked's forward (same chunks as its backward: bitwise the same z)."""
    N = x.shape[0]
    cdt = prod.cdt
    lse = torch.full((N,), -math.inf, dtype=cdt, device=x.device)
    z_t = torch.zeros(N, dtype=cdt, device=x.device)
    z_ws = torch.zeros(N, dtype=cdt, device=x.device) if weighted_sum else None
    if n_rows == 0:
        return lse, z_t, z_ws
    for i0, i1, _, zb, _ in _logit_chunks(prod, x, n_rows, cfg.softcap, need_grad, False,
                                          cfg.max_chunk_bytes):
        z_t[i0:i1] = zb.gather(1, idx[i0:i1, None])[:, 0]
        if z_ws is not None:
            z_ws[i0:i1] = zb.sum(dim=1) if class_weight is None else zb @ class_weight
        lse[i0:i1] = torch.logsumexp(zb, dim=1)
    return lse, torch.where(is_local, z_t, 0), z_ws


class _GatheredClassWeight:
    """What softxent.torch._row_terms.index_terms reads of a class weight -- ``w[y_i]`` per row and
    ``sum_k w_k`` -- assembled from the shards (each rank adds its own), so that the row coefficients
    come from their single home without the ``(V,)`` weight on any rank."""

    def __init__(self, w_target: torch.Tensor, w_sum: torch.Tensor):
        self.w_target, self.w_sum = w_target, w_sum

    def to(self, dtype):
        return _GatheredClassWeight(self.w_target.to(dtype), self.w_sum.to(dtype))

    def __getitem__(self, idx):  # index_terms asks for w[idx] with idx its (global) targets
        return self.w_target

    def sum(self):
        return self.w_sum


def combine_shards(group, lse_r, z_t, z_ws, w_target, w_sum):
    """The global row statistics from every shard's: ``lse = m + log sum_r exp(lse^r - m)`` (``m`` the
    all-reduced max) and the sums of the rest, in one all-reduce of ``N x (2..4) + 1`` numbers.  The
    results are bitwise the same on every rank."""
    N = lse_r.shape[0]
    m = lse_r.clone()
    if N:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    cols = [torch.exp(lse_r - m), z_t] + [c for c in (z_ws, w_target) if c is not None]
    tail = [] if w_sum is None else [w_sum.reshape(1).to(lse_r.dtype)]
    packed = torch.cat([torch.stack(cols, dim=1).reshape(-1)] + tail)
    if packed.numel():  # N = 0 without class weights: nothing to add (every rank agrees on N)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    cols_sum = packed[: N * len(cols)].reshape(N, len(cols)).unbind(1)
    lse = m + torch.log(cols_sum[0])
    z_t = cols_sum[1]
    rest = list(cols_sum[2:])
    z_ws = rest.pop(0) if z_ws is not None else None
    w_target = rest.pop(0) if w_target is not None else None
    w_sum = packed[-1] if w_sum is not None else None
    return lse, z_t.contiguous(), None if z_ws is None else z_ws.contiguous(), w_target, w_sum


@val.first_derivatives_only
class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Inputs: x ``(N, D)`` (replicated), this rank's weight rows ``(V_r, D)``, bias ``(V_r,)`` or None,
    global targets ``(N,)`` int64, sample weights ``(N,)`` or None, this rank's class weights
    ``(V_r,)`` or None, normalizer 0-d or None, :class:`VocabParallelConfig`.  Outputs: the loss (the
    same on every rank) and the global lse ``(N,)`` (differentiable: a gradient reaching it joins each
    shard's ``alpha``, as in softxent.torch._chunked; like the loss's, it must be the same on every rank).
    Gradients: ``dx`` (summed over the group), ``dW`` and ``db`` of this rank's rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, sample_weight, class_weight, normalizer, cfg):
        c, shard = cfg.chunk, cfg.shard
        cdt = val.compute_dtype(x.dtype)
        need_grad = c.need_dx or c.need_dw or (c.need_db and bias is not None)
        idx, is_local = local_targets(target, shard, c.ignore_index)
        cw = None if class_weight is None else class_weight.to(cdt)
        prod = _Products(x, weight, bias, cdt)
        lse_r, z_t, z_ws = shard_row_stats(prod, x, idx, is_local, cw, shard.rows, c, need_grad,
                                           c.label_smoothing > 0)
        w_target = w_sum = None
        if cw is not None:
            w_target = torch.where(is_local, cw[idx], 0) if shard.rows else torch.zeros_like(lse_r)
            w_sum = cw.sum()
        lse, z_t, z_ws, w_target, w_sum = combine_shards(shard.group, lse_r, z_t, z_ws, w_target, w_sum)
        terms = rt.index_terms(target, shard.vocab_size, ignore_index=c.ignore_index,
                               label_smoothing=c.label_smoothing, sample_weight=sample_weight,
                               class_weight=None if cw is None else _GatheredClassWeight(w_target, w_sum),
                               dtype=cdt, z_loss_weighting=c.z_loss_weighting, reduction=c.reduction)
        factor = rt.reduction_factor(c.reduction, terms.omega, normalizer)
        ctx.cfg = cfg
        # the target's column is in this shard only where is_local: backward zeroes coef_y elsewhere
        ctx.target_is_local = is_local
        loss, _ = finish_forward(ctx, terms, lse, terms.b_sum, rt.index_target_sum(terms, z_t, z_ws), factor,
                                 c.reduction, c.z_loss, cdt, (x, weight, bias, idx, cw) if need_grad else None)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        cfg = ctx.cfg
        c = cfg.chunk
        x, weight, bias, idx, cw, lse, a, coef_y, coef_u, factor = ctx.saved_tensors
        if cfg.shard.rows == 0:
            dx = torch.zeros_like(x) if c.need_dx else None
            dw = torch.zeros_like(weight) if c.need_dw else None
            db = torch.zeros_like(bias) if (c.need_db and bias is not None) else None
        else:
            # softxent.torch._chunked's recomputing backward, run on this shard with the global lse and
            # row coefficients (its delta formula, its chunks)
            shard_ctx = types.SimpleNamespace(
                cfg=c, grads_now=False,
                saved_tensors=(x, weight, bias, idx, cw, lse, a,
                               torch.where(ctx.target_is_local, coef_y, 0), coef_u, factor))
            with autocast_off(grad_loss.device.type):
                dx, dw, db, *_ = ChunkedLinearCrossEntropy._backward(shard_ctx, grad_loss, grad_lse)
        if dx is not None and cfg.reduce_dx:
            # summed in the compute dtype; the chunked backward has already rounded each rank's partial dx
            # to x's dtype, so a float16/bfloat16 dx is rounded P + 1 times (a float32 partial dx from the
            # chunked backward would make it once: left for the Triton/sharded work of issue 15)
            cdt = val.compute_dtype(x.dtype)
            dx_sum = dx if dx.dtype == cdt else dx.to(cdt)
            dist.all_reduce(dx_sum, op=dist.ReduceOp.SUM, group=cfg.shard.group)
            dx = dx_sum.to(x.dtype)
        return dx, dw, db, None, None, None, None, None


class _GatherRows(torch.autograd.Function):
    """Sequence parallelism: forward all-gathers every rank's rows of ``x`` (rank order), backward
    reduce-scatters the gradient (the sum over the ranks' partial ``dx``, each rank keeping its rows),
    summed in the compute dtype."""

    @staticmethod
    def forward(ctx, x_rows, group):
        ctx.group = group
        parts = [torch.empty_like(x_rows) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x_rows.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        P = dist.get_world_size(ctx.group)
        cdt = val.compute_dtype(grad.dtype)
        out = torch.empty(grad.shape[0] // P, grad.shape[1], dtype=cdt, device=grad.device)
        dist.reduce_scatter_tensor(out, grad.to(cdt).contiguous(), group=ctx.group)
        return out.to(grad.dtype), None


# --------------------------------------------------------------------------------------------------
# DTensor and the public entry point
# --------------------------------------------------------------------------------------------------
def _dtensor_types():
    from torch.distributed.tensor import Replicate, Shard

    return Replicate, Shard


def _unwrap_replicated(t, name: str):
    """A DTensor argument other than the weight must be replicated; its local tensor is the whole."""
    if not val.is_dtensor(t):
        return t
    Replicate, _ = _dtensor_types()
    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Replicate(),):
        raise ValueError(f"{name} is a torch.distributed DTensor with placements {tuple(t.placements)} on "
                         f"a {t.device_mesh.ndim}-D mesh; softxent.torch needs it replicated "
                         f"(Replicate() on a 1-D mesh) or a plain tensor")
    return t.to_local()


def _unwrap_sharded(t, name: str, placements):
    """bias / class_weight next to a Shard(0) weight: Shard(0) too (or already this rank's rows)."""
    if not val.is_dtensor(t):
        return t
    if tuple(t.placements) != placements:
        raise ValueError(f"{name} is a DTensor with placements {tuple(t.placements)}; next to a weight "
                         f"sharded {placements} it must be sharded the same way")
    return t.to_local()


def unwrap_dtensor_weight(weight, process_group):
    """``(local weight, group)`` for a DTensor weight: ``Shard(0)`` on a 1-D mesh is vocabulary-parallel
    over the mesh's group; ``Replicate()`` is the whole weight (group None: the plain path)."""
    Replicate, Shard = _dtensor_types()
    placements = tuple(weight.placements)
    mesh = weight.device_mesh
    if mesh.ndim == 1 and placements == (Shard(0),):
        group = mesh.get_group()
        if process_group is not None and process_group is not group:
            raise ValueError("weight is a DTensor sharded Shard(0) over its mesh's process group, and a "
                             "different process_group was given; pass process_group=None (the mesh's "
                             "group is used) or a plain local shard")
        return weight.to_local(), group
    if mesh.ndim == 1 and placements == (Replicate(),):
        if process_group is not None:
            raise ValueError("weight is a Replicate() DTensor (the whole vocabulary on every rank), and "
                             "process_group asks for vocabulary shards; pass process_group=None, or the "
                             "rank's rows (or a Shard(0) DTensor)")
        return weight.to_local(), None
    raise ValueError(
        f"weight is a torch.distributed DTensor with placements {placements} on a {mesh.ndim}-D mesh "
        f"(global shape {tuple(weight.shape)}); softxent.torch takes Shard(0) (vocabulary-parallel: "
        "rows of the vocabulary split across the group, as ColwiseParallel shards an LM head) or "
        "Replicate() on a 1-D mesh. Redistribute it (weight.redistribute(mesh, [Shard(0)])) or gather "
        "it (weight.full_tensor())")


def vocab_parallel_linear_cross_entropy(x, weight, target, bias=None, *, process_group=None,
                                        vocab_start: int | None = None, ignore_index: int = -100,
                                        label_smoothing: float = 0.0, reduction: str = "mean",
                                        sample_weight=None, class_weight=None, z_loss: float = 0.0,
                                        softcap: float | None = None, normalizer=None,
                                        shift: bool | int = False, return_lse: bool = False,
                                        impl: str = "auto", max_chunk_bytes: int | None = None,
                                        skip_threshold=None, sequence_parallel: bool = False,
                                        z_loss_weighting: str = "class", return_z_loss: bool = False,
                                        return_accuracy: bool = False):
    """:func:`softxent.torch.linear_cross_entropy` of a vocabulary-sharded output layer (module docstring).

    Each rank of ``process_group`` passes the same ``x`` ``(..., D)``, ``target`` (global class ids in
    ``[0, V)``), ``sample_weight`` and ``normalizer``, and its own rows ``weight`` ``(V_r, D)`` (with
    ``bias`` ``(V_r,)`` and ``class_weight`` ``(V_r,)`` sharded alike) of the vocabulary ``V = sum_r V_r``,
    at offset ``vocab_start`` (default: the sum of the lower ranks' ``V_r``).  ``process_group`` None
    means the default (world) group, except for a DTensor weight.  The result is the unsharded
    call's on the full ``W``, bitwise the same on every rank; label smoothing spreads ``eps / V`` over
    the global ``V``.  ``weight`` may instead be a DTensor: ``Shard(0)`` on a 1-D mesh (its mesh's group),
    or ``Replicate()`` (the plain, unsharded path).  Gradients: ``dx`` summed over the group (the same on
    every rank), ``dW`` / ``db`` of this rank's rows.

    Communication per call: one all-gather of 12 numbers per rank (checks), two all-reduces of
    ``N`` and ``N c + 1`` numbers (``c`` in 2..4), and in backward one all-reduce of ``dx`` (``N x D``).

    ``sequence_parallel=True`` (Megatron's sequence parallelism): ``x`` holds this rank's block of
    ``N / P`` rows of the hidden states (rank order) and ``target`` / ``sample_weight`` all ``N`` rows
    (replicated, already shifted: ``shift`` is refused); ``x``'s rows are all-gathered (``N x D``) and
    ``dx`` is reduce-scattered back to them instead of all-reduced.

    ``impl``: ``'auto'`` and ``'chunked'`` run the chunked path on each shard (``'triton'`` and
    ``'torch'`` are not available sharded yet and raise).  Not available sharded yet either, and refused
    with a ``ValueError`` naming them: probability targets, ``return_z_loss``, ``return_accuracy`` and
    ``z_loss_weighting='token'`` (a ``Replicate()`` DTensor weight takes the plain path, which has them).
    """
    from ._linear_cross_entropy import linear_cross_entropy

    group = process_group
    if val.is_dtensor(weight):
        weight, group = unwrap_dtensor_weight(weight, process_group)
        if group is None:  # Replicate(): the plain path on the local (whole) weight
            return linear_cross_entropy(
                _unwrap_replicated(x, "x"), weight, _unwrap_replicated(target, "target"),
                _unwrap_replicated(bias, "bias"), ignore_index=ignore_index,
                label_smoothing=label_smoothing, reduction=reduction,
                sample_weight=_unwrap_replicated(sample_weight, "sample_weight"),
                class_weight=_unwrap_replicated(class_weight, "class_weight"), z_loss=z_loss,
                softcap=softcap, normalizer=normalizer, shift=shift, return_lse=return_lse, impl=impl,
                max_chunk_bytes=max_chunk_bytes, skip_threshold=skip_threshold,
                z_loss_weighting=z_loss_weighting, return_z_loss=return_z_loss,
                return_accuracy=return_accuracy)
        _, Shard = _dtensor_types()
        bias = _unwrap_sharded(bias, "bias", (Shard(0),))
        class_weight = _unwrap_sharded(class_weight, "class_weight", (Shard(0),))
    x, target = _unwrap_replicated(x, "x"), _unwrap_replicated(target, "target")
    sample_weight = _unwrap_replicated(sample_weight, "sample_weight")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group needs an initialised torch.distributed (init_process_group)")
    facts_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")

    # This rank's own checks; a failure still joins the gather below (then raises), so that the other
    # ranks raise too instead of waiting in a collective.
    try:
        p = _prepare_local(x, weight, target, bias, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction, sample_weight=sample_weight,
                           class_weight=class_weight, z_loss=z_loss, softcap=softcap, normalizer=normalizer,
                           shift=shift, return_lse=return_lse, impl=impl, max_chunk_bytes=max_chunk_bytes,
                           skip_threshold=skip_threshold, vocab_start=vocab_start,
                           sequence_parallel=sequence_parallel, world=dist.get_world_size(group),
                           z_loss_weighting=z_loss_weighting, return_z_loss=return_z_loss,
                           return_accuracy=return_accuracy)
        local_error = None
        facts = _local_facts(p, vocab_start, check_x=not sequence_parallel).to(facts_device)
    except (ValueError, TypeError) as exc:
        local_error = exc
        facts = torch.zeros(len(_FACTS), dtype=torch.float64, device=facts_device)
        facts[_FACTS.index("local_error")] = 1

    per_rank = _gather_facts(group, facts)
    if local_error is not None:
        raise local_error
    failed = [i for i, r in enumerate(per_rank) if r["local_error"]]
    if failed:
        raise ValueError(f"rank(s) {failed} of the process group refused their inputs (their own error "
                         "says why); every rank raises instead of waiting in a collective")
    shard = check_across_ranks(per_rank, dist.get_rank(group), ignore_index=p.ignore_index,
                               sample_weight=p.sample_weight, class_weight=p.class_weight,
                               normalizer=p.normalizer, group=group, vocab_start=vocab_start)

    common = dict(ignore_index=p.ignore_index, label_smoothing=float(label_smoothing), reduction=reduction,
                  z_loss=float(z_loss), softcap=None if softcap is None else float(softcap))
    x2, weight, bias = p.x, p.weight, p.bias
    if sequence_parallel:
        x2 = _GatherRows.apply(x2, group)
    cfg = VocabParallelConfig(ChunkConfig(max_chunk_bytes=DEFAULT_MAX_CHUNK_BYTES if max_chunk_bytes is None
                                          else int(max_chunk_bytes), **common, **p.need), shard,
                              reduce_dx=not sequence_parallel)
    with autocast_off(x2.device.type):
        loss, lse = VocabParallelLinearCrossEntropy.apply(x2, weight, bias, p.target, p.sample_weight,
                                                          p.class_weight, p.normalizer, cfg)
    if reduction == "none":
        loss = loss.reshape(p.out_shape)
    return (loss, lse.reshape(p.out_shape)) if return_lse else loss


def _prepare_local(x, weight, target, bias, *, ignore_index, label_smoothing, reduction, sample_weight,
                   class_weight, z_loss, softcap, normalizer, shift, return_lse, impl, max_chunk_bytes,
                   skip_threshold, vocab_start, sequence_parallel, world, z_loss_weighting, return_z_loss,
                   return_accuracy) -> types.SimpleNamespace:
    """The checks that need no other rank (messages as softxent.torch.linear_cross_entropy's, the shapes
    of weight, bias and class_weight being this rank's ``V_r`` rows), and the flat inputs: ``x`` ``(N,
    D)``, ``target`` ``(N,)`` int64, ``sample_weight``, ``class_weight``, ``normalizer``, ``out_shape``,
    ``need`` (which gradients), ``options`` (what every rank must agree on)."""
    from ._linear_cross_entropy import check_call_options

    ignore_index, k_shift = check_call_options(
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        ignore_index=ignore_index, impl=impl, max_chunk_bytes=max_chunk_bytes, skip_threshold=skip_threshold,
        shift=shift, return_lse=return_lse, return_z_loss=return_z_loss, return_accuracy=return_accuracy,
        z_loss_weighting=z_loss_weighting)
    if impl not in ("auto", "chunked"):
        raise ValueError(f"impl={impl!r} is not available with a vocabulary-sharded weight yet; use "
                         "impl='chunked' or 'auto'")
    _refuse_unsharded_options(target, return_z_loss=return_z_loss, return_accuracy=return_accuracy,
                              z_loss_weighting=z_loss_weighting)
    if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)
                                    or vocab_start < 0):
        raise ValueError(f"vocab_start must be None or an int >= 0 (this shard's first vocabulary row); "
                         f"got {vocab_start!r}")
    for t, name in ((x, "x"), (weight, "weight (this rank's shard)"), (bias, "bias (this rank's shard)")):
        if t is not None:
            val.check_float_tensor(t, name)
    D = x.shape[-1] if x.dim() else None
    V_r = weight.shape[0]
    expected = {"weight": ((V_r, D), weight), "bias": ((V_r,), bias)}
    for name, (shape, t) in expected.items():
        if t is not None and (D is None or tuple(t.shape) != shape):
            raise ValueError(f"{name} (this rank's shard) must have shape {shape} (V_r rows of the "
                             f"vocabulary, D = x.shape[-1]); got {tuple(t.shape)} with x {tuple(x.shape)}")
    val.check_index_target(target)
    val.check_same_device({"x": x, "weight": weight, "bias": bias, "target": target})
    x, weight, bias = val.autocast_and_check_dtypes(x, weight, bias)
    if not isinstance(sequence_parallel, bool):
        raise TypeError(f"sequence_parallel must be a bool; got {sequence_parallel!r}")
    if sequence_parallel:
        n_rows = x.reshape(-1, D).shape[0]
        if k_shift:
            raise ValueError("shift is not available with sequence_parallel=True (a shard's last position "
                             "predicts the next shard's first token): pass targets already shifted")
        if target.numel() != world * n_rows:
            raise ValueError(f"with sequence_parallel=True, x holds this rank's {n_rows} rows of the hidden "
                             f"states and target all P x {n_rows} = {world * n_rows} rows (P = {world}); "
                             f"got target of shape {tuple(target.shape)}")
        lead = tuple(target.shape)
    else:
        lead = tuple(x.shape[:-1])
        if tuple(target.shape) != lead:
            raise ValueError(f"target must have shape x.shape[:-1] = {lead}; got shape {tuple(target.shape)}")
    sw = val.check_weights_tensor(sample_weight, lead, "sample_weight", x.device)
    cw = val.check_weights_tensor(class_weight, (V_r,), "class_weight (this rank's shard)", x.device)
    norm = val.check_normalizer(normalizer, reduction, x.device)
    if k_shift:
        if x.dim() < 2 or k_shift >= x.shape[-2]:
            raise ValueError(f"shift needs x of shape (..., T, D) with shift in [0, T); got shift={shift!r}, "
                             f"x {tuple(x.shape)}")
        T = x.shape[-2]
        x, target = x[..., : T - k_shift, :], target[..., k_shift:]
        sw = None if sw is None else sw[..., k_shift:]
    x2 = x.reshape(-1, D)
    grad_on = torch.is_grad_enabled()
    need = dict(need_dx=grad_on and x2.requires_grad, need_dw=grad_on and weight.requires_grad,
                need_db=grad_on and bias is not None and bias.requires_grad)
    options = (reduction, ignore_index, float(label_smoothing), float(z_loss), softcap, k_shift,
               bias is not None, sw is not None, cw is not None, norm is not None, need["need_dx"],
               sequence_parallel)
    return types.SimpleNamespace(
        x=x2, weight=weight, bias=bias, target=target.reshape(-1).to(torch.int64),
        sample_weight=None if sw is None else sw.reshape(-1).detach(),
        class_weight=None if cw is None else cw.detach(), normalizer=norm, out_shape=tuple(target.shape),
        need=need, options=options, ignore_index=ignore_index)


def _refuse_unsharded_options(target, *, return_z_loss, return_accuracy, z_loss_weighting) -> None:
    """The options of softxent.torch.linear_cross_entropy that the sharded path does not implement yet:
    a ``ValueError`` naming the option (raised on every rank: it joins the gather of facts)."""
    refused = []
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        refused.append("probability targets (a floating target)")
    if return_z_loss:
        refused.append("return_z_loss=True")
    if return_accuracy:
        refused.append("return_accuracy=True")
    if z_loss_weighting != "class":
        refused.append(f"z_loss_weighting={z_loss_weighting!r}")
    if refused:
        raise ValueError(f"{', '.join(refused)} not available with a vocabulary-sharded weight "
                         "(process_group or a Shard(0) DTensor) yet; pass class-index targets, "
                         "return_z_loss=False, return_accuracy=False, z_loss_weighting='class'")


def _local_facts(p, vocab_start, check_x: bool) -> torch.Tensor:
    """This rank's row of the gathered facts (``_FACTS``), float64 on the inputs' device."""
    dev = p.x.device
    head = torch.tensor([p.weight.shape[0], p.x.shape[1], p.x.shape[0], val.FLOAT_DTYPES.index(p.x.dtype),
                         _options_hash(p.options), -1 if vocab_start is None else vocab_start],
                        dtype=torch.float64, device=dev)
    x_check = (_x_checksum(p.x) if check_x and os.environ.get(CHECK_REPLICATED_ENV) == "1"
               else torch.zeros((), dtype=torch.float64, device=dev))
    return torch.cat([head, _target_facts(p.target, p.ignore_index),
                      _bad_weights_code(p.sample_weight, p.class_weight, p.normalizer, dev).reshape(1),
                      x_check.reshape(1), torch.zeros(1, dtype=torch.float64, device=dev)])

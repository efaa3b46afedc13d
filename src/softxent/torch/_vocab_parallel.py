"""Vocabulary-parallel (tensor-parallel) fused linear + cross-entropy on torch.distributed: the output
layer ``W`` ``(V, D)`` split by vocabulary rows across a process group, the logits never gathered.

Layout (P ranks; ``x`` and class-index targets replicated, each rank holding a contiguous block of
vocabulary rows ``[v_r, v_r + V_r)``, ``sum_r V_r = V``, the last block may be shorter or empty; a
probability target is split by columns like ``W`` by rows)::

         x (N, D), target (N,): the same on every rank (global ids in [0, V));  or target P (N, V) by columns
                 |                    |                          |
    rank 0: W[v_0 : v_1]      rank 1: W[v_1 : v_2]   ...   rank P-1: W[v_{P-1} : V]   (+ bias, class_weight,
                 |                    |                          |                      P[:, v_r : v_{r+1}])
    per row i, over the shard's classes k (chunked logits, or the Triton forward kernel):
       m_i^r = max_k zhat_ik,  s_i^r = sum_k exp(zhat_ik - m_i^r);  zhat_{i,y_i} and w_{y_i} where y_i
       lies in the shard, else 0;  sum_k w_k zhat_ik (smoothing);  sum_k p_ik w_k, sum_k p_ik w_k zhat_ik
       (probabilities);  q_i^r = 1 - p_{i,y_i} within the shard (Triton, with a gradient)
                 \\___ all-reduce MAX of m^r (N), then one SUM (N x 2..5 [+ 1]); never N x V_r ___/
    lse_i = log sum_r s_i^r exp(m_i^r - m_i) + m_i,  m_i = max_r m_i^r (the unsharded forward's formula);
    the loss, identical on every rank
    backward: delta on the shard's columns from the global lse and row coefficients (no communication)
       -> dW_r, db_r (and the shard's dP); partial dx_r in float32 (float64):
          all-reduce SUM (N x D), rounded once

Backward: each rank forms its shard's columns of ``delta`` from the global ``lse`` and the global row
coefficients (softxent.torch._row_terms; no communication), ``dW_r = delta_r^T x``, ``db_r``, and a
partial ``dx_r = delta_r W_r`` kept in the compute dtype; ``dx = sum_r dx_r`` is one all-reduce of
``N x D``, rounded to x's dtype once (a bfloat16 dx is rounded once, not once per rank and again).
Nothing of size ``N x V_r`` ever crosses the group: forward sends ``N (1 + c)`` numbers (``c`` = 2 to 5
columns), plus one small all-gather of per-rank facts, plus, for the accuracy of probability targets,
``2 N`` for the most probable class (the lowest global id among ties, as ``torch.argmax``); backward
``N D``.

Before any collective whose shapes depend on the input, every call all-gathers a few numbers per rank
(shard size, ``N``, ``D``, dtype, a hash of the options -- the implementation that runs included --, the
targets' range and checksum, the sample weights' checksum, the normalizer, the weights' and
probabilities' validity, and with
``SOFTXENT_CHECK_REPLICATED=1`` a checksum of ``x``), so that a bad input raises the same ``ValueError``
on every rank instead of hanging a collective or giving silently wrong losses.  The shards' offsets
``v_r`` are the prefix sums of the gathered sizes in rank order (or ``vocab_start``, checked to tile
``[0, V)``).

The per-shard work is softxent.torch._chunked's (its logit chunks and its recomputing backward) or, with
``impl='triton'`` (``'auto'`` on CUDA), softxent.torch._triton_kernels' (``lce_forward`` on the shard with
the targets as shard rows, ``lce_backward`` with the global lse and coefficients and a float32 dx), run on
the shard with the global coefficients; the math is softxent.torch._row_terms's.  With
``sequence_parallel=True`` each rank holds a block of the rows of ``x``: they are all-gathered before the
above and ``dx`` is reduce-scattered instead of all-reduced.  A gradient reaching the returned ``lse``
joins each shard's ``alpha``.  Not yet: the chunked gradients-in-forward schedule (backward recomputes
the shard's logits: four products instead of three).
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
from ._chunked import (DEFAULT_MAX_CHUNK_BYTES, ChunkConfig, _logit_chunks, _Products, _recomputed_gradients,
                       autocast_off, finish_forward, recompute_state)

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
    """The options (``chunk``: also the Triton path's), the shard, which implementation runs on it
    (``'chunked'`` or ``'triton'``), sequence parallelism, and the Triton backward's ``skip_threshold``
    and workspace bound (None: the kernels' default)."""

    chunk: ChunkConfig
    shard: VocabShard
    impl: str = "chunked"
    sequence_parallel: bool = False
    skip_threshold: float | str | None = None
    workspace_bytes: int | None = None


# --------------------------------------------------------------------------------------------------
# the per-rank facts gathered before any other collective
# --------------------------------------------------------------------------------------------------
_FACTS = ("rows", "D", "N", "dtype", "options", "vocab_start", "target_min", "target_max",
          "target_checksum", "bad_weights", "x_checksum", "sample_weight_checksum", "normalizer", "local_error")
_NO_TARGET_MIN, _NO_TARGET_MAX = 2.0**62, -(2.0**62)
_CHECKSUM_MOD = 2**31 - 1


def _target_facts(target: torch.Tensor, ignore_index: int):
    """(min, max, checksum) of the non-ignored targets: the checksum weights position i by i mod 1009
    + 1 and is taken mod 2^31 - 1 in int64, so it is exact in float64."""
    if target.numel() == 0 or target.is_floating_point():  # probabilities: each rank holds other columns
        return torch.tensor([_NO_TARGET_MIN, _NO_TARGET_MAX, 0.0], dtype=torch.float64, device=target.device)
    valid = target != ignore_index
    big = torch.tensor(2**62, dtype=torch.int64, device=target.device)
    tmin = torch.where(valid, target, big).min()
    tmax = torch.where(valid, target, -big).max()
    pos = torch.arange(target.numel(), device=target.device) % 1009 + 1
    check = ((target % _CHECKSUM_MOD) * pos % _CHECKSUM_MOD).sum() % _CHECKSUM_MOD
    return torch.stack([tmin, tmax, check]).to(torch.float64)


_WEIGHT_NAMES = ("sample_weight", "class_weight", "normalizer", "target probabilities")


def _bad_weights_code(sample_weight, class_weight, normalizer, proba, device) -> torch.Tensor:
    """Bit b set where ``_WEIGHT_NAMES[b]`` holds a value that is not finite and >= 0 (O(1) memory:
    amin / amax propagate NaN, so no mask as large as the probabilities is formed)."""
    code = torch.zeros((), dtype=torch.float64, device=device)
    for bit, w in enumerate((sample_weight, class_weight, normalizer, proba)):
        if w is not None and w.numel():
            if w.is_floating_point():
                lo, hi = torch.aminmax(w.reshape(-1))
                bad = ~((lo >= 0) & torch.isfinite(hi))
            else:
                bad = (w < 0).any()
            code = code + bad.to(torch.float64) * 2**bit
    return code


def _float_checksum(x: torch.Tensor) -> torch.Tensor:
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
                       class_weight, normalizer, proba, group, vocab_start) -> VocabShard:
    """Every check that needs the other ranks' facts; the same verdict (and message) on every rank."""
    _agree(per_rank, "D", "the hidden size D (x.shape[-1] = weight.shape[1])")
    _agree(per_rank, "N", "the number of rows of x and target (after shift)")
    _agree(per_rank, "dtype", "the dtype of x (index into float16, bfloat16, float32, float64)")
    _agree(per_rank, "options", "the call's options (reduction, ignore_index, label_smoothing, z_loss, "
                                "softcap, shift, which of bias / sample_weight / class_weight / normalizer "
                                "are given, which inputs require grad, index or probability targets, "
                                "z_loss_weighting, return_accuracy, the implementation that runs; shown "
                                "hashed)")
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
        if codes[rank]:  # this rank's own, detailed message
            val.check_values(weights=[("sample_weight", sample_weight), ("class_weight", class_weight),
                                      ("target probabilities", proba)], normalizer=normalizer)
        bad = [(i, [n for b, n in enumerate(_WEIGHT_NAMES) if c >> b & 1]) for i, c in enumerate(codes) if c]
        raise ValueError("weights must be finite and >= 0; got other values on "
                         + "; ".join(f"rank {i} ({', '.join(n)})" for i, n in bad))
    # after the values' check: a NaN would differ from itself
    _agree(per_rank, "sample_weight_checksum", "sample_weight (replicated, like the targets; shown as a "
                                               "checksum)")
    _agree(per_rank, "normalizer", "normalizer")
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


def global_argmax(proba: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Each row's most probable class over the whole vocabulary (global ids; the lowest among ties, as
    ``torch.argmax`` of the unsharded rows), from this rank's columns ``proba`` ``(N, V_r)``: one MAX
    all-reduce of the rows' largest probability and one MIN all-reduce of the candidates' ids, ``N``
    numbers each."""
    N = proba.shape[0]
    if shard.rows:
        p_max, arg = proba.max(dim=1)  # the first maximal column of the shard
        p_max = p_max.to(torch.float64)  # exact for every float dtype
    else:
        p_max = torch.full((N,), -math.inf, dtype=torch.float64, device=proba.device)
        arg = torch.zeros(N, dtype=torch.int64, device=proba.device)
    g_max = p_max.clone()
    if N:
        dist.all_reduce(g_max, op=dist.ReduceOp.MAX, group=shard.group)
    cand = torch.where(p_max == g_max, arg + shard.vocab_start, shard.vocab_size)
    if N:
        dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=shard.group)
    return cand


def chunked_shard_stats(x, weight, bias, proba, idx, is_local, cw, c: ChunkConfig, need_grad: bool) -> dict:
    """This shard's row statistics from softxent.torch._chunked's logit chunks (the same chunks as its
    backward: bitwise the same ``zhat``): ``max = max_k zhat_ik`` (-inf for an empty shard) and ``sumexp =
    sum_k exp(zhat_ik - max)`` (0), as the unsharded forward forms them (its ``lse = max + log sumexp``),
    and as needed ``z_t`` (the logit at ``idx`` where ``is_local``, else 0), ``z_ws = sum_k w_k zhat_ik``
    (label smoothing), ``p_w``, ``pz`` (probability targets: rt.proba_row_sums)."""
    N, V_r = x.shape[0], weight.shape[0]
    cdt = val.compute_dtype(x.dtype)
    out = _empty_stats(N, cdt, x.device, idx is not None, c.label_smoothing > 0, proba is not None)
    if V_r == 0:
        return out
    prod = _Products(x, weight, bias, cdt)
    for i0, i1, _, zb, _ in _logit_chunks(prod, x, V_r, c.softcap, need_grad, False, c.max_chunk_bytes,
                                          proba=proba is not None):
        if idx is not None:
            out["z_t"][i0:i1] = zb.gather(1, idx[i0:i1, None])[:, 0]
        if "z_ws" in out:
            out["z_ws"][i0:i1] = zb.sum(dim=1) if cw is None else zb @ cw
        if proba is not None:
            out["p_w"][i0:i1], out["pz"][i0:i1] = rt.proba_row_sums(
                rt.class_weighted(proba[i0:i1].to(cdt), cw), zb)
        m = zb.amax(dim=1)
        out["max"][i0:i1] = m
        out["sumexp"][i0:i1] = zb.sub_(m[:, None]).exp_().sum(dim=1)  # in place: zb is done with
    if idx is not None:
        out["z_t"] = torch.where(is_local, out["z_t"], 0)
    return out


def triton_shard_stats(x, weight, bias, proba, idx, is_local, cw, c: ChunkConfig, need_grad: bool) -> dict:
    """:func:`chunked_shard_stats` from softxent.torch._triton_kernels.lce_forward on the shard (targets
    as shard rows, -1 where not local), plus for index targets with a gradient ``q``: the shard's
    ``sum_{k != y_i} exp(zhat_ik - max) / sumexp`` (1 where the target lies elsewhere), which the kernels'
    backward needs globally for the target column."""
    N, V_r = x.shape[0], weight.shape[0]
    out = _empty_stats(N, torch.float32, x.device, idx is not None, c.label_smoothing > 0, proba is not None)
    want_q = need_grad and proba is None
    if want_q:
        out["q"] = torch.ones(N, dtype=torch.float32, device=x.device)
    if V_r == 0 or N == 0:
        return out
    from ._linear_cross_entropy import _triton_kernels

    y = (torch.where(is_local, idx, -1) if idx is not None
         else torch.full((N,), -1, dtype=torch.int64, device=x.device))
    _, z_t, z_ws, *extra = _triton_kernels().lce_forward(
        x, weight, bias, y, ignore_index=-1, softcap=c.softcap, class_weight=cw,
        need_weighted_sum="z_ws" in out, need_target_complement=want_q, target_proba=proba,
        return_max=True, return_sumexp=True)
    out["max"], out["sumexp"] = extra[-2:]
    if idx is not None:
        out["z_t"] = z_t
    if z_ws is not None:
        out["z_ws"] = z_ws
    if want_q:
        out["q"] = extra.pop(0)
    if proba is not None:
        out["p_w"], out["pz"] = rt.class_weighted_rowsum(proba, cw, torch.float32), extra.pop(0)
    return out


def _empty_stats(N, cdt, device, z_t: bool, z_ws: bool, proba: bool) -> dict:
    """The statistics of a shard without columns: what the sums and maxima start from."""
    zeros = lambda: torch.zeros(N, dtype=cdt, device=device)  # noqa: E731
    out = {"max": torch.full((N,), -math.inf, dtype=cdt, device=device), "sumexp": zeros()}
    if z_t:
        out["z_t"] = zeros()
    if z_ws:
        out["z_ws"] = zeros()
    if proba:
        out["p_w"], out["pz"] = zeros(), zeros()
    return out


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


def combine_shards(group, stats: dict, totals: dict) -> dict:
    """The global row statistics from every shard's, bitwise the same on every rank: the row maximum
    ``m = max_r max^r`` in one MAX all-reduce of ``N`` numbers, then ``lse = m + log sum_r sumexp^r
    exp(max^r - m)`` -- the unsharded forward's formula and rounding (``max^r = m`` on the shard holding
    the maximum: no factor there) -- with every other ``(N,)`` entry of ``stats`` and the 0-d ``totals``
    summed in one SUM all-reduce of ``N c (+ 1)`` numbers.  ``q`` (relative to the shard's sum-exp) is
    weighted by the shard's share of the sum before it is added, then divided by the sum."""
    N = stats["max"].shape[0]
    m = stats["max"].clone()
    if N:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    share = stats["sumexp"] * torch.exp(stats["max"] - m)  # 0 for an empty shard (max^r = -inf)
    rows = {"share": share}
    rows.update((k, v) for k, v in stats.items() if k not in ("max", "sumexp", "q"))
    if "q" in stats:
        rows["q"] = share * stats["q"]
    packed = torch.cat([torch.stack(list(rows.values()), dim=1).reshape(-1)]
                       + [v.reshape(1).to(m.dtype) for v in totals.values()])
    if packed.numel():  # N = 0 without class weights: nothing to add (every rank agrees on both)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    summed = packed[: N * len(rows)].reshape(N, len(rows))
    out = {k: summed[:, j].contiguous() for j, k in enumerate(rows)}
    out.update((k, packed[N * len(rows) + j]) for j, k in enumerate(totals))
    out["lse"] = torch.log(out["share"]) + m
    out["row_max"] = m
    if "q" in out:
        out["q"] = out["q"] / out["share"]
    return out


def _all_gather_rows(x_rows: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x_rows) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x_rows.contiguous(), group=group)
    return torch.cat(parts)


def _reduce_dx(dx: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """The sum over the ranks of their partial ``dx`` (the compute dtype, so that a 16-bit dx is rounded
    once, by the caller): all-reduced, or reduce-scattered to each rank's rows under sequence
    parallelism."""
    if not sequence_parallel:
        dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=group)
        return dx
    out = torch.empty(dx.shape[0] // dist.get_world_size(group), dx.shape[1], dtype=dx.dtype,
                      device=dx.device)
    # torch 2.13 deprecates reduce_scatter_tensor for reduce_scatter_single (same arguments), which
    # older releases lack
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter(out, dx.contiguous(), group=group)
    return out


@val.first_derivatives_only
class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Inputs: x ``(N, D)`` (replicated; under sequence parallelism this rank's ``N / P`` rows), this
    rank's weight rows ``(V_r, D)``, bias ``(V_r,)`` or None, targets: global class ids ``(N,)`` int64
    or this rank's columns of probabilities ``(N, V_r)``, sample weights ``(N,)`` or None, this rank's
    class weights ``(V_r,)`` or None, normalizer 0-d or None, :class:`VocabParallelConfig`.  Outputs,
    as softxent.torch._chunked.ChunkedLinearCrossEntropy's: the loss (the same on every rank), the global
    lse ``(N,)`` (differentiable: a gradient reaching it joins each shard's ``alpha``; like the loss's,
    it must be the same on every rank), the z-loss part and the per-row hits of ``want_correct``.
    Gradients: ``dx`` (summed over the group in the compute dtype, rounded once), ``dW`` and ``db`` of
    this rank's rows, and those of this rank's probability columns."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, sample_weight, class_weight, normalizer, cfg):
        ctx.set_materialize_grads(False)
        c, shard = cfg.chunk, cfg.shard
        if cfg.sequence_parallel:
            x = _all_gather_rows(x, shard.group)
        N = x.shape[0]
        cdt = val.compute_dtype(x.dtype)
        proba = target if target.is_floating_point() else None
        need_grad = c.need_dx or c.need_dw or (c.need_db and bias is not None) or c.need_dp
        cw = None if class_weight is None else class_weight.to(cdt).contiguous()
        # the class whose logit each row reads: its target, or (accuracy of probability targets) its most
        # probable class over the whole vocabulary
        idx = is_local = None
        if proba is None or c.want_correct:
            hit = target if proba is None else global_argmax(proba, shard)
            idx, is_local = local_targets(hit, shard, c.ignore_index)
        stats = (triton_shard_stats if cfg.impl == "triton" else chunked_shard_stats)(
            x, weight, bias, proba, idx, is_local, cw, c, need_grad)
        totals = {}
        if cw is not None:
            if proba is None:
                stats["w_target"] = torch.where(is_local, cw[idx], 0) if shard.rows else torch.zeros(
                    N, dtype=cdt, device=x.device)
            totals["w_sum"] = cw.sum()
        g = combine_shards(shard.group, stats, totals)
        lse, V = g["lse"], shard.vocab_size
        if proba is None:
            terms = rt.index_terms(target, V, ignore_index=c.ignore_index, label_smoothing=c.label_smoothing,
                                   sample_weight=sample_weight,
                                   class_weight=None if cw is None else _GatheredClassWeight(g["w_target"],
                                                                                             g["w_sum"]),
                                   dtype=cdt, z_loss_weighting=c.z_loss_weighting, reduction=c.reduction)
            b_sum, lin = terms.b_sum, rt.index_target_sum(terms, g["z_t"], g.get("z_ws"))
        else:
            terms = rt.proba_terms(proba, label_smoothing=c.label_smoothing, sample_weight=sample_weight,
                                   dtype=cdt, num_classes=V)
            b_sum, lin = rt.proba_target_sums_from(terms, g["p_w"], g["pz"], g["w_sum"] if cw is not None
                                                   else float(V), g.get("z_ws"))
        factor = rt.reduction_factor(c.reduction, terms.omega, normalizer)
        correct = torch.zeros(N if c.want_correct else 0, dtype=torch.bool, device=x.device)
        if c.want_correct:
            counted = torch.ones_like(correct) if proba is not None else target != c.ignore_index
            correct = (g["z_t"] == g["row_max"]) & counted
        ctx.cfg = cfg
        # the target's column is in this shard only where is_local: backward zeroes beta elsewhere
        ctx.target_is_local = is_local if proba is None else None
        ctx.target_complement = g.get("q")  # an intermediate, so on ctx rather than save_for_backward
        loss, z_part = finish_forward(ctx, terms, lse, b_sum, lin, factor, c.reduction, c.z_loss, cdt,
                                      (x, weight, bias, proba if proba is not None else idx, cw)
                                      if need_grad else None)
        ctx.mark_non_differentiable(z_part, correct)
        return loss, lse, z_part, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_z_part, grad_correct):
        cfg = ctx.cfg
        c, shard = cfg.chunk, cfg.shard
        st = recompute_state(ctx, grad_loss, grad_lse, c.reduction)
        if ctx.target_is_local is not None:
            st = st._replace(beta=torch.where(ctx.target_is_local, st.beta, 0))
        x, weight, bias = st.x, st.weight, st.bias
        cdt = val.compute_dtype(x.dtype)
        dp = None
        if shard.rows == 0:
            dx = torch.zeros(x.shape, dtype=cdt, device=x.device) if c.need_dx else None
            dw = torch.zeros_like(weight) if c.need_dw else None
            db = torch.zeros_like(bias) if (c.need_db and bias is not None) else None
            dp = torch.zeros_like(st.target) if c.need_dp else None
        elif cfg.impl == "triton":
            from ._linear_cross_entropy import triton_gradients

            y = None if ctx.target_is_local is None else torch.where(ctx.target_is_local, st.target, -1)
            dx, dw, db = triton_gradients(
                st, y, ignore_index=-1, target_complement=ctx.target_complement, vocab_size=shard.vocab_size,
                softcap=c.softcap, need_dx=c.need_dx, need_dw=c.need_dw, need_db=c.need_db,
                skip_threshold=cfg.skip_threshold, workspace_bytes=cfg.workspace_bytes, dx_dtype=cdt)
        else:
            # softxent.torch._chunked's recomputing backward on this shard, with the global lse and row
            # coefficients (its delta formula, its chunks); dx stays in the compute dtype (partial_dx)
            with autocast_off(x.device.type):
                dx, dw, db, dp = _recomputed_gradients(c, st)
        if dx is not None:
            dx = _reduce_dx(dx, shard.group, cfg.sequence_parallel).to(x.dtype)
        return dx, dw, db, dp, None, None, None, None


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


def _unwrap_target(t):
    """A DTensor target: class ids replicated, or probabilities sharded over their last (class) axis
    like the weight's rows (``Shard(-1)``, as ColwiseParallel leaves a teacher's logits): this rank's
    columns."""
    if not (val.is_dtensor(t) and t.is_floating_point()):
        return _unwrap_replicated(t, "target")
    _, Shard = _dtensor_types()
    placements = tuple(t.placements)
    if t.device_mesh.ndim == 1 and len(placements) == 1 and isinstance(placements[0], Shard) and \
            placements[0].dim in (-1, t.ndim - 1):
        return t.to_local()
    raise ValueError(f"target (probabilities) is a DTensor with placements {placements} on a "
                     f"{t.device_mesh.ndim}-D mesh; next to a vocabulary-sharded weight it must be sharded "
                     f"over its class axis (Shard({t.ndim - 1}) on a 1-D mesh), or a plain tensor holding "
                     f"this rank's columns")


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

    Each rank of ``process_group`` passes the same ``x`` ``(..., D)``, ``sample_weight`` and
    ``normalizer``, and its own rows ``weight`` ``(V_r, D)`` (with ``bias`` ``(V_r,)`` and
    ``class_weight`` ``(V_r,)`` sharded alike) of the vocabulary ``V = sum_r V_r``, at offset
    ``vocab_start`` (default: the sum of the lower ranks' ``V_r``).  ``target``: class indices, the same
    global ids in ``[0, V)`` on every rank, or probabilities of shape ``x.shape[:-1] + (V_r,)``: this
    rank's columns ``[vocab_start, vocab_start + V_r)`` only, sharded like the weight (as a
    vocabulary-parallel teacher's logits are, and as Megatron's vocab-parallel losses take their
    inputs; the full ``N x V`` is never needed on a rank).  ``process_group`` None means the default
    (world) group, except for a DTensor weight.  The result is the unsharded call's on the full ``W``,
    bitwise the same on every rank; label smoothing spreads ``eps / V`` over the global ``V``.
    ``weight`` may instead be a DTensor: ``Shard(0)`` on a 1-D mesh (its mesh's group; a DTensor
    probability target then ``Shard(-1)``), or ``Replicate()`` (the plain, unsharded path).  Gradients:
    ``dx`` summed over the group in the compute dtype and rounded once to x's dtype (the same on every
    rank), ``dW`` / ``db`` of this rank's rows, and of a probability target that requires grad, its
    columns' gradient.

    Every option of linear_cross_entropy works: ``return_lse`` (differentiable), ``return_z_loss``,
    ``return_accuracy`` (the target logit -- for probability targets the logit of the most probable class
    of the whole vocabulary -- against the row's maximum over every shard), ``z_loss_weighting``.

    Communication per call: one all-gather of 14 numbers per rank (checks); in forward one MAX
    all-reduce of ``N`` numbers (the rows' maxima) and one SUM all-reduce of ``N c (+ 1)``
    numbers (``c`` = 2 to 5 columns: the shards' sum-exp at the global maximum, the target logit, the smoothing sum, the
    class weight at the target, the Triton path's target complement; for probability targets the
    probability-weighted sums in place of the target's); with probability targets and
    ``return_accuracy`` two more of ``N`` (the most probable class); in backward one all-reduce of
    ``dx`` (``N x D``).  Nothing of size ``N x V_r``.

    ``sequence_parallel=True`` (Megatron's sequence parallelism): ``x`` holds this rank's block of
    ``N / P`` rows of the hidden states (rank order) and ``target`` / ``sample_weight`` all ``N`` rows
    (already shifted: ``shift`` is refused); ``x``'s rows are all-gathered (``N x D``) and ``dx`` is
    reduce-scattered back to them instead of all-reduced.

    ``impl``: ``'chunked'``, ``'triton'`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``;
    not float64; the Triton forward kernel and backward on each rank's shard) or ``'auto'``
    (``'triton'`` for CUDA tensors where Triton imports, as unsharded); ``'torch'`` is refused.
    """
    from ._linear_cross_entropy import package_outputs

    group = process_group
    if val.is_dtensor(weight):
        weight, group = unwrap_dtensor_weight(weight, process_group)
        if group is None:  # Replicate(): the plain path on the local (whole) weight
            from ._linear_cross_entropy import linear_cross_entropy

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
    x, target = _unwrap_replicated(x, "x"), _unwrap_target(target)
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
    except Exception as exc:  # noqa: BLE001 -- any failure here, re-raised below after telling the others
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
                               normalizer=p.normalizer, proba=p.target if p.proba else None, group=group,
                               vocab_start=vocab_start)

    chunk = ChunkConfig(ignore_index=p.ignore_index, label_smoothing=float(label_smoothing),
                        reduction=reduction, z_loss=float(z_loss),
                        softcap=None if softcap is None else float(softcap),
                        max_chunk_bytes=(DEFAULT_MAX_CHUNK_BYTES if max_chunk_bytes is None
                                         else int(max_chunk_bytes)),
                        z_loss_weighting=z_loss_weighting, want_correct=return_accuracy, partial_dx=True,
                        **p.need)
    skip = skip_threshold if skip_threshold in (None, "auto") else float(skip_threshold)
    cfg = VocabParallelConfig(chunk, shard, impl=p.impl, sequence_parallel=sequence_parallel,
                              skip_threshold=skip if p.impl == "triton" else None,
                              workspace_bytes=None if max_chunk_bytes is None else int(max_chunk_bytes))
    x2, weight, bias, t2 = p.x, p.weight, p.bias, p.target
    if p.impl == "triton":  # the kernels take contiguous operands, probabilities with unit column stride
        x2, weight = x2.contiguous(), weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        if p.proba and t2.shape[1] > 1 and t2.stride(1) != 1:
            t2 = t2.contiguous()
    with autocast_off(x2.device.type):
        loss, lse, z_part, correct = VocabParallelLinearCrossEntropy.apply(
            x2, weight, bias, t2, p.sample_weight, p.class_weight, p.normalizer, cfg)
    return package_outputs(loss, lse, z_part, correct, t2, ignore_index=p.ignore_index, reduction=reduction,
                           out_shape=p.out_shape, return_lse=return_lse, return_z_loss=return_z_loss,
                           return_accuracy=return_accuracy)


def _prepare_local(x, weight, target, bias, *, ignore_index, label_smoothing, reduction, sample_weight,
                   class_weight, z_loss, softcap, normalizer, shift, return_lse, impl, max_chunk_bytes,
                   skip_threshold, vocab_start, sequence_parallel, world, z_loss_weighting, return_z_loss,
                   return_accuracy) -> types.SimpleNamespace:
    """The checks that need no other rank (messages as softxent.torch.linear_cross_entropy's, the shapes
    of weight, bias, class_weight and probability targets being this rank's ``V_r`` rows / columns),
    and the flat inputs: ``x`` ``(N, D)``, ``target`` ``(N,)`` int64 or ``(N, V_r)``, ``proba``,
    ``sample_weight``, ``class_weight``, ``normalizer``, ``out_shape``, ``need`` (which gradients),
    ``impl`` (the one that runs), ``options`` (what every rank must agree on)."""
    from ._linear_cross_entropy import _resolve_impl, check_call_options

    ignore_index, k_shift = check_call_options(
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        ignore_index=ignore_index, impl=impl, max_chunk_bytes=max_chunk_bytes, skip_threshold=skip_threshold,
        shift=shift, return_lse=return_lse, return_z_loss=return_z_loss, return_accuracy=return_accuracy,
        z_loss_weighting=z_loss_weighting)
    if impl == "torch":
        raise ValueError("impl='torch' is not available with a vocabulary-sharded weight (it would "
                         "materialise the shard's N x V_r logits); use impl='chunked', 'triton' or 'auto'")
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
    proba = isinstance(target, torch.Tensor) and target.is_floating_point()
    if not proba:
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
        lead = tuple(target.shape[:-1]) if proba else tuple(target.shape)
        if math.prod(lead) != world * n_rows:
            raise ValueError(f"with sequence_parallel=True, x holds this rank's {n_rows} rows of the hidden "
                             f"states and target all P x {n_rows} = {world * n_rows} rows (P = {world}); "
                             f"got target of shape {tuple(target.shape)}")
    else:
        lead = tuple(x.shape[:-1])
    if proba:
        if target.dim() < 1 or target.shape[-1] != V_r:
            raise ValueError(f"target (probabilities) must hold this rank's V_r = {V_r} columns of the "
                             f"vocabulary (the weight shard's rows: the last axis sharded like the weight), "
                             f"shape x.shape[:-1] + (V_r,) = {lead + (V_r,)}; got shape "
                             f"{tuple(target.shape)}")
        val.check_target(target, lead, V_r, ignore_index, classes="V_r")
    elif tuple(target.shape) != lead:
        raise ValueError(f"target must have shape x.shape[:-1] = {lead}; got shape {tuple(target.shape)}")
    sw = val.check_weights_tensor(sample_weight, lead, "sample_weight", x.device)
    cw = val.check_weights_tensor(class_weight, (V_r,), "class_weight (this rank's shard)", x.device)
    norm = val.check_normalizer(normalizer, reduction, x.device)
    if k_shift:
        if x.dim() < 2 or k_shift >= x.shape[-2]:
            raise ValueError(f"shift needs x of shape (..., T, D) with shift in [0, T); got shift={shift!r}, "
                             f"x {tuple(x.shape)}")
        T = x.shape[-2]
        x = x[..., : T - k_shift, :]
        target = target[..., k_shift:, :] if proba else target[..., k_shift:]
        sw = None if sw is None else sw[..., k_shift:]
    x2 = x.reshape(-1, D)
    grad_on = torch.is_grad_enabled()
    need = dict(need_dx=grad_on and x2.requires_grad, need_dw=grad_on and weight.requires_grad,
                need_db=grad_on and bias is not None and bias.requires_grad,
                need_dp=proba and grad_on and target.requires_grad)
    impl = _resolve_impl("chunked" if (impl == "auto" and need["need_dp"]) else impl, x.device, x.dtype)
    if impl == "triton" and need["need_dp"]:
        raise ValueError("impl='triton' does not differentiate probability targets, and target requires "
                         "grad; pass target.detach(), or use impl='chunked' (or 'auto')")
    # every rank must agree on what changes the collectives: the columns summed (which depend on the
    # options, on whether any gradient is needed and on the implementation) and dx's reduction
    options = (reduction, ignore_index, float(label_smoothing), float(z_loss), softcap, k_shift,
               bias is not None, sw is not None, cw is not None, norm is not None, need["need_dx"],
               any(need.values()), sequence_parallel, proba, z_loss_weighting, return_accuracy, impl)
    out_shape = tuple(target.shape[:-1]) if proba else tuple(target.shape)
    return types.SimpleNamespace(
        x=x2, weight=weight, bias=bias,
        target=target.reshape(math.prod(out_shape), V_r) if proba else target.reshape(-1).to(torch.int64),
        proba=proba,
        sample_weight=None if sw is None else sw.reshape(-1).detach(),
        class_weight=None if cw is None else cw.detach(), normalizer=norm, out_shape=out_shape,
        need=need, impl=impl, options=options, ignore_index=ignore_index)


def _local_facts(p, vocab_start, check_x: bool) -> torch.Tensor:
    """This rank's row of the gathered facts (``_FACTS``), float64 on the inputs' device."""
    dev = p.x.device
    head = torch.tensor([p.weight.shape[0], p.x.shape[1], p.x.shape[0], val.FLOAT_DTYPES.index(p.x.dtype),
                         _options_hash(p.options), -1 if vocab_start is None else vocab_start],
                        dtype=torch.float64, device=dev)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    x_check = _float_checksum(p.x) if check_x and os.environ.get(CHECK_REPLICATED_ENV) == "1" else zero
    # sample weights (N numbers, like the targets) and the normalizer are cheap to compare on every call
    sw_check = zero if p.sample_weight is None else _float_checksum(p.sample_weight)
    norm = zero - 1 if p.normalizer is None else p.normalizer.to(torch.float64)
    return torch.cat([head, _target_facts(p.target, p.ignore_index),
                      _bad_weights_code(p.sample_weight, p.class_weight, p.normalizer,
                                        p.target.detach() if p.proba else None, dev).reshape(1),
                      x_check.reshape(1), sw_check.reshape(1), norm.reshape(1),
                      torch.zeros(1, dtype=torch.float64, device=dev)])

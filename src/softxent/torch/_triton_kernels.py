"""Triton kernels for the fused linear + cross-entropy: the ``N x V`` logits are never held in memory.

Notation (shapes): ``x`` (N, D) hidden states, ``W`` (V, D) output weight, ``b`` (V,) bias, ``y`` (N,)
integer targets, ``cw`` (V,) class weights (1 when absent), ``c`` the softcap::

    z_ij   = x_i . W_j + b_j                                   (float32 accumulation, block by block)
    zh_ij  = c tanh(z_ij / c)        (or z_ij without a softcap)
    lse_i  = log sum_j exp(zh_ij)                              (online over vocabulary blocks)
    delta_ij = (alpha_i exp(zh_ij - lse_i) - beta_i [j == y_i != ignore_index] - gamma_i cw_j)
               * (1 - tanh(z_ij / c)^2  or 1)
    dx = delta @ W,   dW = delta^T @ x,   db = sum_i delta_ij

``alpha, beta, gamma`` (N,) come from the host (softxent.torch turns every option of softxent.loss --
reduction, class and sample weights, label smoothing, z-loss, grad_output -- into them), so these kernels
know nothing about the loss beyond the formula above.

Public functions (all tensors on one device: CUDA, or CPU under ``TRITON_INTERPRET=1``):

* :func:`lce_forward` -> ``(lse, z_target, z_wsum[, q])``, one kernel launch plus a tiny combine;
  ``q = 1 - p_y = sum_{j != y} p_j`` (summed apart from the target) lets the backward form the target
  column as ``(alpha - beta) - alpha q``: for a confident token (``p_y = 1 - 1e-6``)
  ``alpha exp(zh_y - lse) - beta`` keeps no correct digit of its ``1e-6``, this keeps float32's.
* :func:`lce_backward` -> ``(dx, dw, db)``, only the requested ones.

Forward.  One program per (row block, vocabulary split): it loops over the split's vocabulary blocks,
computes the ``BLOCK_M x BLOCK_V`` logit tile with ``tl.dot`` (K-loop over D), and keeps per row the
running maximum ``m``, the running sum ``s = sum exp(zh - m)`` (rescaled when ``m`` grows), the target
logit, the weighted logit sum and the sum without the target.  The splits' partial ``(m, s, zt, ws,
sq)`` (``5 x splits x N`` floats) are merged on the host: ``lse = max m + log sum_s s_s exp(m_s - max m)``,
``q = sum_s sq_s exp(m_s - max m) / sum_s s_s exp(m_s - max m)``.  Splitting the vocabulary keeps
all SMs busy when ``N / BLOCK_M`` is small; programs are ordered in groups of ``GROUP_M`` row blocks so
that the row tiles of ``x`` and the weight tiles in flight at once both stay in L2.

Backward: recompute the logits, then three GEMMs per workspace chunk.  Each output element of ``dx``
(a row of x) sums over the whole vocabulary and each of ``dW`` (a vocabulary row) over all tokens,
and ``D`` (2k-8k) is far too wide to keep a ``BLOCK x D`` accumulator on chip while streaming the other
dimension.  The alternatives are (a) CCE's one kernel over (row block, vocab block) tiles with float32
atomics into both dx and dW -- ``2 N V D / BLOCK`` atomic adds (about 270 GB of atomic traffic at
8192 x 4096 x 128256), affordable only when most tiles are skipped, and non-deterministic -- or (b)
recomputing the logits once per D block (``D / BLOCK_D`` times the forward's work).  We instead take
the rows in super-blocks of ``R`` and the vocabulary in chunks of ``C`` so that the chunk's delta
(``R x C``, 16-bit or float32) fits a workspace of ``workspace_bytes`` (default 96 MiB, see
:func:`plan_backward`):

1. ``_lce_delta_kernel`` -- one program per ``BLOCK_M x BLOCK_V`` tile: recompute ``z``, form delta in
   float32, store it (scaled by a power of two, see below) in 16 bits (or float32), store the tile's column
   sums for ``db`` (deterministic, reduced on the host), and with ``skip_threshold`` a per-tile flag.
2. ``_matmul_kernel`` -- ``dx[rows] (+)= delta @ W[chunk]`` (K = C) and
   ``dW[chunk] (+)= delta^T @ x[rows]`` (K = R): plain tiled GEMMs with float32 accumulators; with
   flags they loop over a compacted list of the K-blocks that hold a kept tile (:func:`_active_k_blocks`:
   a counted loop that Triton still software-pipelines, which a branch inside the loop prevented) and
   skip the read-modify-write of an output tile that got no active block.

No atomics anywhere: results are bitwise reproducible run to run.  Extra traffic over the four GEMMs is
the delta chunk (written once, read twice) plus read-modify-writes of the ``dx`` accumulator across
vocabulary chunks and of a float32 ``dW`` across row super-blocks; :func:`plan_backward` picks
``(R, C)`` to minimise it for the budget (default 96 MiB: the extra memory stays under 0.1 GiB).
Across vocabulary chunks a 16-bit ``dx`` accumulates as the pair ``dx + dx_lo`` (both 16-bit: ~16 more
bits than dx alone, half the memory of a float32 accumulator; float32 dx accumulates in place).  With
one row super-block the low half ``dx_lo`` (``N D e`` bytes: 64-72 MiB at the LLM shapes, most of a
0.1 GiB budget) need not be scratch at all: it borrows the last rows of the ``dW`` output, which no
chunk writes before ``dx`` is final -- the chunks holding those rows compute dx on the way, and after
the last chunk their logits are recomputed once more for dW (fewer than ``N + C`` vocabulary rows,
~7-8 % of one GEMM at the LLM shapes; ``BackwardPlan.lo_in_dw``).  Peak extra memory =
``R C e + ceil(R / BLOCK_M) C 4 (+ R D e when dx_lo cannot be borrowed)`` bytes (e = element size; see
:func:`plan_backward`) plus, when asked for ``dw_dtype=float32`` with a 16-bit weight, that float32
``dW``; ``dw_dtype=W.dtype`` (what softxent.torch asks for) makes the planner keep ``R = N`` so that
dW is written once in the weight's dtype with no float32 copy.

Cost, honestly: the exact backward needs the complete ``lse`` before any ``delta``, so it recomputes the
logits -- four ``2 N D V`` GEMMs in all against the three of a materialising implementation.  An exact
path holding no ``N x V`` buffer therefore cannot reach the "three bare GEMMs" floor; at best it is
about 4/3 of it.  ``skip_threshold`` (opt-in, approximate) drops the dx/dW products of tiles whose
``|alpha_i p_ij|`` are all below the threshold, hold no target and have ``gamma = 0``; the logits are
still recomputed for every tile, so the backward approaches one GEMM plus the kept fraction of two.
Two things make it accurate enough to train with (benchmarks/skip_accuracy_cpu.py, float64 on the CPU,
trained-LM-like data, 128 x 128 tiles; RESULTS.md):

* the vocabulary is tiled in :func:`skip_order` (sorted by the logit at the batch's mean hidden state,
  CCE's ordering), so that tokens no row expects share tiles and whole tiles drop: the backward's
  kernels gather W's rows and scatter dW's rows through that order;
* a dropped tile is replaced by its first-order part instead of zero: each row's sum of the tile's
  deltas times the tile's mean W row (dx), each column's sum over the row tile times its mean hidden
  state (dW), and db keeps the exact column sums.  The delta kernel writes those sums; the dx and dW
  products add them as a short extra K-segment (``HAS_EXTRA``) before their single rounding.

Measured (bfloat16 deltas): at eps(bf16)/256 this drops 72 % (Llama-3 head) and 86 % (Gemma-2-like)
of the tiles with dx / dW errors 0.95 / 0.97x and 1.11 / 0.97x naive PyTorch's bf16 errors; at CCE's
eps(bf16)/32, 93 % and 96 % at 1.14 / 1.08x and 1.54 / 1.11x.  With the float16 deltas, the threshold
``eps * 1024 / V`` (:func:`auto_skip_threshold`, ``skip_threshold='auto'`` of softxent.torch) keeps both
errors at 0.48-0.96x naive's at all three LLM shapes while dropping 73-86 % of the tiles (RESULTS.md).
Dropping the same tiles without the correction, or tiling in the natural order, is 29-171x naive's dx
error (many tiny probabilities whose weight rows share a direction add up);
``lce_backward(skip_sorted=False, skip_correction=False)`` keeps that plain rule for comparison.  Every dropped delta is below the threshold, so ``|ddx_id| <= threshold *
sum_j |W_jd - mean_tile W_d|`` over the dropped ``j``; the tests check the result against its float64
mirror.  Whether the gathered-row products keep tensor-core speed is for the GPU benchmark to show.

Precision: float32 accumulation everywhere; delta is rounded once for the tensor core products: to
float16 for bfloat16 inputs (``delta_dtype``; 3 more bits than bfloat16 -- the products then convert
their bfloat16 operand, W or x, to float16 times a power of two (:func:`_float16_scale`), exactly, in
registers), to the input dtype otherwise, as PyTorch's own backward of ``F.linear`` does.  Rounding
delta to bfloat16 was as large an error as rounding dx itself: the exact path's dx / dW errors on
trained-LM-like data were 0.92-1.04x naive PyTorch's bf16 errors, and are 0.42-0.81x with float16
deltas (RESULTS.md), which leaves the block skip room for its own error.  Before rounding, delta is
divided by ``2^ceil(log2 max_i(|alpha_i| + |beta_i| + |gamma_i| max cw))`` (exact, a power of two; 2^14 smaller
again for float16, whose range ends at 65504) and the GEMMs multiply it back: with ``alpha = 1/N`` the
deltas of float16 inputs (~1e-9) would otherwise underflow, and the 1e-6 .. 1e-8 probabilities of a
peaked softmax would be subnormal (a float16 dx error of 1.7e-3 instead of 2.8e-4 on trained-LM-like
data at V = 128256).
``dx`` leaves in ``x.dtype`` (rounded once), ``dW`` in ``dw_dtype`` (float32 by default; rounded
once either way) and ``db`` in float32.  float32 inputs use IEEE
float32 dots unless ``torch.get_float32_matmul_precision()`` allows TF32.

Block sizes come from :func:`default_configs`: small (16) under the interpreter, Hopper-sized tiles
(128 x 128 x 64, 8 warps, 3 stages for 16-bit inputs) on a GPU; :func:`set_configs` overrides them
(the GPU benchmark tries a few).  No ``triton.autotune``: a tuning run would execute the accumulating
GEMMs several times.

Interpreter notes (CPU tests): ``tl.dot`` on bfloat16 is broken in Triton's interpreter, so bfloat16
tiles are upcast to float32 before the dot there only (same products; the GPU uses bf16 tensor cores);
the interpreter also truncates float32 -> bfloat16 stores instead of rounding to nearest, and
``libdevice.tanh`` is unavailable, hence :func:`_tanh` below.

Not provided: a combined ``lce_forward_backward``.  With the loss scale known in advance it would save
launches only, not a GEMM: delta needs the finished ``lse`` of its row, so the logits are computed twice
either way.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

__all__ = [
    "TileConfig",
    "default_configs",
    "set_configs",
    "plan_backward",
    "lce_forward",
    "lce_backward",
    "DEFAULT_WORKSPACE_BYTES",
]

DEFAULT_WORKSPACE_BYTES = 96 * 2**20  # the backward's default budget: extra memory under 0.1 GiB
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of one kernel.

    ``block_m`` rows (tokens, or the GEMM's M), ``block_n`` columns (vocabulary entries for the forward and
    delta kernels, D for the matmul), ``block_k`` the reduction step, ``group_m`` the L2 grouping of
    program ids, ``splits`` (forward only) the number of vocabulary splits (0 = automatic).
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 2
    splits: int = 0


_OVERRIDES: dict[str, TileConfig] = {}


def default_configs(dtype: torch.dtype) -> dict[str, TileConfig]:
    """The tile configurations for inputs of ``dtype``: keys ``'forward'``, ``'delta'``, ``'matmul'``.

    Under the interpreter all blocks are 16 (tiny test shapes stay fast).  On a GPU, 16-bit inputs get
    128 x 128 tiles with a K-step of 64, 8 warps and 3 pipeline stages (96 KiB of shared memory: fits
    Ampere and Hopper); float32 inputs get 64 x 64 x 32.  Overrides from :func:`set_configs` win.
    """
    if _interpreting():
        small = TileConfig(16, 16, 16, group_m=2, num_warps=1, num_stages=1)
        base = {"forward": small, "delta": small, "matmul": small}
    elif dtype in (torch.float16, torch.bfloat16):
        big = TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3)
        base = {"forward": big, "delta": big, "matmul": big}
    else:
        mid = TileConfig(64, 64, 32, group_m=8, num_warps=4, num_stages=3)
        base = {"forward": mid, "delta": mid, "matmul": mid}
    base.update(_OVERRIDES)
    return base


def set_configs(**configs: TileConfig | None) -> None:
    """Override the default tile configurations (``forward=``, ``delta=``, ``matmul=``; None resets)."""
    for key, cfg in configs.items():
        if key not in ("forward", "delta", "matmul"):
            raise ValueError(f"set_configs: unknown kernel {key!r}; expected 'forward', 'delta' or 'matmul'")
        if cfg is None:
            _OVERRIDES.pop(key, None)
        elif not isinstance(cfg, TileConfig):
            raise TypeError(f"set_configs: {key} must be a TileConfig or None; got {type(cfg).__name__}")
        else:
            _OVERRIDES[key] = cfg


def _check_configs(cfgs: dict[str, TileConfig]) -> None:
    """Block sizes must be powers of two >= 16 (tl.dot), and the matmul's K-step must divide both delta
    tile sides (the skip flags are per delta tile)."""
    for name, c in cfgs.items():
        for field in ("block_m", "block_n", "block_k"):
            v = getattr(c, field)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} config: {field} must be a power of two >= 16; got {v}")
    d, mm = cfgs["delta"], cfgs["matmul"]
    if d.block_m % mm.block_k or d.block_n % mm.block_k:
        raise ValueError(
            f"matmul block_k ({mm.block_k}) must divide the delta tile ({d.block_m} x {d.block_n})")


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_options(dtype: torch.dtype) -> tuple[bool, str]:
    """(upcast tiles to float32 before tl.dot, input_precision of float32 dots)."""
    dot_f32 = _interpreting() and dtype == torch.bfloat16
    if dtype == torch.float32 or dot_f32:
        tf32 = not _interpreting() and torch.get_float32_matmul_precision() != "highest"
        return dot_f32, "tf32" if tf32 else "ieee"
    return dot_f32, "tf32"  # Triton's default (what a plain tl.dot passes); unused by 16-bit operands


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(u):
    """tanh in float32 to a few ulp: odd Taylor series below |u| = 1/8 (where 1 - e^{-2|u|} cancels),
    ``(1 - e^{-2|u|}) / (1 + e^{-2|u|})`` above.  NaN stays NaN, +-inf gives +-1."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    u2 = u * u
    small = a * (1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333 + u2 * -0.05396825396825397)))
    t = tl.where(a < 0.125, small, big)
    return tl.where(u < 0, -t, t)


@triton.jit
def _tile_ids(pid, n_m, n_n, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP_M tile rows at a time (L2 reuse)."""
    width = GROUP_M * n_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _logit_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_x, stride_w, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_K: tl.constexpr,
                DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``zh = softcap(x[rows] @ W[cols]^T + b[cols])`` in float32, and ``t = tanh(z / c)`` (or z)."""
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        if EVEN_K:
            a = tl.load(x_rows + kk[None, :], mask=row_mask[:, None], other=0.0)
            b = tl.load(w_rows + kk[None, :], mask=col_mask[:, None], other=0.0)
        else:
            a = tl.load(x_rows + kk[None, :], mask=row_mask[:, None] & (kk < D)[None, :], other=0.0)
            b = tl.load(w_rows + kk[None, :], mask=col_mask[:, None] & (kk < D)[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    t = acc
    if HAS_SOFTCAP:
        t = _tanh(acc / softcap)
        acc = softcap * t
    return acc, t


@triton.jit
def _lce_forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, cw_ptr, p_ptr, part_ptr,
                        N, V, D, stride_x, stride_w, stride_p, cols_per_split, n_splits, plane, ignore_index,
                        softcap,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_CW: tl.constexpr,
                        NEED_WSUM: tl.constexpr, NEED_Q: tl.constexpr, HAS_PROBA: tl.constexpr,
                        EVEN_K: tl.constexpr,
                        DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Per (row block, vocabulary split): running max m, sum s = sum exp(zh - m), target logit zt,
    weighted sum ws and the sum without the target column sq = sum_{j != y} exp(zh_j - m) over the
    split's columns; written to ``part[plane, split, row]`` for plane = m, s, zt, ws, sq.  HAS_PROBA
    (probability targets p, ``(N, V)``): plane 4 holds ``pz = sum_j p_ij cw_j zh_ij`` instead of sq."""
    pid = tl.program_id(0)
    pid_m, pid_s = _tile_ids(pid, tl.cdiv(N, BLOCK_M), n_splits, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index)
    has_target = y != ignore_index
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ws = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_hi
        z, _t = _logit_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_x, stride_w,
                            softcap, HAS_BIAS, HAS_SOFTCAP, EVEN_K, DOT_F32, PRECISION,
                            BLOCK_M, BLOCK_V, BLOCK_K)
        zm = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))
        rescale = tl.exp(m - m_new)
        e = tl.exp(zm - m_new[:, None])
        s = s * rescale + tl.sum(e, axis=1)
        m = m_new
        hit = (cols[None, :] == y[:, None]) & has_target[:, None]
        if NEED_Q:
            sq = sq * rescale + tl.sum(tl.where(hit, 0.0, e), axis=1)
        zt += tl.sum(tl.where(hit, z, 0.0), axis=1)
        if NEED_WSUM:
            if HAS_CW:
                cw = tl.load(cw_ptr + cols, mask=col_mask, other=0.0)
                ws += tl.sum(tl.where(col_mask[None, :], z * cw[None, :], 0.0), axis=1)
            else:
                ws += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
        if HAS_PROBA:
            pw = _proba_tile(p_ptr, cw_ptr, rows, cols, row_mask, col_mask, stride_p, HAS_CW)
            sq += tl.sum(tl.where(pw != 0.0, pw * z, 0.0), axis=1)
    out = part_ptr + pid_s.to(tl.int64) * N + rows
    tl.store(out, m, mask=row_mask)
    tl.store(out + plane, s, mask=row_mask)
    tl.store(out + 2 * plane, zt, mask=row_mask)
    if NEED_WSUM:
        tl.store(out + 3 * plane, ws, mask=row_mask)
    if NEED_Q or HAS_PROBA:
        tl.store(out + 4 * plane, sq, mask=row_mask)


@triton.jit
def _proba_tile(p_ptr, cw_ptr, rows, cols, row_mask, col_mask, stride_p, HAS_CW: tl.constexpr):
    """``p_ij cw_j`` of a tile in float32 (0 outside the matrix)."""
    ptrs = p_ptr + rows.to(tl.int64)[:, None] * stride_p + cols[None, :]
    p = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    if HAS_CW:
        p = p * tl.load(cw_ptr + cols, mask=col_mask, other=0.0)[None, :]
    return p


@triton.jit
def _lce_delta_kernel(x_ptr, w_ptr, b_ptr, y_ptr, cw_ptr, p_ptr, lse_ptr, alpha_ptr, beta_ptr, gamma_ptr,
                      q_ptr, scale_ptr, delta_ptr, flag_ptr, dbpart_ptr, perm_ptr, rowsum_ptr, colsum_ptr,
                      row0, n_rows, v0, n_cols, D, stride_x, stride_w, stride_p, stride_delta, stride_flag,
                      stride_dbpart, stride_rowsum, stride_colsum, ignore_index, softcap, skip_ptr,
                      HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_CW: tl.constexpr,
                      HAS_BETA: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_Q: tl.constexpr,
                      HAS_PROBA: tl.constexpr,
                      WRITE_DELTA: tl.constexpr,
                      NEED_DB: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_PERM: tl.constexpr,
                      HAS_CORR: tl.constexpr, EVEN_K: tl.constexpr,
                      DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One delta tile of the chunk (rows row0 + [0, n_rows), vocabulary positions v0 + [0, n_cols)):
    ``delta / scale`` into the workspace (chunk-local indices), column sums into ``dbpart[tile row]``,
    and with HAS_SKIP the keep-flag of the tile into ``flag[tile row, tile col]`` (a skipped tile's
    delta is not written).  HAS_PERM: position j is the vocabulary row ``perm[j]``.  HAS_CORR: a
    skipped tile writes its first-order part, its row sums into ``rowsum[row, tile col]`` and its
    column sums into ``colsum[column, tile row]`` (both over scale; zeros for a kept tile), and db keeps
    the skipped tile's exact column sums.  HAS_PROBA: the target term is ``beta_i cw_j p_ij`` (``p``
    ``(N, V)`` probabilities) instead of ``beta_i [j == y_i]``; a tile holding any of it is kept."""
    pid = tl.program_id(0)
    pid_m, pid_v = _tile_ids(pid, tl.cdiv(n_rows, BLOCK_M), tl.cdiv(n_cols, BLOCK_V), GROUP_M)
    lrows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lcols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = lrows < n_rows
    col_mask = lcols < n_cols
    rows = row0 + lrows
    cols = v0 + lcols
    if HAS_PERM:
        cols = tl.load(perm_ptr + cols, mask=col_mask, other=0)
    z, t = _logit_tile(x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_x, stride_w,
                       softcap, HAS_BIAS, HAS_SOFTCAP, EVEN_K, DOT_F32, PRECISION,
                       BLOCK_M, BLOCK_V, BLOCK_K)
    valid = row_mask[:, None] & col_mask[None, :]
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    alpha = tl.load(alpha_ptr + rows, mask=row_mask, other=0.0)
    # A row without loss (alpha = 0) gets exactly 0, even where its lse is inf or NaN.
    p_term = tl.where(alpha[:, None] == 0, 0.0, alpha[:, None] * tl.exp(z - lse[:, None]))
    d = p_term
    if HAS_BETA:
        y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index)
        beta = tl.load(beta_ptr + rows, mask=row_mask, other=0.0)
        hit = (cols[None, :] == y[:, None]) & ((y != ignore_index) & (beta != 0))[:, None]
        if HAS_Q:
            # The target column from q = 1 - p_y: (alpha - beta) - alpha q has no cancellation where
            # alpha p_y - beta (p_y ~ 1, beta ~ alpha: a confident token) would lose most digits.
            q = tl.load(q_ptr + rows, mask=row_mask, other=0.0)
            d_y = tl.where(alpha == 0, -beta, (alpha - beta) - alpha * q)
            d = tl.where(hit, d_y[:, None], d)
        else:
            d -= tl.where(hit, beta[:, None], 0.0)
    if HAS_PROBA:
        pbeta = tl.load(beta_ptr + rows, mask=row_mask, other=0.0)
        pw = _proba_tile(p_ptr, cw_ptr, rows, cols, row_mask, col_mask, stride_p, HAS_CW)
        p_hit = (pw != 0.0) & (pbeta != 0.0)[:, None]
        d -= tl.where(p_hit, pbeta[:, None] * pw, 0.0)
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + rows, mask=row_mask, other=0.0)
        if HAS_CW:
            cw = tl.load(cw_ptr + cols, mask=col_mask, other=0.0)
            d -= gamma[:, None] * cw[None, :]
        else:
            d -= gamma[:, None]
    if HAS_SOFTCAP:
        d *= 1.0 - t * t
    d = tl.where(valid, d, 0.0)
    db_sum = tl.sum(d, axis=0)
    inv_scale = 1.0 / tl.load(scale_ptr)
    keep = True
    if HAS_SKIP:
        skip_threshold = tl.load(skip_ptr)
        n_keep = tl.sum(tl.sum(tl.where(valid & (tl.abs(p_term) >= skip_threshold), 1, 0), axis=1), axis=0)
        if HAS_BETA:
            n_keep += tl.sum(tl.sum(tl.where(valid & hit, 1, 0), axis=1), axis=0)
        if HAS_PROBA:
            n_keep += tl.sum(tl.sum(tl.where(valid & p_hit, 1, 0), axis=1), axis=0)
        if HAS_GAMMA:
            n_keep += tl.sum(tl.where(row_mask & (gamma != 0), 1, 0), axis=0)
        keep = n_keep > 0
        tl.store(flag_ptr + pid_m * stride_flag + pid_v, keep.to(tl.int8))
        if HAS_CORR:
            dropped = tl.where(keep, 0.0, d) * inv_scale
            tl.store(rowsum_ptr + lrows.to(tl.int64) * stride_rowsum + pid_v, tl.sum(dropped, axis=1),
                     mask=row_mask)
            tl.store(colsum_ptr + lcols.to(tl.int64) * stride_colsum + pid_m, tl.sum(dropped, axis=0),
                     mask=col_mask)
        else:
            db_sum = tl.where(keep, db_sum, 0.0)
    if NEED_DB:
        tl.store(dbpart_ptr + pid_m.to(tl.int64) * stride_dbpart + lcols, db_sum, mask=col_mask)
    if WRITE_DELTA:
        if keep:
            ptrs = delta_ptr + lrows.to(tl.int64)[:, None] * stride_delta + lcols[None, :]
            tl.store(ptrs, (d * inv_scale).to(delta_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _mm_step(acc, a_ptrs, b_ptrs, a_mask, n_mask, kk, K, b_scale, EVEN_K: tl.constexpr,
             CAST_B: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + A[:, kk] @ B[kk, :]`` for one K-block (rows of A outside ``a_mask`` read as zero).
    CAST_B: B (bfloat16) enters the dot as float16 ``B * b_scale`` (a power of two: exact), and ``acc``
    is held transposed, ``acc + (B^T A^T)``: the converted operand is then the dot's first one, which
    Hopper's wgmma reads from registers and overlaps with the next step (as the second operand it would
    go back through shared memory and each dot would wait for the previous one)."""
    if EVEN_K:
        a = tl.load(a_ptrs, mask=a_mask[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
    else:
        a = tl.load(a_ptrs, mask=a_mask[:, None] & (kk < K)[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=(kk < K)[:, None] & n_mask[None, :], other=0.0)
    if CAST_B:
        b = (b.to(tl.float32) * b_scale).to(tl.float16)
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if CAST_B:
        return tl.dot(tl.trans(b), tl.trans(a), acc, input_precision=PRECISION)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, lo_ptr, scale_ptr, bscale_ptr, flag_ptr, klist_ptr, kcount_ptr,
                   bperm_ptr, cperm_ptr, a2_ptr, b2_ptr, M, N, K, K2, stride_am, stride_ak, stride_bk, stride_bn,
                   stride_cm, stride_cn, stride_fm, stride_fk, stride_kl, stride_a2m, stride_b2k,
                   ACCUMULATE: tl.constexpr, SPLIT_LO: tl.constexpr, HAS_FLAGS: tl.constexpr,
                   FLAG_M: tl.constexpr, FLAG_K: tl.constexpr, PERM_B: tl.constexpr, PERM_C: tl.constexpr,
                   HAS_EXTRA: tl.constexpr, CAST_B: tl.constexpr, EVEN_K: tl.constexpr,
                   DOT_F32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """``C (+)= scale * A @ B`` with float32 accumulation, any strides.

    PERM_B: row k of B is ``B[bperm[k]]``; PERM_C: row m of C is ``C[cperm[m]]`` (gathered / scattered
    rows: the sorted vocabulary of the block skip).  HAS_EXTRA: ``+ scale * A2 @ B2`` with float32 A2
    ``(M, K2)`` and B2 ``(K2, N)`` (unit column strides), summed before C is rounded (the skipped
    tiles' first-order part).  CAST_B: float16 A times bfloat16 B, which enters the dot as float16
    ``B * bscale`` (a power of two chosen so that B fits float16's range; the product is divided by it
    again before the extra segment).

    With SPLIT_LO the running sum is the pair ``C + LO`` (both in C's 16-bit dtype, same strides):
    ``s = scale A @ B (+ C + LO)``, ``C = round(s)``, ``LO = round(s - C)`` -- about 16 bits more than C
    alone, so a sum over many calls is rounded once in effect, at half the memory of a float32
    accumulator.  With HAS_FLAGS, A is made of
    FLAG_M x FLAG_K tiles kept or not by ``flag[i * stride_fm + k * stride_fk]``: the rows of unkept tiles
    read as zero (they hold stale data), only the ``kcount[tile row]`` K-blocks listed in
    ``klist[tile row, :]`` (those with a kept tile; :func:`_active_k_blocks`) are multiplied, and an
    accumulated output tile that got no kept block is left alone."""
    pid = tl.program_id(0)
    pid_m, pid_n = _tile_ids(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    # 64-bit base pointers advanced by BLOCK_K each step (no int32 overflow, and the plain loop below is
    # what Triton's software pipeliner recognises)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rn.to(tl.int64)[None, :] * stride_bn + rk[:, None] * stride_bk
    step_a = BLOCK_K * stride_ak
    step_b = BLOCK_K * stride_bk
    n_active = pid_m * 0
    b_scale = 1.0
    if CAST_B:
        b_scale = tl.load(bscale_ptr)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # transposed (_mm_step)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_FLAGS:
        # only the K-blocks with a kept tile in this row tile, from a compacted list (a plain counted
        # loop, which Triton's software pipeliner accepts, unlike a branch inside the loop)
        f_rows = flag_ptr + (rm // FLAG_M) * stride_fm  # each row's flag-tile row
        n_active = tl.load(kcount_ptr + pid_m)
        klist = klist_ptr + pid_m.to(tl.int64) * stride_kl
        for j in range(0, n_active):
            k0 = tl.load(klist + j) * BLOCK_K
            kept = tl.load(f_rows + (k0 // FLAG_K) * stride_fk, mask=m_mask, other=0) != 0
            a_at = a_ptrs + k0.to(tl.int64) * stride_ak
            if PERM_B:
                kidx = tl.load(bperm_ptr + k0 + rk, mask=k0 + rk < K, other=0).to(tl.int64)
                b_at = b_ptr + kidx[:, None] * stride_bk + rn.to(tl.int64)[None, :] * stride_bn
            else:
                b_at = b_ptrs + k0.to(tl.int64) * stride_bk
            acc = _mm_step(acc, a_at, b_at, kept, n_mask, k0 + rk, K, b_scale, EVEN_K, CAST_B, DOT_F32,
                           PRECISION)
    else:
        for k0 in range(0, K, BLOCK_K):
            acc = _mm_step(acc, a_ptrs, b_ptrs, m_mask, n_mask, k0 + rk, K, b_scale, EVEN_K, CAST_B, DOT_F32,
                           PRECISION)
            a_ptrs += step_a
            b_ptrs += step_b
    if CAST_B:
        acc = tl.trans(acc) * (1.0 / b_scale)
    if HAS_EXTRA:
        rk2 = tl.arange(0, 16)
        for k0 in range(0, K2, 16):
            kk = k0 + rk2
            a2 = tl.load(a2_ptr + rm.to(tl.int64)[:, None] * stride_a2m + kk[None, :],
                         mask=m_mask[:, None] & (kk < K2)[None, :], other=0.0)
            b2 = tl.load(b2_ptr + kk.to(tl.int64)[:, None] * stride_b2k + rn[None, :],
                         mask=(kk < K2)[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a2.to(tl.float32), b2.to(tl.float32), acc, input_precision="ieee")
        n_active += 1
    acc = acc * tl.load(scale_ptr)
    c_rows = rm.to(tl.int64)
    if PERM_C:
        c_rows = tl.load(cperm_ptr + rm, mask=m_mask, other=0).to(tl.int64)
    c_ptrs = c_ptr + c_rows[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
    c_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_LO:
        lo_ptrs = lo_ptr + c_rows[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
    write = True
    if ACCUMULATE:
        if HAS_FLAGS:
            write = n_active > 0
        if write:
            acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
            if SPLIT_LO:
                acc += tl.load(lo_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    if write:
        hi = acc.to(c_ptr.dtype.element_ty)
        tl.store(c_ptrs, hi, mask=c_mask)
        if SPLIT_LO:
            tl.store(lo_ptrs, (acc - hi.to(tl.float32)).to(lo_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _active_k_blocks_kernel(flag_ptr, klist_ptr, kcount_ptr, n_flag_rows, n_kb, stride_fm, stride_fk,
                            stride_kl, G: tl.constexpr, M_PER_FLAG: tl.constexpr, K_PER_FLAG: tl.constexpr,
                            MAX_KB: tl.constexpr):
    """One product row tile ``t``: its kept K-blocks (any of its ``G`` flag rows kept, or the one flag
    row it lies in when ``M_PER_FLAG`` tiles share it), compacted in order into ``klist[t]``, and their
    count into ``kcount[t]``."""
    t = tl.program_id(0)
    kb = tl.arange(0, MAX_KB)
    in_k = kb < n_kb
    kept = tl.zeros((MAX_KB,), dtype=tl.int32)
    for g in range(G):
        frow = t * G // M_PER_FLAG + g
        f = tl.load(flag_ptr + frow * stride_fm + (kb // K_PER_FLAG) * stride_fk,
                    mask=in_k & (kb * 0 + frow < n_flag_rows), other=0)
        kept = tl.maximum(kept, (f != 0).to(tl.int32))
    pos = tl.cumsum(kept, axis=0) - 1
    tl.store(klist_ptr + t.to(tl.int64) * stride_kl + pos, kb, mask=kept != 0)
    tl.store(kcount_ptr + t, tl.sum(kept, axis=0))


@triton.jit
def _tile_mean_kernel(src_ptr, idx_ptr, out_ptr, n_rows, D, stride_src,
                      HAS_IDX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[t] = mean of rows [t BLOCK_R, (t + 1) BLOCK_R) of src`` (fewer in the last group) in float32;
    with HAS_IDX row r is ``src[idx[r]]``.  out is ``(groups, D)`` contiguous."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r = t * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < n_rows
    rows = r.to(tl.int64)
    if HAS_IDX:
        rows = tl.load(idx_ptr + r, mask=r_mask, other=0).to(tl.int64)
    vals = tl.load(src_ptr + rows[:, None] * stride_src + cols[None, :],
                   mask=r_mask[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
    count = tl.minimum(n_rows - t * BLOCK_R, BLOCK_R).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * D + cols, tl.sum(vals, axis=0) / count, mask=cols < D)


def _tile_means(src: torch.Tensor, idx: torch.Tensor | None, n_rows: int, block_r: int) -> torch.Tensor:
    """Means of consecutive groups of ``block_r`` rows of ``src`` (or of ``src[idx]``), float32."""
    D = src.shape[1]
    groups = triton.cdiv(n_rows, block_r)
    out = torch.empty((groups, D), dtype=torch.float32, device=src.device)
    block_d = 16 if _interpreting() else 64
    _tile_mean_kernel[(groups, triton.cdiv(D, block_d))](
        src, idx, out, n_rows, D, src.stride(0), HAS_IDX=idx is not None, BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def skip_order(x: torch.Tensor, weight: torch.Tensor, tail_rows: int = 0) -> torch.Tensor:
    """The block skip's vocabulary order (int32 ``(V,)``): rows sorted by their logit at the batch's mean
    hidden state (CCE's ordering), so that the tokens no row expects share tiles that drop whole.  The
    last ``tail_rows`` rows of W stay last (sorted among themselves): their memory may hold dx's low half
    until the end of the backward (``BackwardPlan.lo_in_dw``)."""
    V = weight.shape[0]
    avg = weight @ x.mean(0, dtype=torch.float32).to(weight.dtype)
    head = V - tail_rows
    order = torch.argsort(avg[:head].float())
    if tail_rows:
        order = torch.cat([order, torch.argsort(avg[head:].float()) + head])
    return order.to(torch.int32)


# --------------------------------------------------------------------------------------------------
# argument checks (the public softxent.torch API validates user input; these guard the interface)
# --------------------------------------------------------------------------------------------------
def _check_device(t: torch.Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of x); got {t.device}")


def _check_vector(t, name: str, n: int, dtype: torch.dtype | tuple, device, optional: bool = False):
    if t is None:
        if optional:
            return
        raise ValueError(f"{name} is required; got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.shape != (n,) or t.dtype not in dtypes or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous ({n},) tensor of dtype {' or '.join(map(str, dtypes))}; "
                         f"got shape {tuple(t.shape)}, dtype {t.dtype}, contiguous={t.is_contiguous()}")
    _check_device(t, name, device)


def _check_common(x, weight, bias, target, class_weight, ignore_index, softcap):
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 2 or t.dtype not in _FLOAT_DTYPES or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 2-D float16/bfloat16/float32 tensor; got shape "
                             f"{tuple(t.shape)}, dtype {t.dtype}, contiguous={t.is_contiguous()}")
    N, D = x.shape
    V = weight.shape[0]
    if weight.shape[1] != D or weight.dtype != x.dtype:
        raise ValueError(f"weight must have shape (V, {D}) and x's dtype {x.dtype}; got shape "
                         f"{tuple(weight.shape)}, dtype {weight.dtype}")
    if V < 1 or D < 1:
        raise ValueError(f"weight must have V >= 1 rows and D >= 1 columns; got shape {tuple(weight.shape)}")
    device = x.device
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                         f"got x on {device}")
    _check_device(weight, "weight", device)
    _check_vector(bias, "bias", V, _FLOAT_DTYPES, device, optional=True)
    _check_vector(target, "target", N, torch.int64, device)
    _check_vector(class_weight, "class_weight", V, torch.float32, device, optional=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int; got {ignore_index!r}")
    if not -2**31 <= ignore_index < 2**31:
        raise ValueError(f"ignore_index must fit in int32; got {ignore_index}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0; got {softcap!r}")
    return N, D, V


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
def _forward_splits(n_row_blocks: int, V: int, block_v: int, cfg: TileConfig, device) -> int:
    """Vocabulary splits: enough programs for ~4 waves on the GPU, each split >= 4 vocabulary blocks."""
    n_vb = triton.cdiv(V, block_v)
    if cfg.splits > 0:
        return min(cfg.splits, n_vb)
    if _interpreting():
        return min(2, n_vb)  # exercises the host-side merge in the tests
    target = 4 * _sm_count(device)
    splits = 1
    while n_row_blocks * splits < target and n_vb // (2 * splits) >= 4:
        splits *= 2
    return splits


def lce_forward(x, weight, bias, target, *, ignore_index: int, softcap: float | None, class_weight,
                need_weighted_sum: bool, need_target_complement: bool = False, target_proba=None,
                return_max: bool = False, return_sumexp: bool = False, config: TileConfig | None = None):
    """Row statistics of the capped logits ``zh = softcap(x W^T + b)`` without holding them.

    Args:
        x: ``(N, D)`` contiguous, float16/bfloat16/float32.
        weight: ``(V, D)`` contiguous, x's dtype.
        bias: ``(V,)`` (any float dtype) or None.
        target: ``(N,)`` int64 class indices (entries equal to ``ignore_index`` are skipped; others are
            assumed to lie in ``[0, V)`` -- the caller validates).
        ignore_index: int; may lie inside ``[0, V)``.
        softcap: ``c > 0`` or None.
        class_weight: ``(V,)`` float32 or None (weights of ``z_wsum``).
        need_weighted_sum: compute ``z_wsum``.
        need_target_complement: also return ``q_i = 1 - p_{i, y_i} = sum_{j != y_i} p_ij`` (1 where
            ``y_i == ignore_index``), summed apart from the target so that it keeps its relative
            precision when ``p_y ~ 1``; :func:`lce_backward` forms the target column from it.
        target_proba: optional ``(N, V)`` probability targets ``p`` (any float dtype, unit column
            stride; not with ``need_target_complement``): adds ``z_proba_i = sum_j p_ij cw_j zh_ij``.
        return_max: also return the row maxima ``max_j zh_ij`` (bitwise the logits ``z_target`` saw).
        return_sumexp: also return ``s_i = sum_j exp(zh_ij - max_j zh_ij)`` (with ``return_max``: the
            pair that lse comes from, ``lse = max + log s``, which a caller combining several vocabulary
            blocks needs without lse's rounding).
        config: optional :class:`TileConfig` for this call (``block_n`` = vocabulary block).

    Returns:
        ``(lse, z_target, z_wsum)``, float32 ``(N,)`` each: ``lse_i = log sum_j exp(zh_ij)``,
        ``z_target_i = zh_{i, y_i}`` (0 where ``y_i == ignore_index``), ``z_wsum_i = sum_j cw_j zh_ij``
        (None unless ``need_weighted_sum``); ``(lse, z_target, z_wsum, q)`` with
        ``need_target_complement``; then ``z_proba`` with ``target_proba`` and the row maxima with
        ``return_max`` and the sums ``s`` with ``return_sumexp``, in that order.
    """
    N, D, V = _check_common(x, weight, bias, target, class_weight, ignore_index, softcap)
    dev = x.device
    _check_proba(target_proba, N, V, dev)
    if target_proba is not None and need_target_complement:
        raise ValueError("need_target_complement is for class-index targets; got target_proba too")
    extras = int(need_target_complement) + int(target_proba is not None) + int(return_max) + int(return_sumexp)
    if N == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=dev)
        out = empty, empty.clone(), (empty.clone() if need_weighted_sum else None)
        return out + tuple(empty.clone() for _ in range(extras))
    cfg = config or default_configs(x.dtype)["forward"]
    _check_configs({"forward": cfg, "delta": cfg, "matmul": replace(cfg, block_k=16)})
    n_rb = triton.cdiv(N, cfg.block_m)
    splits = _forward_splits(n_rb, V, cfg.block_n, cfg, dev)
    cols_per_split = triton.cdiv(triton.cdiv(V, splits), cfg.block_n) * cfg.block_n
    splits = triton.cdiv(V, cols_per_split)  # every split non-empty
    has_proba = target_proba is not None
    # m, s, zt, ws, and sq (or pz with probability targets)
    planes = 5 if (need_target_complement or has_proba) else 4 if need_weighted_sum else 3
    part = torch.empty((planes, splits, N), dtype=torch.float32, device=dev)
    dot_f32, precision = _dot_options(x.dtype)
    _lce_forward_kernel[(n_rb * splits,)](
        x, weight, bias, target, class_weight, target_proba, part,
        N, V, D, x.stride(0), weight.stride(0), target_proba.stride(0) if has_proba else 0,
        cols_per_split, splits, splits * N, ignore_index, float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_CW=class_weight is not None,
        NEED_WSUM=bool(need_weighted_sum), NEED_Q=bool(need_target_complement), HAS_PROBA=has_proba,
        EVEN_K=D % cfg.block_k == 0, DOT_F32=dot_f32,
        PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    m, s = part[0], part[1]
    if splits == 1:
        m_max = m[0]
        s_total, sq_total = s[0], part[4, 0] if need_target_complement else None
        lse = m[0] + torch.log(s_total)
    else:
        m_max = m.amax(dim=0)
        m_safe = torch.where(torch.isfinite(m_max), m_max, torch.zeros_like(m_max))
        rescale = torch.exp(m - m_safe)
        s_total = (s * rescale).sum(dim=0)
        sq_total = (part[4] * rescale).sum(dim=0) if need_target_complement else None
        lse = m_safe + torch.log(s_total)
    z_target = part[2].sum(dim=0)
    z_wsum = part[3].sum(dim=0) if need_weighted_sum else None
    out = (lse, z_target, z_wsum)
    if need_target_complement:
        out += (sq_total / s_total,)
    if has_proba:
        out += (part[4].sum(dim=0),)
    if return_max:
        out += (m_max,)
    return out + (s_total,) if return_sumexp else out


def _check_proba(target_proba, N: int, V: int, device) -> None:
    if target_proba is None:
        return
    if not (isinstance(target_proba, torch.Tensor) and target_proba.is_floating_point()):
        raise TypeError(f"target_proba must be a floating tensor (N, V); got {type(target_proba).__name__}")
    if tuple(target_proba.shape) != (N, V) or (V > 1 and target_proba.stride(1) != 1):
        raise ValueError(f"target_proba must have shape (N, V) = ({N}, {V}) with unit column stride; got "
                         f"shape {tuple(target_proba.shape)}, strides {target_proba.stride()}")
    _check_device(target_proba, "target_proba", device)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackwardPlan:
    """Rows per super-block ``rows``, vocabulary columns per chunk ``cols``, the workspace bytes and the
    extra HBM traffic (read-modify-writes of the accumulators, bytes) of that plan.

    ``lo_in_dw``: the low half of a 16-bit ``dx`` accumulator lives in the last ``lo_rows`` rows of the
    ``dW`` output (not yet written while ``dx`` accumulates) instead of the workspace; the chunks that
    hold those rows -- the last ``recompute_cols`` vocabulary rows -- are then done twice: once for
    ``dx`` and, after ``dx`` is final, once more (logits recomputed) for ``dW``."""

    rows: int
    cols: int
    workspace_bytes: int
    traffic_bytes: int = 0
    lo_in_dw: bool = False
    lo_rows: int = 0
    recompute_cols: int = 0


_LAUNCH_BYTES = 32 * 2**20  # ~10 us of launch + tail per chunk, expressed as HBM traffic (~3 TB/s)
_FLOP_PER_BYTE = 200  # GEMM throughput over bandwidth (H100/H200: ~750 TFLOP/s bf16 over 3-4.2 TB/s)


def plan_backward(N: int, V: int, D: int, elem_size: int, *, need_dx: bool, need_dw: bool,
                  workspace_bytes: int | None = None, dw_in_float32: bool = True,
                  block_m: int = 128, block_v: int = 128, lo_in_dw: bool | None = None,
                  skip_corrected: bool = False, dx_elem_size: int | None = None) -> BackwardPlan:
    """Choose the row super-block ``R``, the vocabulary chunk ``C`` and where ``dx``'s low half lives
    (``lo_in_dw``: None to choose, True to prefer it wherever it applies, False never).

    Workspace (bytes, e = element size of x; ``dx_elem_size`` that of dx when it differs: 4 for a
    float32 dx, which accumulates in place and has no low half)::

        R C e                                  delta chunk (when dx or dW is needed)
      + ceil(R / block_m) C 4                  db partials
      + [C < V, need_dx, e < 4, not lo_in_dw] R D e
                                               low half of the dx accumulator (16-bit x; the high half
                                               is dx itself, a float32 dx accumulates in place)
      + [R < N, need_dw, not dw_in_float32] V D 4   float32 dW accumulator before the cast
      + [skip_corrected] 4 (R n_vb + C n_rb + (n_vb + n_rb) D) + 12 V
                                               the corrected skip's row / column sums of the skipped
                                               tiles, tile means of W and x, and the vocabulary order
                                               (n_vb = ceil(C / block_v), n_rb = ceil(R / block_m))

    ``lo_in_dw`` (only with one row super-block, ``R = N``, and dW wanted, ``V >= lo_rows``): the low
    half instead borrows the last ``lo_rows = ceil(N e / e_dW)`` rows of the dW output, and the chunks
    overlapping them are done twice (dx pass, then dW pass once dx is final).  That costs
    ``2 N D recompute_cols`` flops -- at the LLM shapes ~7-8 % of one GEMM -- and frees ``N D e`` bytes
    (64-72 MiB at the Llama-3 / Gemma-2 shapes) for a wider delta chunk.

    Cost, minimised over the plans that fit (bytes; recomputation counted at ``_FLOP_PER_BYTE``)::

        (ceil(V/C) - 1) N D 4e [need_dx]  +  (ceil(N/R) - 1) V D 8 [need_dw]
      + 2 N D recompute_cols / 200  +  ~32 MB per launch

    R runs over ``N`` and ``block_m * 2^k``; C is the largest multiple of ``block_v`` that fits, then
    balanced over the chunks.  When no plan fits ``workspace_bytes``, it is doubled until one does.
    ``workspace_bytes=None``: :data:`DEFAULT_WORKSPACE_BYTES` (96 MiB), so that the backward's extra
    memory stays under 0.1 GiB.  At (8192, 4096, 128256) and (16384, 2304, 256000) in bf16 with dW in
    bf16 that plan re-reads the dx accumulator about 21 and 86 times (~5.6 and ~26 GB, ~1.4 and ~6 ms at
    4 TB/s, against ~46 and ~103 ms for the four GEMMs); a larger budget trades memory for that traffic.
    """
    budget = DEFAULT_WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    return _plan_for_budget(N, V, D, elem_size, need_dx, need_dw, int(budget), dw_in_float32, block_m,
                            block_v, lo_in_dw, skip_corrected,
                            elem_size if dx_elem_size is None else dx_elem_size)


def _lo_rows(N, elem_size, dw_in_float32) -> int:
    """Rows of the (V, D) dW output that hold an (N, D) 16-bit dx low half."""
    return -(-N * elem_size // (4 if dw_in_float32 else elem_size))


def _can_borrow_lo(N, R, V, lo_rows, elem_size, need_dx, need_dw) -> bool:
    """dx's low half can live in dW's tail: a 16-bit dx, dW wanted, one row super-block, room in dW."""
    return need_dx and elem_size < 4 and need_dw and R == N and V >= lo_rows


def _plan_for_budget(N, V, D, elem_size, need_dx, need_dw, workspace_bytes, dw_in_float32, block_m,
                     block_v, lo_in_dw=None, skip_corrected=False, dx_elem=None) -> BackwardPlan:
    need_delta = need_dx or need_dw
    e = elem_size if need_delta else 0
    dx_elem = elem_size if dx_elem is None else dx_elem
    split_lo = need_dx and dx_elem < 4
    lo_rows = _lo_rows(N, dx_elem, dw_in_float32)
    cands = {N}
    r = block_m
    while r < N:
        cands.add(r)
        r *= 2
    budget = max(int(workspace_bytes), 1)
    while True:
        best, best_cost = None, None
        for R in sorted(cands):
            n_rb = triton.cdiv(R, block_m)
            per_col = R * e + n_rb * 4
            fixed = V * D * 4 if (R < N and need_dw and not dw_in_float32) else 0
            if skip_corrected:  # n_vb <= C / block_v + 1
                per_col += triton.cdiv(4 * (R + D), block_v) + 4 * n_rb
                fixed += 4 * (R + D) + 4 * n_rb * D + 12 * V
            can_borrow = lo_in_dw is not False and _can_borrow_lo(N, R, V, lo_rows, dx_elem, need_dx, need_dw)
            for borrow in ((True,) if can_borrow and lo_in_dw else (False, True) if can_borrow else (False,)):
                if fixed + per_col * V <= budget:  # one chunk: no dx accumulation across chunks
                    C, lo, borrow = V, 0, False
                else:
                    lo = R * D * dx_elem if (split_lo and not borrow) else 0
                    C = (budget - fixed - lo) // per_col // block_v * block_v
                    if C < block_v:
                        continue
                    C = min(V, triton.cdiv(triton.cdiv(V, triton.cdiv(V, C)), block_v) * block_v)
                    if C == V:
                        lo, borrow = 0, False
                n_v, n_r = triton.cdiv(V, C), triton.cdiv(N, R)
                traffic = 0
                if need_dx:
                    traffic += (n_v - 1) * N * D * 4 * dx_elem
                if need_dw:
                    traffic += (n_r - 1) * V * D * 8
                recompute = V - (V - lo_rows) // C * C if borrow else 0
                cost = (traffic + (n_v * n_r * 3 + triton.cdiv(recompute, C) * 2) * _LAUNCH_BYTES
                        + 2 * N * D * recompute // _FLOP_PER_BYTE)
                if best_cost is None or cost < best_cost:
                    best_cost = cost
                    best = BackwardPlan(R, C, fixed + per_col * C + lo, traffic, borrow,
                                        lo_rows if borrow else 0, recompute)
        if best is not None:
            return best
        budget *= 2


#: float16 deltas are scaled up to at most 2^14 (its largest finite value is 65504): the many tiny
#: probabilities of a peaked softmax then stay normal numbers instead of subnormals or zero
_FLOAT16_HEADROOM = 2.0 ** -14


def _delta_scale(alpha, beta, gamma, class_weight, dtype=None) -> torch.Tensor:
    """``2^ceil(log2 max_i(|alpha_i| + |beta_i| + |gamma_i| max cw))`` as a (1,) float32 tensor (1 if 0 or
    not finite), times 2^-14 for float16 deltas, computed on the device: no host synchronisation."""
    bound = alpha.abs()
    if beta is not None:
        bound = bound + beta.abs()
    if gamma is not None:
        cw_max = 1.0 if class_weight is None else class_weight.abs().amax()
        bound = bound + gamma.abs() * cw_max
    mx = bound.amax().reshape(1)
    ok = torch.isfinite(mx) & (mx > 0)
    scale = torch.where(ok, torch.exp2(torch.ceil(torch.log2(torch.where(ok, mx, 1.0)))), 1.0).float()
    return scale * _FLOAT16_HEADROOM if dtype == torch.float16 else scale


def auto_skip_threshold(dtype: torch.dtype, V: int) -> float:
    """``skip_threshold='auto'`` of softxent.torch: ``eps(dtype) * min(1, 1024 / V)``, per probability.

    The error the skip adds grows with the probability mass it leaves to the first-order correction,
    which at a fixed threshold grows with the number of vocabulary tiles a row has below it; scaling the
    threshold with ``1 / V`` keeps that mass, and so the error, about the same at every vocabulary size.
    Measured on trained-LM-like data (benchmarks/skip_accuracy_cpu.py, three draws; RESULTS.md): with the
    default float16 deltas it keeps dx and dW at 0.48-0.96x naive PyTorch's bf16 errors at the three
    LLM shapes while dropping 73-86 % of the tiles (with bfloat16 deltas, up to 1.11x)."""
    return float(torch.finfo(dtype).eps) * min(1.0, 1024.0 / max(int(V), 1))


def _active_k_blocks(tile_flags: torch.Tensor, M: int, K: int, flag_m: int, flag_k: int, block_m: int,
                     block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the skip's products: per ``block_m`` row tile of an ``M x K`` operand whose ``flag_m x flag_k``
    tiles are kept or not (``tile_flags``, ``[M tile, K tile]``, any strides), the ``block_k`` K-blocks
    holding a kept tile, first and in order, and how many there are: ``(klist (tiles, K-blocks) int32,
    kcount (tiles,) int32)``; one launch, on the device (no host synchronisation).  ``block_k`` divides
    ``flag_k``; ``block_m`` and ``flag_m`` are powers of two."""
    n_mt, n_kb = triton.cdiv(M, block_m), triton.cdiv(K, block_k)
    klist = torch.empty((n_mt, n_kb), dtype=torch.int32, device=tile_flags.device)
    kcount = torch.empty(n_mt, dtype=torch.int32, device=tile_flags.device)
    _active_k_blocks_kernel[(n_mt,)](
        tile_flags, klist, kcount, tile_flags.shape[0], n_kb, tile_flags.stride(0), tile_flags.stride(1),
        klist.stride(0), G=max(1, block_m // flag_m), M_PER_FLAG=max(1, flag_m // block_m),
        K_PER_FLAG=flag_k // block_k, MAX_KB=max(16, triton.next_power_of_2(n_kb)))
    return klist, kcount


def _float16_scale(t: torch.Tensor) -> torch.Tensor:
    """``2^(15 - ceil(log2 max|t|))`` as a (1,) float32 tensor (1 if t is all zero or not finite): ``t``
    times it fits float16's range (largest finite 65504) with its largest entries at 2^14 .. 2^15, so that
    a bfloat16 ``t`` converts exactly except for entries below ``2^-29 max|t|``.  On the device, with no
    ``|t|`` temporary (a ``V x D`` weight would need one as large as itself)."""
    lo, hi = torch.aminmax(t.reshape(-1))
    mx = torch.maximum(-lo, hi).float().reshape(1)
    ok = torch.isfinite(mx) & (mx > 0)
    return torch.where(ok, torch.exp2(15.0 - torch.ceil(torch.log2(torch.where(ok, mx, 1.0)))), 1.0)


def lce_backward(x, weight, bias, target, lse, alpha, beta, gamma, *, target_complement=None, target_proba=None,
                 ignore_index: int,
                 softcap: float | None, class_weight, need_dx: bool, need_dw: bool, need_db: bool,
                 skip_threshold: float | torch.Tensor | None = None, workspace_bytes: int | None = None,
                 dw_dtype: torch.dtype = torch.float32, delta_dtype: torch.dtype | None = None,
                 dx_dtype: torch.dtype | None = None, chunk_shape: tuple[int, int] | None = None,
                 lo_in_dw: bool | None = None, skip_sorted: bool = True, skip_correction: bool = True,
                 configs: dict[str, TileConfig] | None = None, stats: dict | None = None):
    """Gradients of ``sum_ij delta_ij z_ij`` (module docstring) for x, W and b, recomputing the logits.

    Args:
        x, weight, bias, target, ignore_index, softcap, class_weight: as in :func:`lce_forward`.
        lse: ``(N,)`` float32 from :func:`lce_forward`.
        alpha, beta, gamma: ``(N,)`` float32 per-row coefficients of delta; ``beta``/``gamma`` may be
            None for zero (saves the target / class-weight terms in the kernel).
        target_complement: optional ``(N,)`` float32 ``q = 1 - p_y`` from :func:`lce_forward`
            (``need_target_complement``): the target column is then ``(alpha - beta) - alpha q``
            instead of ``alpha exp(zh_y - lse) - beta``, which cancels for confident tokens.
        target_proba: optional ``(N, V)`` probability targets ``p`` (as in :func:`lce_forward`): the
            target term becomes ``beta_i cw_j p_ij`` (``target`` then only needs to be ``(N,)`` int64).
        need_dx, need_dw, need_db: which gradients to compute (nothing else is allocated).
        skip_threshold: None (exact), or ``t > 0`` as a number or as a one-element float32 tensor on
            the inputs' device (the kernel reads it: no host synchronisation): a ``BLOCK_M x BLOCK_V``
            tile whose ``|alpha_i exp(zh_ij - lse_i)|`` are all ``< t``, that holds no target with
            ``beta != 0`` and whose rows all have ``gamma = 0`` is skipped in the dx and dW products
            (what replaces it: ``skip_correction``).  For CCE's rule "every probability below eps" pass
            ``t = eps * max_i |alpha_i|``.
        skip_sorted, skip_correction: with ``skip_threshold``, tile the vocabulary in
            :func:`skip_order` (default) instead of its natural order, and replace each skipped tile by
            its first-order part (default) instead of zero: the dx rows get the tile's row sums of
            delta times the tile's mean weight row, the dW rows its column sums times the row tile's
            mean hidden state, db its exact column sums.  Either costs two thin products per chunk
            (``N x V/BLOCK_V x D``); together they keep the error at LLM scale near the exact path's
            (benchmarks/skip_accuracy_cpu.py).
        workspace_bytes: budget of the backward's scratch memory (None: ``DEFAULT_WORKSPACE_BYTES``,
            96 MiB; see :func:`plan_backward`).
        dw_dtype: float32 (default) or the weight's dtype: with one row super-block (``R = N``) the
            latter is written directly, rounded once; otherwise it is accumulated in float32 then cast.
        dx_dtype: None (x's dtype) or float32: a partial dx that the caller sums with others before
            rounding it once (the vocabulary-parallel path sums the ranks' partial dx).
        delta_dtype: the dtype delta is rounded to for the dx and dW products: None (default) is
            float16 for bfloat16 inputs and the input dtype otherwise; bfloat16 inputs may also ask for
            bfloat16.  float16 keeps 3 more bits of each delta (the products then convert their
            bfloat16 operand, W or x, to float16 times a power of two, exactly): on trained-LM-like
            data the exact path's dx / dW errors fall from 0.92-1.04x to 0.42-0.81x naive PyTorch's
            bf16 errors, what is left being mostly dx's and dW's own rounding to bf16 (RESULTS.md).
        chunk_shape: force ``(R, C)`` (tests, tuning).
        lo_in_dw: where a 16-bit dx accumulator's low half lives (:class:`BackwardPlan`): None (the
            plan's choice; False with ``chunk_shape``), True (required: ValueError where the plan
            cannot -- one row super-block, dx and dW wanted, 16-bit x, several vocabulary chunks,
            ``V`` at least the borrowed rows), or False.
        configs: tile configurations (``'delta'`` and ``'matmul'``) for this call.
        stats: optional dict, filled with ``plan``, ``tiles`` and ``tiles_kept`` (synchronises).

    Returns:
        ``(dx, dw, db)``: dx ``(N, D)`` in ``dx_dtype``, dw ``(V, D)`` in ``dw_dtype``, db ``(V,)``
        float32; each None unless requested.
    """
    N, D, V = _check_common(x, weight, bias, target, class_weight, ignore_index, softcap)
    dev = x.device
    _check_vector(lse, "lse", N, torch.float32, dev)
    _check_vector(alpha, "alpha", N, torch.float32, dev)
    _check_vector(beta, "beta", N, torch.float32, dev, optional=True)
    _check_vector(gamma, "gamma", N, torch.float32, dev, optional=True)
    _check_vector(target_complement, "target_complement", N, torch.float32, dev, optional=True)
    _check_proba(target_proba, N, V, dev)
    has_proba = target_proba is not None
    if isinstance(skip_threshold, torch.Tensor):
        if skip_threshold.numel() != 1 or skip_threshold.dtype != torch.float32 or skip_threshold.device != dev:
            raise ValueError(f"skip_threshold as a tensor must have one float32 element on {dev}; got shape "
                             f"{tuple(skip_threshold.shape)}, {skip_threshold.dtype} on {skip_threshold.device}")
    elif skip_threshold is not None:
        if not (isinstance(skip_threshold, (int, float)) and math.isfinite(skip_threshold) and skip_threshold > 0):
            raise ValueError(f"skip_threshold must be None, a finite number > 0 or a float32 tensor; got "
                             f"{skip_threshold!r}")
        skip_threshold = torch.full((1,), float(skip_threshold), dtype=torch.float32, device=dev)
    if dw_dtype not in (torch.float32, weight.dtype):
        raise ValueError(f"dw_dtype must be torch.float32 or the weight's dtype {weight.dtype}; got {dw_dtype}")
    allowed = (torch.float16, torch.bfloat16) if x.dtype == torch.bfloat16 else (x.dtype,)
    if delta_dtype is None:
        delta_dtype = allowed[0]
    elif delta_dtype not in allowed:
        raise ValueError(f"delta_dtype must be None or one of {[str(d) for d in allowed]} for {x.dtype} "
                         f"inputs; got {delta_dtype!r}")
    if dx_dtype is None:
        dx_dtype = x.dtype
    elif dx_dtype not in (x.dtype, torch.float32):
        raise ValueError(f"dx_dtype must be None, x's dtype {x.dtype} or torch.float32; got {dx_dtype!r}")
    dx_elem = torch.finfo(dx_dtype).bits // 8
    need_db = bool(need_db) and bias is not None
    dx = torch.empty((N, D), dtype=dx_dtype, device=dev) if need_dx else None
    dw = db = None
    if need_db:
        db = torch.zeros(V, dtype=torch.float32, device=dev)
    if N == 0 or not (need_dx or need_dw or need_db):
        if need_dw:
            dw = torch.zeros((V, D), dtype=dw_dtype, device=dev)
        return dx, dw, db

    cfgs = dict(default_configs(x.dtype))
    if configs:
        cfgs.update(configs)
    _check_configs(cfgs)
    dcfg, mcfg = cfgs["delta"], cfgs["matmul"]
    BM, BV = dcfg.block_m, dcfg.block_n
    need_delta = need_dx or need_dw
    has_skip = skip_threshold is not None
    corrected = has_skip and bool(skip_correction) and need_delta
    if chunk_shape is not None:
        R, C = chunk_shape
        if not (isinstance(R, int) and isinstance(C, int) and R >= 1 and C >= 1):
            raise ValueError(f"chunk_shape must be two ints >= 1 (rows, columns); got {chunk_shape!r}")
        R, C = min(R, N), min(C, V)
        plan = BackwardPlan(R, C, -1, -1)
    else:
        plan = plan_backward(N, V, D, x.element_size(), need_dx=need_dx, need_dw=need_dw,
                             workspace_bytes=workspace_bytes,
                             dw_in_float32=dw_dtype == torch.float32, block_m=BM, block_v=BV,
                             lo_in_dw=lo_in_dw, skip_corrected=corrected, dx_elem_size=dx_elem)
        R, C = plan.rows, plan.cols
    n_rchunks, n_vchunks = triton.cdiv(N, R), triton.cdiv(V, C)
    n_rb, n_vb = triton.cdiv(R, BM), triton.cdiv(C, BV)
    split_dx = need_dx and n_vchunks > 1 and dx_dtype != torch.float32
    lo_rows = _lo_rows(N, dx_elem, dw_dtype == torch.float32)
    can_borrow = n_vchunks > 1 and _can_borrow_lo(N, R, V, lo_rows, dx_elem, need_dx, need_dw)
    if lo_in_dw is None:
        lo_in_dw = plan.lo_in_dw and can_borrow
    elif lo_in_dw and not can_borrow:
        raise ValueError(f"lo_in_dw=True needs one row super-block, dx and dW, a 16-bit dx, several "
                         f"vocabulary chunks and V >= {lo_rows}; got R={R}, C={C}, N={N}, V={V}, "
                         f"dx {dx_dtype}, "
                         f"need_dx={need_dx}, need_dw={need_dw}")
    # vocabulary chunks from first_late on hold the borrowed rows: their dW waits until dx is final
    first_late = (V - lo_rows) // C if lo_in_dw else n_vchunks

    # outputs and workspace
    dw_direct = need_dw and (dw_dtype == torch.float32 or n_rchunks == 1)
    if need_dw:
        dw = torch.empty((V, D), dtype=dw_dtype if dw_direct else torch.float32, device=dev)
    delta = torch.empty((R, C), dtype=delta_dtype, device=dev) if need_delta else None
    # a float16 delta against bfloat16 operands: the products convert W (dx) and x (dW) to float16
    cast_b = need_delta and delta_dtype != x.dtype
    w_scale = _float16_scale(weight) if cast_b and need_dx else None
    x_scale = _float16_scale(x) if cast_b and need_dw else None
    if lo_in_dw:  # dW's last rows are not written before dx is final (module docstring)
        dx_lo = dw[V - lo_rows:].reshape(-1).view(dx_dtype)[: N * D].view(N, D)
    else:
        dx_lo = torch.empty((R, D), dtype=dx_dtype, device=dev) if split_dx else None
    dbpart = torch.empty((n_rb, C), dtype=torch.float32, device=dev) if need_db else None
    flags = torch.empty((n_rb, n_vb), dtype=torch.int8, device=dev) if has_skip else None
    order = skip_order(x, weight, lo_rows if lo_in_dw else 0) if has_skip and skip_sorted else None
    rowsum = torch.empty((R, n_vb), dtype=torch.float32, device=dev) if corrected else None
    colsum = torch.empty((C, n_rb), dtype=torch.float32, device=dev) if corrected else None
    kept = torch.zeros((), dtype=torch.int64, device=dev) if (has_skip and stats is not None) else None
    # |beta_i cw_j p_ij| <= |beta_i| max p max cw: the bound of the target term (p need not be <= 1)
    beta_bound = beta if (beta is None or not has_proba) else beta * (
        target_proba.amax().float().clamp(min=0) * (1.0 if class_weight is None else class_weight.amax()))
    scale = _delta_scale(alpha, beta_bound, gamma, class_weight, delta_dtype)
    dot_f32, precision = _dot_options(x.dtype)
    softcap_f = float(softcap) if softcap is not None else 1.0

    def matmul(a, stride_a, b, stride_b, c, lo, stride_c, M, Nn, K, accumulate, tile_flags, flag_m,
               flag_k, bperm=None, cperm=None, extra=None, b_scale=None):
        """``tile_flags``: the chunk's keep-flags as ``[M tile, K tile]`` (a view of ``flags``), or None."""
        grid = (triton.cdiv(M, mcfg.block_m) * triton.cdiv(Nn, mcfg.block_n),)
        a2, b2 = extra if extra is not None else (None, None)
        klist = kcount = None
        if has_skip:
            klist, kcount = _active_k_blocks(tile_flags, M, K, flag_m, flag_k, mcfg.block_m, mcfg.block_k)
        _matmul_kernel[grid](
            a, b, c, lo, scale, b_scale, flags, klist, kcount, bperm, cperm, a2, b2, M, Nn, K,
            0 if a2 is None else a2.shape[1], stride_a[0], stride_a[1], stride_b[0], stride_b[1],
            stride_c[0], stride_c[1], *(tile_flags.stride() if has_skip else (0, 0)),
            0 if klist is None else klist.stride(0),
            0 if a2 is None else a2.stride(0), 0 if b2 is None else b2.stride(0),
            ACCUMULATE=accumulate, SPLIT_LO=lo is not None, HAS_FLAGS=has_skip, FLAG_M=flag_m, FLAG_K=flag_k,
            PERM_B=bperm is not None, PERM_C=cperm is not None, HAS_EXTRA=extra is not None,
            CAST_B=b_scale is not None, EVEN_K=K % mcfg.block_k == 0, DOT_F32=dot_f32,
            PRECISION=precision, BLOCK_M=mcfg.block_m, BLOCK_N=mcfg.block_n, BLOCK_K=mcfg.block_k,
            GROUP_M=mcfg.group_m, num_warps=mcfg.num_warps, num_stages=mcfg.num_stages)

    def delta_chunk(r0, nr, nrb, v0, nc, nvb, with_db):
        _lce_delta_kernel[(nrb * nvb,)](
            x, weight, bias, target, class_weight, target_proba, lse, alpha, beta, gamma, target_complement,
            scale, delta, flags, dbpart, order, rowsum, colsum,
            r0, nr, v0, nc, D, x.stride(0), weight.stride(0), target_proba.stride(0) if has_proba else 0,
            C, n_vb, C, n_vb, n_rb, ignore_index, softcap_f, skip_threshold,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_CW=class_weight is not None, HAS_BETA=beta is not None and not has_proba,
            HAS_GAMMA=gamma is not None,
            HAS_Q=beta is not None and target_complement is not None and not has_proba,
            HAS_PROBA=has_proba and beta is not None, WRITE_DELTA=need_delta, NEED_DB=with_db,
            HAS_SKIP=has_skip, HAS_PERM=order is not None, HAS_CORR=corrected, EVEN_K=D % dcfg.block_k == 0,
            DOT_F32=dot_f32, PRECISION=precision, BLOCK_M=BM, BLOCK_V=BV, BLOCK_K=dcfg.block_k,
            GROUP_M=dcfg.group_m, num_warps=dcfg.num_warps, num_stages=dcfg.num_stages)

    def positions(v0, nc):
        """The chunk's vocabulary rows: a slice of the order, or None (natural order)."""
        return None if order is None else order[v0:v0 + nc]

    x_means = {}  # the corrected skip's mean hidden state per row tile, once per row super-block

    def dw_chunk(r0, nr, v0, nc):
        # dW[chunk] (+)= delta^T @ x[rows]: M = vocabulary, K = rows (flags [row tile, vocab tile])
        extra = None
        if corrected:
            if r0 not in x_means:
                x_means.clear()
                x_means[r0] = _tile_means(x[r0:r0 + nr], None, nr, BM)
            extra = (colsum[:nc, :triton.cdiv(nr, BM)], x_means[r0])
        rows = positions(v0, nc)
        tile_flags = flags[:triton.cdiv(nr, BM), :triton.cdiv(nc, BV)].t() if has_skip else None
        matmul(delta, (1, C), x[r0:r0 + nr], (D, 1), dw if rows is not None else dw[v0:v0 + nc], None,
               (D, 1), nc, D, nr, r0 > 0, tile_flags, BV, BM, cperm=rows, extra=extra, b_scale=x_scale)

    for r0 in range(0, N, R):
        nr = min(R, N - r0)
        nrb = triton.cdiv(nr, BM)
        for ci, v0 in enumerate(range(0, V, C)):
            nc = min(C, V - v0)
            nvb = triton.cdiv(nc, BV)
            delta_chunk(r0, nr, nrb, v0, nc, nvb, need_db)
            if kept is not None:
                kept += flags[:nrb, :nvb].sum()
            rows = positions(v0, nc)
            if need_db:
                if rows is None:
                    db[v0:v0 + nc] += dbpart[:nrb, :nc].sum(dim=0)
                else:
                    db.index_add_(0, rows, dbpart[:nrb, :nc].sum(dim=0))
            if need_dx:
                # dx[rows] (+)= delta @ W[chunk]: M = rows, K = vocabulary (flags [row tile, vocab tile]);
                # across vocabulary chunks a 16-bit dx accumulates as the pair dx + dx_lo
                extra = None
                if corrected:
                    w_means = _tile_means(weight if rows is not None else weight[v0:v0 + nc], rows, nc, BV)
                    extra = (rowsum[:nr, :nvb], w_means)
                matmul(delta, (C, 1), weight if rows is not None else weight[v0:v0 + nc], (D, 1),
                       dx[r0:r0 + nr], dx_lo, (D, 1), nr, D, nc, ci > 0,
                       flags[:nrb, :nvb] if has_skip else None, BM, BV, bperm=rows, extra=extra,
                       b_scale=w_scale)
            if need_dw and ci < first_late:
                dw_chunk(r0, nr, v0, nc)
    # lo_in_dw: dx is final, so the borrowed rows are free; recompute the late chunks' delta for dW
    for v0 in range(first_late * C, V if lo_in_dw else 0, C):
        nc = min(C, V - v0)
        delta_chunk(0, N, n_rb, v0, nc, triton.cdiv(nc, BV), False)
        dw_chunk(0, N, v0, nc)
    if need_dw and not dw_direct:
        dw = dw.to(dw_dtype)
    if stats is not None:
        stats["plan"] = BackwardPlan(R, C, plan.workspace_bytes, plan.traffic_bytes, lo_in_dw,
                                     lo_rows if lo_in_dw else 0, V - first_late * C if lo_in_dw else 0)
        stats["tiles"] = sum(triton.cdiv(min(R, N - r0), BM) for r0 in range(0, N, R)) * sum(
            triton.cdiv(min(C, V - v0), BV) for v0 in range(0, V, C))
        stats["tiles_kept"] = int(kept) if kept is not None else stats["tiles"]
    return dx, dw, db

#!/usr/bin/env python3
"""The Triton backward's opt-in block skip: its gradient error at LLM vocabulary sizes, on the CPU.

Accuracy, not speed.  The skip rule is a property of the numbers, not of the device: a ``128 x 128``
(token x vocabulary) tile of the backward is dropped when every ``p_ij`` in it is below the threshold
and it holds no target (``skip_threshold`` of ``softxent.torch.linear_cross_entropy``, mean reduction,
no label smoothing; the GPU kernels' 16-bit tiles are 128 x 128).  This script applies that rule in
float64 to the issue's three shapes on trained-LM-like data (benchmarks/_lm_data.py) and measures, against
the float64 gradients of the same bf16 operands, ``||a - ref|| / ||ref||`` of grad x and grad W for

  naive            PyTorch itself: ``F.cross_entropy((x @ W.t()).float(), y)`` and ``backward()`` in bf16
  exact            the kernels' arithmetic: exact logits, delta rounded once (to float16 with the
                   kernels' power-of-two scale -- their default for bf16 inputs -- or to bf16, the
                   ``delta_dtype`` column), products accumulated exactly (float32 on the GPU), dx and
                   dW rounded once to bf16
  skip t           the same with the tiles the rule drops at threshold t zeroed (the plain rule)
  + correction     each dropped tile replaced by its first-order part (row sums of its deltas times
                   its mean weight row for dx, column sums times the row tile's mean hidden state for
                   dW), in the natural or the "sorted" vocabulary order (by the batch's average logit,
                   CCE's ordering; here in float64) -- sorted + correction is what the kernels'
                   ``skip_threshold`` does; "auto" is ``skip_threshold='auto'``, eps(bf16) * 1024 / V

plus the fraction of tiles dropped (which sets the skip's speed: the backward then costs the logits'
recomputation plus the kept fraction of its two products).  The per-tile statistics do not depend on N
(rows are independent), so a few hundred rows stand for 8192; the Triton kernels themselves are tested
against a float64 mirror of this rule (tests/test_triton_kernels.py), and benchmarks/linear_ce_gpu.py
measures the real thing on a GPU.

    python benchmarks/skip_accuracy_cpu.py [--rows 256] [--quick]
    python benchmarks/skip_accuracy_cpu.py --kernels [--rows 256 --dim 64 --vocab 128256] [--quick]

``--kernels`` runs the Triton kernels themselves instead (on a GPU in bf16; without one under
``TRITON_INTERPRET=1`` in float16 -- the interpreter rounds float32 to bf16 by truncation, not to
nearest -- with the GPU's 128 x 128 tiles): exact, the plain rule and the sorted + corrected skip at
two thresholds, against float64.  At the interpreter's speed keep D small (64: ~4 min at V = 128256);
a small D makes the logits' tails noisier than at D = 4096, so fewer tiles drop.

Writes ``benchmarks/out/skip_accuracy_cpu.json`` (``skip_accuracy_cpu_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _lm_data  # noqa: E402
from _harness import print_table, write_json  # noqa: E402

SHAPES = [("llama3-8b-head", 4096, 128256), ("gemma2-2b-like", 2304, 256000), ("small-32k", 4096, 32000)]
QUICK_SHAPES = [("quick", 32, 60000)]
TILE = 128
BF16_EPS = torch.finfo(torch.bfloat16).eps
# name -> (threshold or None (exact), first-order correction of the dropped tiles, delta dtype); a
# threshold given as ("auto", f) is f * eps(bf16) * min(1, 1024 / V), the kernels' 'auto' rule
F16, B16 = torch.float16, torch.bfloat16
VARIANTS = {
    "natural": {"exact": (None, False, F16), "exact, bf16 delta": (None, False, B16),
                "skip eps/32 (plain rule)": (BF16_EPS / 32, False, B16)},
    "sorted": {"skip auto, bf16 delta": (("auto", 1), True, B16),
               **{f"skip auto x{f}": (("auto", f), True, F16) for f in (0.5, 1, 2)},
               "skip eps/32": (BF16_EPS / 32, True, F16),
               "skip eps/32, no correction": (BF16_EPS / 32, False, F16)},
}
VOCAB_CHUNK = 8192                       # a multiple of TILE: tiles never straddle two chunks


def _round_bf16(a: torch.Tensor) -> torch.Tensor:
    return a.to(torch.bfloat16).to(torch.float64)


def _round_delta(delta: torch.Tensor, dtype) -> torch.Tensor:
    """delta rounded as the kernels store it: bf16, or float16 over their power-of-two scale (2^-14 /
    N for alpha = 1/N: the largest |delta| near 2^14, the tiny probabilities normal numbers)."""
    if dtype == torch.bfloat16:
        return _round_bf16(delta)
    s = 2.0 ** -14 / delta.shape[0]
    return (delta / s).to(torch.float16).to(torch.float64) * s


def _threshold(t, V: int) -> float | None:
    if isinstance(t, tuple):
        return t[1] * BF16_EPS * min(1.0, 1024 / V)
    return t


def naive_gradients(x, W, y):
    """PyTorch's own bf16 loss and gradients (what a user would run without a fused loss)."""
    xg, Wg = x.clone().requires_grad_(), W.clone().requires_grad_()
    loss = F.cross_entropy((xg @ Wg.t()).float(), y)
    loss.backward()
    return float(loss.detach()), xg.grad, Wg.grad


def _tile_means(a: torch.Tensor) -> torch.Tensor:
    """Means of ``a``'s rows in consecutive groups of TILE (the last group may be short)."""
    n = a.shape[0]
    pad = (-n) % TILE
    counts = torch.full(((n + pad) // TILE, 1), float(TILE), dtype=a.dtype)
    counts[-1] = TILE - pad
    return F.pad(a, (0, 0, 0, pad)).view(-1, TILE, a.shape[1]).sum(1) / counts


def measure(x, W, y, naive, variants: dict, order=None) -> dict:
    """Errors of naive, exact and skipped gradients against float64, in vocabulary chunks.

    ``variants``: name -> (threshold or None for exact, corrected, delta dtype) (see VARIANTS).
    ``order``: a vocabulary permutation that sets which tokens share a tile (None: natural order).
    ``corrected`` adds, for each dropped tile, its first-order part: rows' sums of the dropped deltas
    times the tile's mean weight row (for dx), and vocabulary columns' sums times the row tile's mean
    hidden state (for dW).
    """
    N, D = x.shape
    if order is not None:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        W, y = W[order], inverse[y]
    V = W.shape[0]
    loss_naive, gx_naive, gW_naive = naive
    if order is not None:
        gW_naive = gW_naive[order]
    x64 = x.double()
    x_means = _tile_means(x64)                                    # (row tiles, D)
    lse = torch.full((N,), -torch.inf, dtype=torch.float64)
    for v0 in range(0, V, VOCAB_CHUNK):
        lse = torch.logaddexp(lse, torch.logsumexp(x64 @ W[v0:v0 + VOCAB_CHUNK].double().t(), 1))
    z_y = (x64 * W[y].double()).sum(1)
    loss_ref = float((lse - z_y).mean())

    names = list(variants)
    skips = [k for k in names if variants[k][0] is not None]
    gx_ref = torch.zeros(N, D, dtype=torch.float64)
    gx = {k: torch.zeros(N, D, dtype=torch.float64) for k in names}
    sq_ref_w, sq_err_w = 0.0, {k: 0.0 for k in names + ["naive"]}
    tiles, dropped = 0, {k: 0 for k in skips}
    dropped_mass = {k: 0.0 for k in skips}
    rows = torch.arange(N)
    pad_m = (-N) % TILE
    for v0 in range(0, V, VOCAB_CHUNK):
        Wc = W[v0:v0 + VOCAB_CHUNK].double()
        vc = Wc.shape[0]
        p = torch.exp(x64 @ Wc.t() - lse[:, None])
        target = torch.zeros(N, vc, dtype=torch.bool)
        here = (y >= v0) & (y < v0 + vc)
        target[rows[here], y[here] - v0] = True
        delta = p.clone()
        delta[target] -= 1.0
        delta /= N
        gx_ref += delta @ Wc
        gW_ref = delta.t() @ x64
        sq_ref_w += float(gW_ref.square().sum())
        sq_err_w["naive"] += float((gW_naive[v0:v0 + vc].double() - gW_ref).square().sum())
        rounded = {dt: _round_delta(delta, dt) for dt in {v[2] for v in variants.values()}}
        pad_v = (-vc) % TILE
        grid = lambda m: F.pad(m.to(torch.uint8), (0, pad_v, 0, pad_m)).view(  # noqa: E731
            (N + pad_m) // TILE, TILE, (vc + pad_v) // TILE, TILE).amax(dim=(1, 3)).bool()
        has_target = grid(target)
        tiles += has_target.numel()
        w_means = _tile_means(Wc)                                 # (vocabulary tiles, D)
        for k, (t, corrected, dt) in variants.items():
            kept = rounded[dt]
            if t is not None:
                drop_tile = ~grid(p >= _threshold(t, V)) & ~has_target
                dropped[k] += int(drop_tile.sum())
                drop = drop_tile.repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)[:N, :vc]
                dropped_mass[k] += float(p[drop].sum())
                kept = kept.masked_fill(drop, 0.0)
            gx[k] += kept @ Wc
            gw = kept.t() @ x64
            if t is not None and corrected:
                lost = F.pad(delta * drop, (0, pad_v, 0, pad_m))  # no targets in dropped tiles
                gx[k] += lost.view(N + pad_m, -1, TILE).sum(2)[:N] @ w_means
                gw += (lost.view(-1, TILE, vc + pad_v).sum(1)[:, :vc]).t() @ x_means
            sq_err_w[k] += float((_round_bf16(gw) - gW_ref).square().sum())
        del p, delta, rounded, gW_ref, Wc, target
    nx = float(gx_ref.norm())
    out = {"loss": loss_ref, "naive_loss_err": abs(loss_naive - loss_ref) / abs(loss_ref),
           "naive_gx_err": float((gx_naive.double() - gx_ref).norm()) / nx,
           "naive_gW_err": (sq_err_w["naive"] / sq_ref_w) ** 0.5}
    for k in names:
        out[f"{k}_gx_err"] = float((_round_bf16(gx[k]) - gx_ref).norm()) / nx
        out[f"{k}_gW_err"] = (sq_err_w[k] / sq_ref_w) ** 0.5
    for k in skips:
        out[f"{k}_dropped_tiles"] = dropped[k] / tiles
        out[f"{k}_dropped_mass_per_row"] = dropped_mass[k] / N
    return out


KERNEL_VARIANTS = [("exact", None, {}),
                   ("exact, bf16 delta", None, dict(delta_dtype=torch.bfloat16)),  # bf16 inputs only
                   ("plain eps/32", BF16_EPS / 32, dict(skip_sorted=False, skip_correction=False)),
                   ("sorted + correction, auto", "auto", {}),
                   ("sorted + correction eps/32", BF16_EPS / 32, {}),
                   ("sorted eps/256 (no correction)", BF16_EPS / 256, dict(skip_correction=False))]


def run_kernels(N: int, D: int, V: int, seed: int) -> list[dict]:
    """The backward kernels on trained-LM-like data: errors against float64 and kept tiles."""
    import os
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from softxent.torch import _triton_kernels as K  # noqa: E402 (after TRITON_INTERPRET is set)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float16
    if dev == "cpu":  # the GPU's 16-bit tiles, not the interpreter's small default ones
        big = K.TileConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=1)
        K.set_configs(forward=big, delta=big, matmul=K.TileConfig(128, 64, 64, group_m=8, num_warps=8,
                                                                  num_stages=1))
    x, W, y = _lm_data.make_lm_inputs(N, D, V, seed, device=dev, dtype=dtype)
    x64, W64 = x.double().requires_grad_(), W.double().requires_grad_()
    F.cross_entropy(x64 @ W64.t(), y).backward()

    def err(a, b):
        return float((a.double() - b).norm() / b.norm())

    _, gx_naive, gW_naive = naive_gradients(x, W, y)
    rows = [dict(variant=f"naive PyTorch ({dtype})", dx_err=err(gx_naive, x64.grad),
                 dW_err=err(gW_naive, W64.grad))]
    lse, _, _, q = K.lce_forward(x, W, None, y, ignore_index=-100, softcap=None, class_weight=None,
                                 need_weighted_sum=False, need_target_complement=True)
    alpha = torch.full((N,), 1.0 / N, device=dev)
    for name, t, kw in KERNEL_VARIANTS:
        if kw.get("delta_dtype", dtype) != dtype and dtype != torch.bfloat16:
            continue
        if t == "auto":
            t = K.auto_skip_threshold(torch.bfloat16, V)
        stats = {}
        t0 = time.perf_counter()
        dx, dw, _ = K.lce_backward(x, W, None, y, lse, alpha, alpha, None, target_complement=q,
                                   ignore_index=-100, softcap=None, class_weight=None, need_dx=True,
                                   need_dw=True, need_db=False, skip_threshold=None if t is None else t / N,
                                   dw_dtype=dtype, stats=stats, **kw)
        rows.append(dict(variant=name, dropped_tiles=1 - stats["tiles_kept"] / stats["tiles"],
                         dx_err=err(dx, x64.grad), dW_err=err(dw, W64.grad),
                         seconds=round(time.perf_counter() - t0, 1)))
        print(rows[-1], flush=True)
    for r in rows:
        r["shape"] = f"{N}x{D}x{V} {dtype} on {dev}"
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256, help="tokens N per shape (per-tile statistics do not "
                    "depend on it)")
    ap.add_argument("--quick", action="store_true", help="one tiny shape (a self-check of this script)")
    ap.add_argument("--seed", type=int, default=None, help="data seed (default: fresh)")
    ap.add_argument("--kernels", action="store_true", help="run the Triton kernels (see the docstring)")
    ap.add_argument("--dim", type=int, default=64, help="D for --kernels")
    ap.add_argument("--vocab", type=int, default=128256, help="V for --kernels")
    args = ap.parse_args(argv)
    if args.kernels:
        N, D, V = (128, 32, 8192) if args.quick else (args.rows, args.dim, args.vocab)
        seed = args.seed if args.seed is not None else int(time.time()) % 100_000
        rows = run_kernels(N, D, V, seed)
        print_table(rows, ["shape", "variant", "dropped_tiles", "dx_err", "dW_err", "seconds"],
                    title="the kernels against float64 (trained-LM-like data, 128 x 128 tiles)")
        write_json("skip_accuracy_kernels_quick" if args.quick else "skip_accuracy_kernels",
                   {"seed": seed, "table": rows})
        return rows
    shapes = QUICK_SHAPES if args.quick else SHAPES
    N = 128 if args.quick else args.rows
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    results, rows = [], []
    for i, (name, D, V) in enumerate(shapes):
        t0 = time.perf_counter()
        x, W, y = _lm_data.make_lm_inputs(N, D, V, seed + i)
        naive = naive_gradients(x, W, y)
        shape = f"{N}x{D}x{V} ({name})"
        naive_row = None
        for ordering, variants in VARIANTS.items():
            # CCE's ordering: the vocabulary sorted by the batch's average logit
            order = None if ordering == "natural" else torch.argsort(x.double().mean(0) @ W.double().t())
            r = measure(x, W, y, naive, variants, order)
            r.update(shape=shape, ordering=ordering)
            results.append(r)
            base = dict(shape=shape, order=ordering)
            if naive_row is None:
                naive_row = dict(base, variant="naive PyTorch", gx_err=r["naive_gx_err"], gW_err=r["naive_gW_err"],
                                 loss_err=r["naive_loss_err"])
                rows.append(naive_row)
            for k, (t, _, dt) in variants.items():
                row = dict(base, variant=k, delta_dtype=str(dt).replace("torch.", ""), gx_err=r[f"{k}_gx_err"],
                           gW_err=r[f"{k}_gW_err"])
                if t is not None:
                    kept = 1 - r[f"{k}_dropped_tiles"]
                    row.update(threshold=_threshold(t, V), dropped_tiles=r[f"{k}_dropped_tiles"],
                               dropped_mass=r[f"{k}_dropped_mass_per_row"],
                               predicted_time_over_floor=(2 + 2 * kept) / 3)
                rows.append(row)
        for row in rows:
            if row["shape"] == shape:
                row["gx / naive"] = row["gx_err"] / naive_row["gx_err"]
                row["gW / naive"] = row["gW_err"] / naive_row["gW_err"]
        print(f"{shape}: {time.perf_counter() - t0:.1f} s", flush=True)
    print_table(rows, ["shape", "order", "variant", "delta_dtype", "threshold", "dropped_tiles", "dropped_mass",
                       "gx_err", "gx / naive", "gW_err", "gW / naive", "predicted_time_over_floor", "loss_err"],
                title="||a - ref|| / ||ref|| against float64 (bf16 inputs, lm data, 128 x 128 tiles)")
    write_json("skip_accuracy_cpu_quick" if args.quick else "skip_accuracy_cpu",
               {"seed": seed, "rows": N, "tile": TILE, "variants": {o: {k: [str(a) for a in v] for k, v in d.items()}
                                                                   for o, d in VARIANTS.items()}, "table": rows,
                "results": results})
    return rows


if __name__ == "__main__":
    main()

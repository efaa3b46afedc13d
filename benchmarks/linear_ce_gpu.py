#!/usr/bin/env python3
"""Fused linear + cross-entropy on one GPU: softxent's Triton kernels against the peers, in one run.

Work: ``loss = mean_i CE(softmax(x_i W^T), y_i)``, forward + backward (gradients for x (N, D) and W (V, D)),
bf16 inputs, no bias, at (N, D, V) = (8192, 4096, 128256) [Llama-3 8B head], (16384, 2304, 256000)
[Gemma-2 2B-like], (4096, 4096, 32000).  Contenders (each row independent: a failure is recorded as an
error row and the run goes on):

  gemm3             the three bare bf16 products x@W^T, G@W, G^T@x (torch.mm, out=): the floor
  naive             F.cross_entropy((x @ W.t()).float(), y)                         (autograd)
  compiled          torch.compile of naive (dynamic=False, default mode)
  liger             liger_kernel LigerFusedLinearCrossEntropyLoss()(W, x, y)
  cce               cut_cross_entropy.linear_cross_entropy(x, W, y, impl="cce")   (its default filter)
  softxent          softxent.torch.linear_cross_entropy(x, W, y, impl="triton")   (exact; default
                    backward workspace 96 MiB, dx's low half in dW's tail: under 0.1 GiB extra;
                    float16 deltas, the products converting W / x to float16 in registers)
  softxent_bf16delta  the kernels directly with delta_dtype=bf16: what the float16 deltas' conversion costs
  softxent_skipauto the API with skip_threshold='auto' (eps(bf16) * 1024 / V; opt-in, approximate;
                    sorted vocabulary, skipped tiles replaced by their first-order part)
  softxent_skip     the same at CCE's threshold eps(bf16)/32
  softxent_ws256m   the same, exact, with a 256 MiB workspace (max_chunk_bytes): more memory, fewer
                    re-reads of the dx accumulator (what the default pays for its 0.1 GiB)
  softxent_kernels  the kernels called directly (lce_forward / lce_backward, alpha = beta = 1/N)
  builtin           PyTorch's F.linear_cross_entropy(x, W, y, options=LinearCrossEntropyOptions())
                    (torch >= 2.13; its chunked path with the defaults: 'compact', aspect_ratio:2 in bf16)
  builtin_balanced  the same with acc_policy='balanced'; builtin_accurate with acc_policy='accurate'
                    (the table's best built-in row is the fastest of the three)
If softxent.torch does not import, the softxent rows call the kernels directly (the row's api says so).
With a torch that has no built-in, its rows read "unavailable: not available in torch X".

Data ("lm", trained-LM-like, as in ../shared/reference/gpu-anchors.md): logit_ij = prior_j + kappa_i
[j == t_i] + noise, with a Zipf prior (exponent 1.2) over a random frequency ranking riding on x[:, 0],
kappa ~ U(0, 24), and targets drawn from the model's own softmax (Gumbel-max): a peaked softmax, loss
about 2.6 nats.  Correctness: first a gate on a small problem (N=1024, D=512, V=5003; the kernels with
bias, softcap, ignore_index too) against float64, and the API's issue-17 options through the Triton
kernels (probability targets with smoothing, class weights, z-loss and softcap; a differentiable
return_lse; return_z_loss; return_accuracy) against float64 from the same operands; then every row against a float64 reference computed
from the same bf16 operands: errors ||a - ref|| / ||ref|| of loss, grad x, grad W.  Timing: CUDA events
around one fwd+bwd (grads reset outside), contenders alternated round after round (A B C A B C ...),
median.  Memory: ``max_memory_allocated`` during one call minus the allocation before it (x, W, y and
the reference resident) minus the bytes of x.grad and W.grad: the extra beyond inputs and gradients.
Before the shapes, a short tuning pass times a few tile configurations of the kernels at the first shape
and keeps the fastest (``--no-tune`` to skip).

Run, from the repository root.  The GPU machine has no network: fetch the peers' wheels beforehand on one
that has (benchmarks/out/ is git-ignored; carry it to the GPU machine), then run one command there::

    python -m pip download --no-deps -d benchmarks/out/wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1
    python -m pip install -q --no-index --no-deps benchmarks/out/wheels/*.whl; \\
        PYTHONPATH=src python benchmarks/linear_ce_gpu.py

(``;``, not ``&&``: without the wheels the peers become error rows and everything else still runs.)  It
takes about 5-7 minutes on an H100 (soft budget ``--budget-s 450``: no row starts later; a watchdog
stops the run at ``--hard-s 570`` and keeps what was measured).  Results: a table per shape with the
card's name, and ``benchmarks/out/linear_ce_gpu.json`` (also copied to ``$OUT/`` when OUT is set),
written after every row (``linear_ce_gpu_quick.json`` with ``--quick``).

``--quick``: tiny shapes (and no tuning).  Without a CUDA device, ``--quick`` runs the same code on the
CPU with Triton's interpreter (float16, tiny shapes, CPU timings meaningless) as a self-check of this
script, and exits 0; without ``--quick`` it prints "no CUDA device" and exits 0 having measured nothing.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path

T0 = time.time()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _lm_data  # noqa: E402
from _harness import print_table, write_json  # noqa: E402

NAME = "linear_ce_gpu"
SHAPES = [("llama3-8b-head", 8192, 4096, 128256), ("gemma2-2b-like", 16384, 2304, 256000),
          ("small-32k", 4096, 4096, 32000)]
QUICK_SHAPES = [("quick-a", 1024, 256, 5003), ("quick-b", 768, 128, 32000)]
CPU_SHAPES = [("cpu-tiny", 32, 16, 101)]
IMPLS = ["gemm3", "softxent", "naive", "compiled", "liger", "cce", "builtin", "builtin_balanced",
         "builtin_accurate", "softxent_skipauto", "softxent_skip", "softxent_bf16delta", "softxent_kernels",
         "softxent_ws256m"]
BUILTIN_OPTIONS = {"builtin": {}, "builtin_balanced": {"acc_policy": "balanced"},
                   "builtin_accurate": {"acc_policy": "accurate"}}
PEERS = ("naive", "compiled", "liger", "cce", *BUILTIN_OPTIONS)


class Unavailable(RuntimeError):
    """A contender this environment cannot run (recorded as an 'unavailable' row, not an error)."""

R = {"meta": {}, "gate": {}, "tuning": {}, "problems": [], "rows": [], "notes": [], "status": "running"}
_LOCK = threading.Lock()
CUR = {"what": "start"}


def el():
    return time.time() - T0


def log(msg):
    print(f"[{el():6.1f}s] {msg}", flush=True)


def save(final=False):
    """benchmarks/out/linear_ce_gpu.json, atomically: quietly after every row, through the harness's
    write_json at the end; and a copy under $OUT (what comes back from a GPU machine)."""
    import json

    import _harness

    with _LOCK:
        R["elapsed_s"] = round(el(), 1)
        try:
            if final:
                path = write_json(NAME, R)
            else:
                if "machine" not in _MACHINE:
                    _MACHINE["machine"] = _harness.machine_info()
                _harness.OUT_DIR.mkdir(parents=True, exist_ok=True)
                path = _harness.OUT_DIR / f"{NAME}.json"
                tmp = path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps({"machine": _MACHINE["machine"], **R}, indent=2, default=str))
                os.replace(tmp, path)
            out = os.environ.get("OUT")
            if out:
                os.makedirs(out, exist_ok=True)
                tmp = os.path.join(out, f".{NAME}.json.tmp")
                shutil.copyfile(path, tmp)
                os.replace(tmp, os.path.join(out, f"{NAME}.json"))
        except Exception as e:  # bookkeeping never kills the run
            print(f"(could not write results: {e!r})", flush=True)


_MACHINE: dict = {}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, no tuning (CPU: interpreter self-check)")
    p.add_argument("--budget-s", type=float, default=450.0, help="no row starts after this many seconds")
    p.add_argument("--hard-s", type=float, default=570.0, help="watchdog: stop and keep results")
    p.add_argument("--shapes", default="", help="comma list of shape names to run (default all)")
    p.add_argument("--impls", default="", help="comma list of contenders (default all)")
    p.add_argument("--rounds", type=int, default=0, help="timing rounds (default 7, quick 3)")
    p.add_argument("--no-tune", action="store_true", help="skip the tile-configuration tuning pass")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.quick:  # a self-check must not overwrite a real run's results
    NAME = "linear_ce_gpu_quick"

try:
    import torch
    import torch.nn.functional as F
except Exception as e:  # pragma: no cover
    print(f"{NAME}: cannot import torch ({e!r}); nothing measured.")
    sys.exit(0)

CUDA = torch.cuda.is_available()
if not CUDA:
    if not ARGS.quick:
        print(f"{NAME}: no CUDA device visible (torch.cuda.is_available() is False); this benchmark needs "
              "one NVIDIA GPU and measured nothing.  (--quick runs a tiny CPU self-check of the script "
              "under Triton's interpreter instead.)", flush=True)
        sys.exit(0)
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are imported
DEV = torch.device("cuda" if CUDA else "cpu")
DT = torch.bfloat16 if CUDA else torch.float16  # the interpreter's bf16 dot is broken (peers' kernels)
REF_DT = torch.float64
if not CUDA:
    SHAPES = CPU_SHAPES
elif ARGS.quick:
    SHAPES = QUICK_SHAPES
if ARGS.shapes:
    SHAPES = [s for s in SHAPES if s[0] in ARGS.shapes.split(",")]
if ARGS.impls:
    IMPLS = [i for i in IMPLS if i in ARGS.impls.split(",")]
if not CUDA:
    IMPLS = [i for i in IMPLS if i != "compiled"]  # inductor on CPU needs a compiler and minutes
ROUNDS = ARGS.rounds or (7 if not ARGS.quick else 3 if CUDA else 2)


# ----------------------------------------------------------------------------------------------------
# environment and optional imports
# ----------------------------------------------------------------------------------------------------
def _version(dist):
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception as e:
        return f"unknown ({type(e).__name__})"


meta = R["meta"]
meta.update(torch=torch.__version__, torch_cuda=torch.version.cuda, dtype=str(DT), device=str(DEV),
            quick=ARGS.quick, shapes=[s[0] for s in SHAPES], impls=IMPLS, rounds=ROUNDS,
            data="lm: Zipf(1.2) prior over a random ranking + intended target (kappa ~ U(0, 24)) + N(0,1) "
                 "noise; targets ~ model softmax (Gumbel-max)",
            memory=("extra = max_memory_allocated during one fwd+bwd - memory_allocated before it (inputs, "
                    "targets, reference resident; grads None) - bytes(x.grad) - bytes(W.grad)"),
            errors="||a - ref|| / ||ref|| against float64 from the same bf16 operands",
            timing="CUDA events, one fwd+bwd per sample, contenders alternated per round, median")
try:
    import triton
    meta["triton"] = triton.__version__
except Exception as e:
    triton = None
    meta["triton"] = f"import failed: {e!r}"
if CUDA:
    props = torch.cuda.get_device_properties(0)
    meta.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                gpu_mem_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
else:
    meta["gpu"] = "none (CPU self-check under TRITON_INTERPRET=1)"


def _import_kernels():
    """softxent's kernel module: through the package, or straight from its file when the package's own
    imports fail on this machine (the kernels need only torch and triton)."""
    try:
        from softxent.torch import _triton_kernels
        return _triton_kernels, "softxent.torch._triton_kernels"
    except Exception as e:
        first = f"{type(e).__name__}: {e}"
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
        try:
            from softxent.torch import _triton_kernels
            return _triton_kernels, "softxent.torch._triton_kernels (src/ added to sys.path)"
        except Exception as e:
            first = f"{type(e).__name__}: {e}"
    path = ROOT / "src" / "softxent" / "torch" / "_triton_kernels.py"
    spec = importlib.util.spec_from_file_location("softxent_triton_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, f"{path} loaded by file (package import failed: {first})"


KERNELS = API = None
try:
    KERNELS, meta["kernels_import"] = _import_kernels()
except Exception as e:
    meta["kernels_import"] = f"failed: {type(e).__name__}: {e}"
try:
    from softxent.torch import linear_cross_entropy as API
    meta["api_import"] = "softxent.torch.linear_cross_entropy"
except Exception as e:
    meta["api_import"] = f"failed ({type(e).__name__}: {e}); softxent rows call the kernels directly"

LIGER = {}
try:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    LIGER.update(api="liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss()(W, x, y)",
                 version=_version("liger-kernel"))
except Exception as e:  # e.g. a broken optional import inside liger_kernel.transformers: use its Function
    LIGER["module_error"] = f"{type(e).__name__}: {e}"
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
            """liger-kernel 0.8.5's module.forward with its defaults (mean, ignore_index -100)."""

            def forward(self, lin_weight, _input, target):
                return LigerFusedLinearCrossEntropyFunction.apply(
                    _input, lin_weight, target, None, None, -100, 0.0, 0.0, "mean", None, False, None, False,
                    False, False, None, None)[0]

        LIGER.update(api="liger_kernel.ops LigerFusedLinearCrossEntropyFunction.apply (module import failed)",
                     version=_version("liger-kernel"))
    except Exception as e2:
        LIGER["error"] = f"{type(e2).__name__}: {e2}"
meta["liger"] = LIGER
CCE = {}
try:
    from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy
    CCE.update(api="cut_cross_entropy.linear_cross_entropy(x, W, y, impl='cce')",
               version=_version("cut-cross-entropy"))
except Exception as e:
    CCE["error"] = f"{type(e).__name__}: {e}"
meta["cce"] = CCE


def sync():
    if CUDA:
        torch.cuda.synchronize()


def nbytes(t):
    return 0 if t is None else t.numel() * t.element_size()


def cleanup():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def print_results():
    cols = ["impl", "ms", "x_floor", "x_best_peer", "extra_gib", "loss_err", "gx_err", "gW_err", "first_s",
            "status"]
    for prob in R["problems"]:
        rows = [r for r in R["rows"] if r["problem"] == prob["problem"]]
        floor = next((r.get("ms") for r in rows if r["impl"] == "gemm3" and r.get("ms")), None)
        peers = [r["ms"] for r in rows if r["impl"] in PEERS and r.get("ms")]
        best_peer = min(peers) if peers else None
        table = []
        for r in rows:
            ms = r.get("ms")
            table.append(dict(
                impl=r["impl"], ms=_f(ms, ".2f"), x_floor=_f(ms / floor if ms and floor else None, ".3f"),
                x_best_peer=_f(ms / best_peer if ms and best_peer else None, ".3f"),
                extra_gib=_f(r.get("extra_gib"), ".3f"), loss_err=_f(r.get("loss_err"), ".1e"),
                gx_err=_f(r.get("gx_err"), ".1e"), gW_err=_f(r.get("gW_err"), ".1e"),
                first_s=_f(r.get("first_call_s"), ".1f"),
                status=r["status"] + (f": {r.get('error', '')[:60]}" if r["status"] != "ok" else "")))
        print_table(table, cols, title=f"{meta.get('gpu')} -- {prob['problem']} N={prob['N']} D={prob['D']} "
                                       f"V={prob['V']} {meta['dtype']} (lm data, loss {prob['stats']['loss']:.3f})")
        print()


def _watchdog():
    while True:
        time.sleep(2.0)
        if el() > ARGS.hard_s:
            R["status"] = "aborted_by_watchdog"
            R["aborted"] = f"hard limit {ARGS.hard_s:.0f}s reached during {CUR['what']}; results so far kept"
            save(final=True)
            print("\n" + R["aborted"], flush=True)
            try:
                print_results()
            finally:
                os._exit(3)


threading.Thread(target=_watchdog, daemon=True).start()


# ----------------------------------------------------------------------------------------------------
# data and the float64 reference
# ----------------------------------------------------------------------------------------------------
def make_lm_inputs(N, D, V, seed):
    """Trained-LM-like (x, W, y) in DT on DEV (benchmarks/_lm_data.py; the module docstring)."""
    return _lm_data.make_lm_inputs(N, D, V, seed, device=DEV, dtype=DT)


def reference(x, W, y, bias=None, softcap=None, ignore_index=-100):
    """float64 mean CE loss and its gradients (grad x, grad W, grad b) from the same operands, chunked
    over rows, plus data statistics: mean max-probability, entropy, and the fraction of 128 x 128 tiles
    (natural vocabulary order) the skip rule 'every p < eps(bf16)/32 and no target' would drop."""
    N, D = x.shape
    V = W.shape[0]
    eps = torch.finfo(torch.bfloat16).eps / 32
    with torch.no_grad():
        Wr, xr = W.to(REF_DT), x.to(REF_DT)
        br = None if bias is None else bias.to(REF_DT)
        gW, gx = torch.zeros_like(Wr), torch.empty_like(xr)
        gb = None if bias is None else torch.zeros(V, dtype=REF_DT, device=x.device)
        valid = y != ignore_index
        n = max(int(valid.sum()), 1)
        rows = max(128, (2**27 // V) // 128 * 128)
        loss = ent = pmax = 0.0
        tiles = kept = 0
        for i in range(0, N, rows):
            xc, yc, vc = xr[i:i + rows], y[i:i + rows], valid[i:i + rows]
            m = xc.shape[0]
            z = xc @ Wr.t()
            if br is not None:
                z += br
            dcap = None
            if softcap is not None:
                t = torch.tanh(z / softcap)
                z = softcap * t
                dcap = 1 - t * t
                del t
            lse = torch.logsumexp(z, 1)
            yi = torch.where(vc, yc, 0)
            loss += float(((lse - z.gather(1, yi[:, None])[:, 0]) * vc).sum())
            p = z.sub_(lse[:, None]).exp_()
            ent += float((torch.special.entr(p).sum(1) * vc).sum())
            pmax += float((p.max(1).values * vc).sum())
            small = p < eps
            small[torch.arange(m, device=x.device), yi] &= ~vc
            pad_m, pad_v = (-m) % 128, (-V) % 128
            blk = F.pad((~small).to(torch.uint8), (0, pad_v, 0, pad_m)).view(
                (m + pad_m) // 128, 128, (V + pad_v) // 128, 128).amax(dim=(1, 3))
            tiles += blk.numel()
            kept += int(blk.sum())
            del small, blk
            p[torch.arange(m, device=x.device)[vc], yc[vc]] -= 1.0
            p *= vc[:, None].to(REF_DT) / n
            if dcap is not None:
                p *= dcap
                del dcap
            gx[i:i + m] = p @ Wr
            gW.addmm_(p.t(), xc)
            if gb is not None:
                gb += p.sum(0)
            del z, p, lse
        stats = dict(loss=loss / n, entropy=ent / n, mean_pmax=pmax / n, skippable_tile_frac=1 - kept / tiles)
        ref = dict(loss=loss / n, gx=gx.float(), gW=gW.float(), gb=None if gb is None else gb.float())
        del Wr, xr, gW, gx
    return ref, stats


def rel(a, b):
    if a is None or b is None:
        return None
    bf = b.float()
    return float((a.float() - bf).norm() / bf.norm())


# ----------------------------------------------------------------------------------------------------
# contenders
# ----------------------------------------------------------------------------------------------------
class DirectKernels(torch.autograd.Function):
    """Mean CE through lce_forward / lce_backward with alpha = beta = 1/n (n = non-ignored rows)."""

    @staticmethod
    def forward(ctx, x, W, bias, y, softcap, skip_eps, workspace, delta_dtype):
        lse, zt, _, q = KERNELS.lce_forward(x, W, bias, y, ignore_index=-100, softcap=softcap,
                                            class_weight=None, need_weighted_sum=False,
                                            need_target_complement=True)
        valid = (y != -100).float()
        n = valid.sum().clamp(min=1.0)
        ctx.save_for_backward(x, W, bias, y, lse, valid, n, q)
        ctx.opts = (softcap, skip_eps, workspace, delta_dtype)
        return ((lse - zt) * valid).sum() / n

    @staticmethod
    def backward(ctx, g):
        x, W, bias, y, lse, valid, n, q = ctx.saved_tensors
        softcap, skip_eps, workspace, delta_dtype = ctx.opts
        coef = (valid * (g.float() / n)).contiguous()
        skip = None if skip_eps is None else (skip_eps * coef.abs().amax()).reshape(1)  # read on the device
        dx, dw, db = KERNELS.lce_backward(
            x, W, bias, y, lse, coef, coef, None, target_complement=q, ignore_index=-100, softcap=softcap,
            class_weight=None, need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1],
            need_db=bias is not None and ctx.needs_input_grad[2], skip_threshold=skip,
            workspace_bytes=workspace, dw_dtype=W.dtype, delta_dtype=delta_dtype)
        return dx, dw, (None if db is None else db.to(bias.dtype)), None, None, None, None, None


def bf16_delta(x):
    """delta_dtype=bfloat16 where the inputs are bfloat16 (the kernels' default there is float16); the
    default (None) otherwise: the CPU self-check's float16 inputs have float16 deltas only."""
    return torch.bfloat16 if x.dtype == torch.bfloat16 else None


def direct(x, W, y, bias=None, softcap=None, skip_eps=None, workspace=None, delta_dtype=None):
    return DirectKernels.apply(x, W, bias, y, softcap, skip_eps, workspace, delta_dtype)


def naive_loss(x, W, y):
    return F.cross_entropy((x @ W.t()).float(), y)


_COMPILED = {}
_LIGER = {}
SKIP_EPS = float(torch.finfo(torch.bfloat16).eps) / 32
WS_256M = 256 * 2**20


def get_impl(name, x, W, y):
    """(closure computing the loss, api string) for one contender."""
    if name == "naive":
        return (lambda: naive_loss(x, W, y)), "F.cross_entropy((x @ W.t()).float(), y)"
    if name == "compiled":
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(naive_loss, dynamic=False)
        fn = _COMPILED["fn"]
        return (lambda: fn(x, W, y)), "torch.compile(naive, dynamic=False)"
    if name == "liger":
        if "api" not in LIGER:
            raise RuntimeError(f"liger-kernel unavailable: {LIGER.get('error')}")
        mod = _LIGER.setdefault("m", LigerFusedLinearCrossEntropyLoss())
        return (lambda: mod(W, x, y)), LIGER["api"]
    if name == "cce":
        if "api" not in CCE:
            raise RuntimeError(f"cut-cross-entropy unavailable: {CCE.get('error')}")
        return (lambda: cce_linear_cross_entropy(x, W, y, impl="cce")), CCE["api"]
    if name in BUILTIN_OPTIONS:
        if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
            raise Unavailable(f"not available in torch {torch.__version__}")
        opts = torch.nn.LinearCrossEntropyOptions(**BUILTIN_OPTIONS[name])
        return ((lambda: F.linear_cross_entropy(x, W, y, options=opts)),
                f"F.linear_cross_entropy(x, W, y, options=LinearCrossEntropyOptions(**{BUILTIN_OPTIONS[name]}))")
    if name.startswith("softxent"):
        if KERNELS is None:
            raise RuntimeError(f"softxent kernels unavailable: {meta['kernels_import']}")
        skip = {"softxent_skip": SKIP_EPS,
                "softxent_skipauto": KERNELS.auto_skip_threshold(x.dtype, W.shape[0])}.get(name)
        ws = WS_256M if name == "softxent_ws256m" else None
        if name == "softxent_bf16delta":
            dd = bf16_delta(x)
            return ((lambda: direct(x, W, y, delta_dtype=dd)),
                    f"kernels direct (lce_forward/lce_backward), delta_dtype={dd}")
        if name != "softxent_kernels" and API is not None:
            kw = dict(impl="triton")
            if skip is not None:
                kw["skip_threshold"] = "auto" if name == "softxent_skipauto" else skip
            if ws is not None:
                kw["max_chunk_bytes"] = ws
            return (lambda: API(x, W, y, **kw)), f"softxent.torch.linear_cross_entropy(x, W, y, {kw})"
        return ((lambda: direct(x, W, y, skip_eps=skip, workspace=ws)),
                f"kernels direct (lce_forward/lce_backward), skip_eps={skip}, workspace={ws}")
    raise ValueError(name)


# ----------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------
def time_once(step, reset):
    reset()
    sync()
    if CUDA:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        step()
        e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1)
    t = time.perf_counter()
    step()
    return (time.perf_counter() - t) * 1e3


def median(v):
    s = sorted(v)
    k = len(s)
    return None if k == 0 else (s[k // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2]))


def check_row(row, fn, ctx):
    """One fwd+bwd for memory and errors (after the first call, so no compile buffers are counted)."""
    x, W = ctx["x"], ctx["W"]
    x.grad = W.grad = None
    cleanup()
    sync()
    if CUDA:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    loss = fn()
    loss.backward()
    sync()
    if CUDA:
        peak = torch.cuda.max_memory_allocated()
        row["extra_gib"] = (peak - base - nbytes(x.grad) - nbytes(W.grad)) / 2**30
        row["peak_delta_gib"] = (peak - base) / 2**30
    ref = ctx["ref"]
    lv = float(loss.detach().float())
    row.update(loss=lv, loss_err=abs(lv - ref["loss"]) / abs(ref["loss"]), gx_err=rel(x.grad, ref["gx"]),
               gW_err=rel(W.grad, ref["gW"]), grad_dtypes=[str(getattr(x.grad, "dtype", None)),
                                                           str(getattr(W.grad, "dtype", None))])
    x.grad = W.grad = None


def first_call(name, ctx):
    """Build the contender, run it once (JIT / compile) and check it; returns its step or None."""
    row = dict(problem=ctx["problem"], impl=name, N=ctx["N"], D=ctx["D"], V=ctx["V"], status="ok")
    R["rows"].append(row)
    CUR["what"] = f"{ctx['problem']}/{name}"
    x, W, y = ctx["x"], ctx["W"], ctx["y"]
    try:
        if name == "gemm3":
            xd, Wd = x.detach(), W.detach()
            z = torch.empty(ctx["N"], ctx["V"], device=DEV, dtype=DT)
            gx, gW = torch.empty_like(xd), torch.empty_like(Wd)

            def step():
                torch.mm(xd, Wd.t(), out=z)
                torch.mm(z, Wd, out=gx)
                torch.mm(z.t(), xd, out=gW)

            row["api"] = "torch.mm x3 (bf16, out=): x@W^T, Z@W, Z^T@x -- no softmax, no autograd"
            t = time.perf_counter()
            step()
            sync()
            row["first_call_s"] = time.perf_counter() - t
            ctx["gemm3_bufs"] = (z, gx, gW)
            return step
        fn, row["api"] = get_impl(name, x, W, y)

        def step():
            fn().backward()

        t = time.perf_counter()
        x.grad = W.grad = None
        step()
        sync()
        row["first_call_s"] = time.perf_counter() - t
        try:
            check_row(row, fn, ctx)
        except Exception as e:
            row["check_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        return step
    except Unavailable as e:
        row.update(status="unavailable", error=str(e))
        return None
    except Exception as e:
        row.update(status="error", error=f"{type(e).__name__}: {str(e)[:600]}",
                   traceback_tail=traceback.format_exc()[-2000:])
        return None
    finally:
        x.grad = W.grad = None
        cleanup()
        save()
        log(f"{ctx['problem']}/{name}: {row['status']} first {_f(row.get('first_call_s'), '.1f')}s "
            f"extra {_f(row.get('extra_gib'), '.3f')} GiB loss_err {_f(row.get('loss_err'), '.1e')} "
            f"gx_err {_f(row.get('gx_err'), '.1e')} gW_err {_f(row.get('gW_err'), '.1e')} "
            f"{row.get('error', '')[:200]}")


def run_shape(name, N, D, V, seed):
    CUR["what"] = f"{name}/inputs+reference"
    t = time.time()
    x, W, y = make_lm_inputs(N, D, V, seed)
    ref, stats = reference(x, W, y)
    sync()
    prob = dict(problem=name, N=N, D=D, V=V, stats=stats, setup_s=round(time.time() - t, 1))
    R["problems"].append(prob)
    log(f"{name} N={N} D={D} V={V}: inputs + float64 reference {prob['setup_s']}s | "
        + " ".join(f"{k}={v:.4g}" for k, v in stats.items()))
    x.requires_grad_(True)
    W.requires_grad_(True)
    ctx = dict(problem=name, N=N, D=D, V=V, x=x, W=W, y=y, ref=ref)
    if KERNELS is not None:  # plan and tile-skip statistics of our backward (one extra backward each)
        try:
            with torch.no_grad():
                lse = KERNELS.lce_forward(x.detach(), W.detach(), None, y, ignore_index=-100, softcap=None,
                                          class_weight=None, need_weighted_sum=False)[0]
                coef = torch.full((N,), 1.0 / N, device=DEV)
                for key, ws, skip in (("default", None, None), ("ws256m", WS_256M, None),
                                      ("skip", None, SKIP_EPS / N),
                                      ("skipauto", None, KERNELS.auto_skip_threshold(x.dtype, V) / N)):
                    st = {}
                    KERNELS.lce_backward(x.detach(), W.detach(), None, y, lse, coef, coef, None,
                                         ignore_index=-100, softcap=None, class_weight=None, need_dx=True,
                                         need_dw=True, need_db=False, skip_threshold=skip, workspace_bytes=ws,
                                         dw_dtype=W.dtype, stats=st)
                    prob[f"softxent_plan_{key}"] = dict(rows=st["plan"].rows, cols=st["plan"].cols,
                                                        workspace_mib=st["plan"].workspace_bytes / 2**20,
                                                        traffic_gb=st["plan"].traffic_bytes / 1e9,
                                                        lo_in_dw=st["plan"].lo_in_dw,
                                                        recompute_cols=st["plan"].recompute_cols,
                                                        tiles=st["tiles"], tiles_kept=st["tiles_kept"])
                del lse
            log(f"{name}: softxent plans {[(k, v) for k, v in prob.items() if k.startswith('softxent_plan')]}")
        except Exception as e:
            prob["softxent_plan_error"] = f"{type(e).__name__}: {e}"
        cleanup()
    save()
    steps = {}
    for impl in IMPLS:
        if el() > ARGS.budget_s:
            R["rows"].append(dict(problem=name, impl=impl, status="skipped", error="time budget"))
            continue
        st = first_call(impl, ctx)
        if st is not None:
            steps[impl] = st
    # alternate the contenders round after round; median per contender
    times = {k: [] for k in steps}

    def reset():
        x.grad = W.grad = None

    for _ in range(ROUNDS):
        if el() > ARGS.budget_s:
            R["notes"].append(f"{name}: timing rounds cut by the time budget")
            break
        for impl, st in steps.items():
            CUR["what"] = f"{name}/{impl}/timing"
            try:
                times[impl].append(time_once(st, reset))
            except Exception as e:
                row = next(r for r in R["rows"] if r["problem"] == name and r["impl"] == impl)
                row.update(status="error", error=f"timing: {type(e).__name__}: {str(e)[:400]}")
    for impl, ts in times.items():
        row = next(r for r in R["rows"] if r["problem"] == name and r["impl"] == impl)
        if ts and row["status"] == "ok":
            row.update(ms=median(ts), ms_min=min(ts), ms_max=max(ts), n=len(ts), times_ms=[round(t, 3) for t in ts],
                       tflops=6.0 * N * D * V / (median(ts) * 1e-3) / 1e12)
    reset()
    ctx.clear()
    cleanup()
    save()


# ----------------------------------------------------------------------------------------------------
# correctness gate and tuning
# ----------------------------------------------------------------------------------------------------
def gate_bitwise(x, W, y):
    """No atomics, so the backward is reproducible bit for bit; and dx's low half borrowed from dW's tail
    (lo_in_dw, the default plan at the LLM shapes) gives the same bits as the workspace path."""
    out = {}
    try:
        lse, _, _, q = KERNELS.lce_forward(x, W, None, y, ignore_index=-100, softcap=None, class_weight=None,
                                           need_weighted_sum=False, need_target_complement=True)
        coef = ((y != -100).float() / max(1, int((y != -100).sum()))).contiguous()
        runs = {}
        for key, lo in (("a", False), ("b", False), ("lo_in_dw", True)):
            runs[key] = KERNELS.lce_backward(
                x, W, None, y, lse, coef, coef, None, target_complement=q, ignore_index=-100, softcap=None,
                class_weight=None, need_dx=True, need_dw=True, need_db=False, dw_dtype=W.dtype,
                chunk_shape=(x.shape[0], 1024 if CUDA else 32), lo_in_dw=lo)
        same = lambda r, s_: all(torch.equal(u, v) for u, v in zip(r[:2], s_[:2]))  # noqa: E731
        out = dict(repeat_equal=same(runs["a"], runs["b"]), lo_in_dw_equal=same(runs["a"], runs["lo_in_dw"]))
    except Exception as e:
        out = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    return out


def _soft_targets(N, V, seed):
    """Probability targets (N, V) float32: a peaked softmax with ~20 % exact zeros, rows' mass in
    [0.5, 1.5] (distillation-like; rows need not sum to 1)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    p = torch.softmax(3 * torch.randn(N, V, device=DEV, generator=g), dim=1)
    p = p * (torch.rand(N, V, device=DEV, generator=g) > 0.2)
    return p * (0.5 + torch.rand(N, 1, device=DEV, generator=g))


def gate_options(x, W, y):
    """The API's issue-17 options through the Triton kernels, against float64 from the same operands:

    * ``soft``: probability targets with label_smoothing=0.1, class weights, z_loss=1e-3, softcap=30
      (loss, dx, dW); passes at <= 2x naive PyTorch's error (the same formula on its float32 logits of
      the bf16 product) + 1e-6;
    * ``lse``: ``loss + 0.1 mean(lse^2)`` from a differentiable return_lse (loss, dx, dW), the same rule;
    * ``z_loss``: return_z_loss against ``z mean_valid lse^2`` (relative error <= 1e-3);
    * ``accuracy``: return_accuracy against float64's argmax accuracy (within 2 / N: bf16 near-ties)."""
    out = {}
    N, V = x.shape[0], W.shape[0]
    x64, W64 = x.double(), W.double()
    z64 = x64 @ W64.t()
    valid = y != -100
    cw = (0.5 + 1.5 * torch.rand(V, device=DEV, generator=torch.Generator(device=DEV).manual_seed(3)))
    p = _soft_targets(N, V, seed=5)
    zl, cap = 1e-3, 30.0

    def soft_loss(z):       # float64 or float32 logits -> the soft-target loss with every option
        zc = cap * torch.tanh(z / cap)
        lse = torch.logsumexp(zc, dim=1)
        return F.cross_entropy(zc, p.to(z.dtype), weight=cw.to(z.dtype), label_smoothing=0.1) + zl * (lse ** 2).mean()

    def lse_loss(z):
        lse = torch.logsumexp(z, dim=1)
        return F.cross_entropy(z, y) + 0.1 * (lse[valid] ** 2).sum() / N

    def errors_vs(ref_fn, ours_fn, naive_fn):
        """Relative errors of ours and naive (loss, dx, dW) against float64, and the 2x-naive rule."""
        res = {}
        for name, fn in (("ref", ref_fn), ("ours", ours_fn), ("naive", naive_fn)):
            xx = (x64 if name == "ref" else x).clone().requires_grad_(True)
            WW = (W64 if name == "ref" else W).clone().requires_grad_(True)
            loss = fn(xx, WW)
            loss.backward()
            res[name] = (float(loss.detach()), xx.grad, WW.grad)
        ref = res["ref"]
        row = {}
        for name in ("ours", "naive"):
            lv, gx, gW = res[name]
            row[f"{name}_loss_err"] = abs(lv - ref[0]) / abs(ref[0])
            row[f"{name}_gx_err"], row[f"{name}_gW_err"] = rel(gx, ref[1]), rel(gW, ref[2])
        row["pass"] = all(row[f"ours_{k}_err"] <= 2 * row[f"naive_{k}_err"] + 1e-6 for k in ("loss", "gx", "gW"))
        return row

    try:
        out["soft"] = errors_vs(
            lambda xx, WW: soft_loss(xx @ WW.t()),
            lambda xx, WW: API(xx, WW, p, label_smoothing=0.1, class_weight=cw, z_loss=zl, softcap=cap,
                               impl="triton"),
            lambda xx, WW: soft_loss((xx @ WW.t()).float()))
    except Exception as e:
        out["soft"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")

    def api_lse_loss(xx, WW):
        loss, lse = API(xx, WW, y, return_lse=True, impl="triton")
        return loss + 0.1 * (lse[valid] ** 2).sum() / N

    try:
        out["lse"] = errors_vs(lambda xx, WW: lse_loss(xx @ WW.t()), api_lse_loss,
                               lambda xx, WW: lse_loss((xx @ WW.t()).float()))
    except Exception as e:
        out["lse"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    try:
        with torch.no_grad():
            res = API(x, W, y, z_loss=zl, return_z_loss=True, return_accuracy=True, impl="triton")
            lse64 = torch.logsumexp(z64, dim=1)
            want_z = zl * float((lse64[valid] ** 2).mean())
            z_err = abs(float(res.z_loss) - want_z) / want_z
            out["z_loss"] = dict(z_loss_err=z_err, **{"pass": z_err <= 1e-3})
            want_acc = float((z64.argmax(dim=1) == y)[valid].double().mean())
            acc_err = abs(float(res.accuracy) - want_acc)
            out["accuracy"] = dict(accuracy=float(res.accuracy), want=want_acc, accuracy_abs_err=acc_err,
                                   **{"pass": acc_err <= 2.0 / N})
    except Exception as e:
        out["z_loss"] = out["accuracy"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    return out


def gate():
    """The kernels (and the API, also in the skip's sorted vocabulary order with nothing dropped) on a
    small problem with odd V against float64, with the options too; passes when every error is at most
    2x naive PyTorch's (+1e-6)."""
    CUR["what"] = "gate"
    N, D, V = (1024, 512, 5003) if CUDA else (32, 16, 61)
    g = R["gate"]
    try:
        x, W, y = make_lm_inputs(N, D, V, seed=7)
        y[::37] = -100
        bias = (0.5 * torch.randn(V, device=DEV)).to(DT)
        for label, b, cap in (("plain", None, None), ("bias+softcap30+ignore", bias, 30.0)):
            ref, _ = reference(x, W, y, bias=b, softcap=cap)
            res = {}
            for impl in ("naive", "kernels", "kernels_bf16delta", "api", "api_sorted"):
                xx, WW = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
                bb = None if b is None else b.clone().requires_grad_(True)
                try:
                    if impl == "naive":
                        z = (xx @ WW.t() + (0 if bb is None else bb)).float()
                        if cap is not None:
                            z = cap * torch.tanh(z / cap)
                        loss = F.cross_entropy(z, y, ignore_index=-100)
                    elif impl.startswith("kernels"):
                        loss = direct(xx, WW, y, bias=bb, softcap=cap,
                                      delta_dtype=bf16_delta(xx) if impl == "kernels_bf16delta" else None)
                    else:
                        if API is None:
                            continue
                        # api_sorted: the skip's vocabulary order with nothing dropped -- the gathered
                        # W rows, scattered dW rows and permuted bias / db must give the exact result
                        kw = dict(skip_threshold=1e-30) if impl == "api_sorted" else {}
                        loss = API(xx, WW, y, bias=bb, softcap=cap, impl="triton", **kw)
                    loss.backward()
                    res[impl] = dict(loss_err=abs(float(loss.detach()) - ref["loss"]) / abs(ref["loss"]),
                                     gx_err=rel(xx.grad, ref["gx"]), gW_err=rel(WW.grad, ref["gW"]),
                                     gb_err=rel(None if bb is None else bb.grad, ref["gb"]))
                except Exception as e:
                    res[impl] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            nv = res.get("naive", {})
            for impl in ("kernels", "kernels_bf16delta", "api", "api_sorted"):
                r = res.get(impl)
                if r is None or "error" in r or "error" in nv:
                    continue
                r["pass"] = all(r[k] is None or r[k] <= 2 * nv[k] + 1e-6 for k in r if k.endswith("_err"))
            g[label] = res
            log(f"gate {label}: " + "; ".join(
                f"{k}: " + (v["error"][:120] if "error" in v else
                            " ".join(f"{m}={v[m]:.1e}" for m in v if m.endswith("_err") and v[m] is not None)
                            + ("" if "pass" not in v else (" PASS" if v["pass"] else " FAIL")))
                for k, v in res.items()))
        if KERNELS is not None:
            g["bitwise"] = gate_bitwise(x, W, y)
            log(f"gate bitwise: {g['bitwise']}")
        if API is not None:
            g["options"] = gate_options(x, W, y)
            log("gate options: " + "; ".join(
                f"{k}: " + (v["error"][:160] if "error" in v else
                            " ".join(f"{m}={v[m]:.1e}" for m in v if m.endswith("_err") and v[m] is not None)
                            + (" PASS" if v.get("pass") else " FAIL"))
                for k, v in g["options"].items()))
        del x, W, y, bias
    except Exception as e:
        g["error"] = f"{type(e).__name__}: {e}"
        g["traceback_tail"] = traceback.format_exc()[-2000:]
        log(f"gate FAILED to run: {g['error']}")
    cleanup()
    save()


def tune(name, N, D, V):
    """Time a few tile configurations of each kernel at the first shape; keep the fastest."""
    if KERNELS is None:
        return
    CUR["what"] = "tuning"
    TC = KERNELS.TileConfig
    fwd_cands = [TC(128, 128, 64, 8, 8, 3), TC(128, 256, 64, 8, 8, 3), TC(128, 128, 64, 8, 4, 4),
                 TC(64, 256, 64, 8, 4, 4)]
    mm_cands = [TC(128, 128, 64, 8, 8, 3), TC(128, 256, 64, 8, 8, 3), TC(256, 128, 64, 8, 8, 3),
                TC(128, 128, 64, 8, 4, 4)]
    delta_cands = [TC(128, 128, 64, 8, 8, 3), TC(128, 256, 64, 8, 8, 3), TC(256, 128, 64, 8, 8, 3)]
    tr = R["tuning"]
    try:
        x, W, y = make_lm_inputs(N, D, V, seed=11)
        coef = torch.full((N,), 1.0 / N, device=DEV)

        def bench(fn, reps=3):
            fn()
            sync()
            ts = []
            for _ in range(reps):
                ts.append(time_once(fn, lambda: None))
            return median(ts)

        def fwd(cfg):
            return lambda: KERNELS.lce_forward(x, W, None, y, ignore_index=-100, softcap=None, class_weight=None,
                                               need_weighted_sum=False, config=cfg)

        lse = KERNELS.lce_forward(x, W, None, y, ignore_index=-100, softcap=None, class_weight=None,
                                  need_weighted_sum=False)[0]

        def bwd(delta, mm):
            return lambda: KERNELS.lce_backward(x, W, None, y, lse, coef, coef, None, ignore_index=-100,
                                                softcap=None, class_weight=None, need_dx=True, need_dw=True,
                                                need_db=False, dw_dtype=W.dtype,
                                                configs={"delta": delta, "matmul": mm})

        def pick(kind, cands, make):
            best, best_ms = cands[0], None
            tr[kind] = []
            for c in cands:
                if el() > ARGS.budget_s * 0.3:
                    tr[kind].append(dict(config=str(c), skipped="tuning budget"))
                    continue
                try:
                    ms = bench(make(c))
                    tr[kind].append(dict(config=str(c), ms=ms))
                    if best_ms is None or ms < best_ms:
                        best, best_ms = c, ms
                except Exception as e:
                    tr[kind].append(dict(config=str(c), error=f"{type(e).__name__}: {str(e)[:200]}"))
                cleanup()
            log(f"tune {kind}: " + ", ".join(
                f"{t['config'].replace('TileConfig', '')}={_f(t.get('ms'), '.2f')}" for t in tr[kind]))
            return best

        f_best = pick("forward", fwd_cands, fwd)
        m_best = pick("matmul", mm_cands, lambda c: bwd(delta_cands[0], c))
        d_best = pick("delta", [d for d in delta_cands if d.block_m % m_best.block_k == 0
                                and d.block_n % m_best.block_k == 0], lambda c: bwd(c, m_best))
        KERNELS.set_configs(forward=f_best, delta=d_best, matmul=m_best)
        tr["chosen"] = dict(forward=str(f_best), delta=str(d_best), matmul=str(m_best))
        log(f"tune: chosen {tr['chosen']}")
        del x, W, y, lse, coef
    except Exception as e:
        tr["error"] = f"{type(e).__name__}: {e}"
        log(f"tuning failed ({tr['error']}); default configurations kept")
    cleanup()
    save()


def main():
    log(f"{meta.get('gpu')} | torch {torch.__version__} | triton {meta['triton']} | kernels: "
        f"{meta['kernels_import']} | api: {meta['api_import']} | liger {LIGER.get('version', LIGER.get('error'))}"
        f" | cce {CCE.get('version', CCE.get('error'))}")
    save()
    gate()
    if CUDA and not ARGS.quick and not ARGS.no_tune and SHAPES:
        tune(*SHAPES[0])
    for i, (name, N, D, V) in enumerate(SHAPES):
        if el() > ARGS.budget_s:
            R["notes"].append(f"{name} and later shapes skipped: time budget")
            break
        try:
            run_shape(name, N, D, V, seed=1000 + i)
        except Exception as e:
            R["notes"].append(f"{name} failed: {type(e).__name__}: {e}")
            log(f"{name} FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
            cleanup()
    R["status"] = "done"
    print_results()
    save(final=True)


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException as e:
        R["status"] = "fatal"
        R["fatal"] = f"{type(e).__name__}: {e}"
        R["fatal_traceback"] = traceback.format_exc()[-4000:]
        save(final=True)
        traceback.print_exc()
        print_results()
        sys.exit(1)

"""Fused linear + cross-entropy on CPU: softxent's chunked path vs naive PyTorch and PyTorch's built-in
``F.linear_cross_entropy`` (torch >= 2.13), time, peak memory and gradient error.

Work per call: ``loss = CE(x W^T, y)`` ('mean'), forward + backward with gradients for ``x`` and ``W``,
float32, at ``(N, D, V) = (8192, 512, 32000)`` by default (``--shape 4096 1024 128256`` for the Llama-3
head).  Contenders:

* ``naive``   -- ``F.cross_entropy(x @ W.T, y)`` then ``.backward()`` (materialises N x V logits,
  their log-softmax and their gradients);
* ``chunked`` -- ``softxent.torch.linear_cross_entropy(x, W, y, impl='chunked')`` (default chunk size);
* ``builtin`` -- ``F.linear_cross_entropy(x, W, y, options=LinearCrossEntropyOptions())``, PyTorch's
  chunked path with its defaults; ``builtin_balanced`` (``acc_policy='balanced'``) and
  ``builtin_ar1`` (``chunking_method='aspect_ratio'``: chunks twice the default's) are its other
  policies worth trying in float32 (its accumulation policies differ only where the accumulation dtype
  differs from the input's); the table adds "builtin best", the fastest of the three.  With a torch
  that lacks the built-in these rows read "not available in torch X".

Time: alternated rounds (naive, chunked, builtin, ...) in this process, medians.  Peak memory: each
contender runs once in a fresh subprocess (``--measure IMPL``), which reports its peak resident set
(the kernel's VmHWM, reset once the inputs are allocated) minus the resident set then; that "extra"
includes the gradients every contender returns (``dx`` N D 4 + ``dW`` V D 4 bytes).  Gradient error:
relative max-norm error of loss, dx and dW against float64 (PyTorch's own built-in on float64 copies,
or softxent's float64 chunked path where the built-in is missing; the two agree to 1e-12,
tests/test_torch_interop.py).  Targets: chunked extra <= naive extra / 8 and time <= 1.2 x naive;
against the built-in's best policy: time <= 0.8 x, extra <= 1 x, gradient error <= 1 x.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/linear_ce_cpu.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/linear_ce_cpu.py --shape 4096 1024 128256
    python benchmarks/linear_ce_cpu.py --quick          # tiny sizes, checks the script runs
    python benchmarks/linear_ce_cpu.py --chunk-mib 32 64 128 256   # tune the chunk size
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _harness import alternate, median, print_table, write_json  # noqa: E402

from softxent.torch import DEFAULT_MAX_CHUNK_BYTES, linear_cross_entropy  # noqa: E402


def make_inputs(n, d, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g) / d**0.25).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.25).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    return x, w, y


BUILTIN_OPTIONS = {"builtin": {}, "builtin_balanced": {"acc_policy": "balanced"},
                   "builtin_ar1": {"chunking_method": "aspect_ratio"}}
IMPLS = ["naive", "chunked", *BUILTIN_OPTIONS]


def builtin_missing() -> str | None:
    """Why PyTorch's built-in fused loss cannot run here, or None."""
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return None
    return f"not available in torch {torch.__version__}"


def step_fn(impl, x, w, y, max_chunk_bytes=None):
    """One forward + backward of ``impl``; returns a closure (gradients reset each call)."""
    def naive():
        x.grad = w.grad = None
        loss = F.cross_entropy(x @ w.T, y)
        loss.backward()
        return loss

    def chunked():
        x.grad = w.grad = None
        loss = linear_cross_entropy(x, w, y, impl="chunked", max_chunk_bytes=max_chunk_bytes)
        loss.backward()
        return loss

    def builtin():
        x.grad = w.grad = None
        loss = F.linear_cross_entropy(x, w, y, options=torch.nn.LinearCrossEntropyOptions(**BUILTIN_OPTIONS[impl]))
        loss.backward()
        return loss

    return {"naive": naive, "chunked": chunked}.get(impl, builtin)


def float64_reference(x, w, y):
    """(loss, dx, dW) in float64: PyTorch's built-in on float64 copies (memory-light), else softxent's
    float64 chunked path."""
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    if builtin_missing() is None:
        loss = F.linear_cross_entropy(x64, w64, y, options=torch.nn.LinearCrossEntropyOptions())
    else:
        loss = linear_cross_entropy(x64, w64, y, impl="chunked")
    loss.backward()
    return loss.detach(), x64.grad, w64.grad


def gradient_errors(impl, x, w, y, ref):
    """Relative max-norm errors of ``impl``'s loss, dx, dW against the float64 reference."""
    got = step_fn(impl, x, w, y)()

    def rel(a, b):
        return float((a.double() - b).abs().max() / b.abs().max())

    out = {"loss": rel(got.detach(), ref[0]), "dx": rel(x.grad, ref[1]), "dW": rel(w.grad, ref[2])}
    x.grad = w.grad = None
    return out


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(impl, n, d, v, max_chunk_bytes):
    """Run in a fresh process: peak RSS of one step minus the RSS with the inputs allocated (MiB).

    The peak is the kernel's VmHWM, reset to the current RSS after the inputs are allocated.  (Plain
    ``getrusage().ru_maxrss`` is kept across fork + exec on Linux: a child started by a process that
    had already peaked higher would report the parent's peak; it is the fallback without /proc.)"""
    step_fn(impl, *make_inputs(64, 16, 100))()   # one-time set-up (BLAS buffers, thread pool) first
    x, w, y = make_inputs(n, d, v)
    if _reset_peak_rss() and _status_kib("VmHWM") is not None:
        base = _status_kib("VmRSS")
        step_fn(impl, x, w, y, max_chunk_bytes)()
        peak, how = _status_kib("VmHWM"), "VmHWM"
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step_fn(impl, x, w, y, max_chunk_bytes)()
        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    grads_mib = (x.numel() + w.numel()) * 4 / 2**20
    print(json.dumps({"impl": impl, "extra_mib": (peak - base) / 1024, "grads_mib": grads_mib,
                      "peak_from": how}))


def measure_in_subprocess(impl, n, d, v, max_chunk_bytes):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", impl, "--n", str(n), "--d", str(d),
           "--v", str(v), "--threads", str(torch.get_num_threads())]
    if max_chunk_bytes is not None:
        cmd += ["--max-chunk-bytes", str(max_chunk_bytes)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (checks the script runs)")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--chunk-mib", type=float, nargs="*", default=None,
                   help="also time chunked with these max_chunk_bytes (MiB), to tune the default")
    p.add_argument("--max-chunk-bytes", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--measure", choices=IMPLS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("N", "D", "V"),
                   help="(N, D, V) instead of --n --d --v")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.measure:
        return measure(a.measure, a.n, a.d, a.v, a.max_chunk_bytes)
    if a.shape:
        a.n, a.d, a.v = a.shape
    if a.quick:
        a.n, a.d, a.v, a.rounds = 256, 32, 1000, 2

    n, d, v = a.n, a.d, a.v
    missing = builtin_missing()
    impls = [i for i in IMPLS if missing is None or i not in BUILTIN_OPTIONS]
    x, w, y = make_inputs(n, d, v)
    ref = float64_reference(x, w, y)
    errors = {impl: gradient_errors(impl, x, w, y, ref) for impl in impls}
    del ref
    contenders = {impl: step_fn(impl, x, w, y) for impl in impls}
    chunk_sizes = {}
    for mib in a.chunk_mib or []:
        name = f"chunked {mib:g} MiB"
        chunk_sizes[name] = int(mib * 2**20)
        contenders[name] = step_fn("chunked", x, w, y, int(mib * 2**20))
    times = alternate(contenders, rounds=a.rounds, warmup=1)
    del x, w, y, contenders

    rows = []
    t_naive = median(times["naive"])
    mem = {}
    for name in times:
        mcb = chunk_sizes.get(name)
        mem[name] = measure_in_subprocess("chunked" if name in chunk_sizes else name, n, d, v, mcb)
    m_naive = mem["naive"]["extra_mib"]
    for name, ts in times.items():
        err = errors.get(name, {})
        rows.append({
            "contender": name,
            "median s": median(ts),
            "min s": min(ts),
            "max s": max(ts),
            "time / naive": median(ts) / t_naive,
            "peak extra MiB": mem[name]["extra_mib"],
            "extra / naive": mem[name]["extra_mib"] / m_naive if m_naive > 0 else float("nan"),
            "dx err": err.get("dx", float("nan")),
            "dW err": err.get("dW", float("nan")),
            "loss err": err.get("loss", float("nan")),
        })
    if missing is not None:
        rows += [{"contender": f"{name} ({missing})"} for name in BUILTIN_OPTIONS]
    by_name = {r["contender"]: r for r in rows}
    best = None
    if missing is None:
        best = min(BUILTIN_OPTIONS, key=lambda k: by_name[k]["median s"])
        rows.append(dict(by_name[best], contender=f"builtin best ({best})"))
    title = (f"linear + cross-entropy, fwd+bwd, CPU float32, N={n} D={d} V={v}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, default chunk "
             f"{DEFAULT_MAX_CHUNK_BYTES / 2**20:g} MiB, load average {os.getloadavg()[0]:.2f} "
             f"(gradients dx + dW = {mem['naive']['grads_mib']:.1f} MiB are in every 'extra'; errors: "
             "relative max-norm against float64)")
    table = print_table(rows, ["contender", "median s", "min s", "max s", "time / naive", "peak extra MiB",
                               "extra / naive", "dx err", "dW err", "loss err"], title=title)
    ours = by_name["chunked"]
    if a.quick:
        print("(--quick: tiny sizes that only check the script runs; the targets are for the full size)")
    print(f"targets: time <= 1.2 x naive: {ours['time / naive']:.2f} "
          f"({'met' if ours['time / naive'] <= 1.2 else 'NOT met'}); extra <= naive / 8: "
          f"{ours['extra / naive']:.3f} ({'met' if ours['extra / naive'] <= 1 / 8 else 'NOT met'})")
    vs_builtin = None
    if best is not None:
        b = by_name[best]
        vs_builtin = {"best_policy": best, "time": ours["median s"] / b["median s"],
                      "extra": ours["peak extra MiB"] / b["peak extra MiB"] if b["peak extra MiB"] > 0
                      else float("nan"),
                      "dx_err": ours["dx err"] / b["dx err"] if b["dx err"] > 0 else float("nan"),
                      "dW_err": ours["dW err"] / b["dW err"] if b["dW err"] > 0 else float("nan")}
        ok = (vs_builtin["time"] <= 0.8, vs_builtin["extra"] <= 1.0,
              vs_builtin["dx_err"] <= 1.0 and vs_builtin["dW_err"] <= 1.0)
        print(f"vs the built-in's best policy ({best}): time {vs_builtin['time']:.2f}x (target <= 0.8: "
              f"{'met' if ok[0] else 'NOT met'}), extra {vs_builtin['extra']:.2f}x (<= 1: "
              f"{'met' if ok[1] else 'NOT met'}), dx / dW error {vs_builtin['dx_err']:.2f}x / "
              f"{vs_builtin['dW_err']:.2f}x (<= 1: {'met' if ok[2] else 'NOT met'})")
    write_json("linear_ce_cpu" + ("_quick" if a.quick else f"_{n}x{d}x{v}"), {
        "sizes": {"N": n, "D": d, "V": v}, "threads": torch.get_num_threads(), "rounds": a.rounds,
        "torch": torch.__version__, "builtin": missing or "available", "times_s": times, "memory": mem,
        "gradient_errors": errors, "vs_builtin_best": vs_builtin, "table": table,
        "default_max_chunk_bytes": DEFAULT_MAX_CHUNK_BYTES,
    })


if __name__ == "__main__":
    main()

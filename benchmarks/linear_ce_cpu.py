"""Fused linear + cross-entropy on CPU: softxent's chunked path vs naive PyTorch, time and peak memory.

Work per call: ``loss = CE(x W^T + b?, y)`` ('mean'), forward + backward with gradients for ``x`` and
``W``, float32, at ``(N, D, V) = (8192, 512, 32000)`` by default.  Contenders:

* ``naive``   -- ``F.cross_entropy(x @ W.T, y)`` then ``.backward()`` (materialises N x V logits,
  their log-softmax and their gradients);
* ``chunked`` -- ``softxent.torch.linear_cross_entropy(x, W, y, impl='chunked')`` (default chunk size).

Time: alternated rounds (naive, chunked, naive, ...) in this process, medians.  Peak memory: each
contender runs once in a fresh subprocess (``--measure IMPL``), which reports its peak resident set
(the kernel's VmHWM, reset once the inputs are allocated) minus the resident set then; that "extra"
includes the gradients both contenders return (``dx`` N D 4 + ``dW`` V D 4 bytes).  Targets: chunked
extra <= naive extra / 8, chunked time <= 1.2 x naive.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/linear_ce_cpu.py
    python benchmarks/linear_ce_cpu.py --quick          # tiny sizes, checks the script runs
    python benchmarks/linear_ce_cpu.py --chunk-mib 32 64 128 256   # tune the chunk size
"""

from __future__ import annotations

import argparse
import json
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

    return {"naive": naive, "chunked": chunked}[impl]


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


def check_agreement(n, d, v, max_chunk_bytes):
    """Loss and gradients of chunked vs naive on the benchmark's inputs (relative max-norm errors)."""
    x, w, y = make_inputs(n, d, v)
    ref = step_fn("naive", x, w, y)()
    gx, gw = x.grad.clone(), w.grad.clone()
    got = step_fn("chunked", x, w, y, max_chunk_bytes)()

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    return {"loss": rel(got.detach(), ref.detach()), "dx": rel(x.grad, gx), "dW": rel(w.grad, gw)}


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
    p.add_argument("--measure", choices=["naive", "chunked"], default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.measure:
        return measure(a.measure, a.n, a.d, a.v, a.max_chunk_bytes)
    if a.quick:
        a.n, a.d, a.v, a.rounds = 256, 32, 1000, 2

    n, d, v = a.n, a.d, a.v
    agreement = check_agreement(n, d, v, None)
    x, w, y = make_inputs(n, d, v)
    contenders = {"naive": step_fn("naive", x, w, y), "chunked": step_fn("chunked", x, w, y)}
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
        impl = "naive" if name == "naive" else "chunked"
        mem[name] = measure_in_subprocess(impl, n, d, v, mcb)
    m_naive = mem["naive"]["extra_mib"]
    for name, ts in times.items():
        rows.append({
            "contender": name,
            "median s": median(ts),
            "min s": min(ts),
            "max s": max(ts),
            "time / naive": median(ts) / t_naive,
            "peak extra MiB": mem[name]["extra_mib"],
            "extra / naive": mem[name]["extra_mib"] / m_naive if m_naive > 0 else float("nan"),
        })
    title = (f"linear + cross-entropy, fwd+bwd, CPU float32, N={n} D={d} V={v}, "
             f"{torch.get_num_threads()} threads, default chunk {DEFAULT_MAX_CHUNK_BYTES / 2**20:g} MiB "
             f"(gradients dx + dW = {mem['naive']['grads_mib']:.1f} MiB are in every 'extra')")
    table = print_table(rows, ["contender", "median s", "min s", "max s", "time / naive", "peak extra MiB",
                               "extra / naive"], title=title)
    print(f"chunked vs naive (relative max error): {agreement}")
    row = {r["contender"]: r for r in rows}["chunked"]
    if a.quick:
        print("(--quick: tiny sizes that only check the script runs; the targets are for the full size)")
    print(f"targets: time <= 1.2 x naive: {row['time / naive']:.2f} "
          f"({'met' if row['time / naive'] <= 1.2 else 'NOT met'}); extra <= naive / 8: "
          f"{row['extra / naive']:.3f} ({'met' if row['extra / naive'] <= 1 / 8 else 'NOT met'})")
    write_json("linear_ce_cpu" + ("_quick" if a.quick else ""), {
        "sizes": {"N": n, "D": d, "V": v}, "threads": torch.get_num_threads(), "rounds": a.rounds,
        "times_s": times, "memory": mem, "agreement": agreement, "table": table,
        "default_max_chunk_bytes": DEFAULT_MAX_CHUNK_BYTES,
    })


if __name__ == "__main__":
    main()

"""Vocabulary-parallel (tensor-parallel) fused linear + cross-entropy: time, peak memory and bytes sent
per rank.

P ranks (default 2) each hold ``V / P`` rows of the output layer ``W`` ``(V, D)``; ``x`` ``(N, D)`` and
the targets are replicated.  Work per call: the 'mean' cross-entropy of ``x W^T``, forward + backward with
gradients for ``x`` and this rank's rows of ``W``.  Contenders (alternated in rounds, medians; every rank
runs the same sequence, the collectives keep them in step):

* ``gather+naive``   -- all-gather the shards into the full ``W``, ``F.cross_entropy(x @ W.T, y)``,
  backward (each rank keeps its rows of ``dW``): what a user does today without a sharded loss;
* ``gather+builtin`` -- the same with PyTorch's own ``F.linear_cross_entropy`` (2.13, default
  ``LinearCrossEntropyOptions()``) on the gathered ``W``, where torch has it;
* ``megatron``       -- Megatron-LM's unfused vocab-parallel cross-entropy in plain PyTorch: the rank's
  ``N x V/P`` logits materialised (upcast to float32 for 16-bit inputs, as Megatron's
  ``vocab_parallel_cross_entropy(logits.float(), ...)``), max / sum-exp / target-logit all-reduces,
  softmax kept for backward, ``dx`` all-reduced;
* ``softxent``       -- ``softxent.torch.linear_cross_entropy(x, W_r, y, process_group=group)``
  (``impl='auto'``: the chunked path per shard on the CPU, the Triton kernels on CUDA; ``N x (1..5)``
  all-reduces, ``dx`` all-reduced in float32); on CUDA also ``softxent-chunked`` (``impl='chunked'``).

Peak memory per rank: on CPU the kernel's VmHWM, reset (after ``malloc_trim``) right before one step of a
contender, minus the resident set then ("extra": includes the gradients every contender returns); on CUDA
``torch.cuda.max_memory_allocated`` minus the allocated memory before the step.  Bytes sent per rank: the
tensors this rank hands to torch.distributed's collectives in one step (all-reduce / all-gather inputs),
counted by wrapping them.  Errors: loss / dx / dW (this rank's rows) against softxent's unsharded float64
chunked path on the full ``W`` (relative max-norm).  Targets (issue 15): softxent's peak extra memory
<= 1/8 of ``megatron``'s, CPU time <= 1.2x ``megatron``'s, bytes sent O(N) (not O(N V / P)).

    python benchmarks/linear_ce_tp.py                      # P = 2 gloo processes on the CPU
    python benchmarks/linear_ce_tp.py --quick              # tiny sizes, checks the script runs
    python benchmarks/linear_ce_tp.py --backend nccl --nproc 8 --n 16384 --d 4096 --v 128256 --dtype bfloat16
                                                           # one GPU per process (not yet run: RESULTS.md)
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _harness import median, print_table, write_json  # noqa: E402

from softxent.torch import linear_cross_entropy  # noqa: E402


# --------------------------------------------------------------------------------------------------
# Megatron-style unfused vocab-parallel cross-entropy (plain PyTorch; the baseline)
# --------------------------------------------------------------------------------------------------
class _AllReduceGradient(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient in backward (Megatron's copy to the TP region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _MegatronVocabParallelCE(torch.autograd.Function):
    """Megatron-LM's ``_VocabParallelCrossEntropy``: logits ``(N, V_r)`` of rows ``[v0, v0 + V_r)``
    (float32; the gradient goes back in the logits' dtype)."""

    @staticmethod
    def forward(ctx, logits, target, v0, group):
        m = logits.max(dim=1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        logits = logits - m[:, None]
        local = (target >= v0) & (target < v0 + logits.shape[1])
        idx = torch.where(local, target - v0, 0)
        z_t = torch.where(local, logits.gather(1, idx[:, None])[:, 0], 0)
        dist.all_reduce(z_t, group=group)
        e = logits.exp_()
        s = e.sum(dim=1)
        dist.all_reduce(s, group=group)
        loss = torch.log(s) - z_t
        e.div_(s[:, None])
        ctx.save_for_backward(e, idx, local)
        return loss.mean()

    @staticmethod
    def backward(ctx, g):
        softmax, idx, local = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(1, idx[:, None], -local.to(grad.dtype)[:, None])
        return grad * (g / grad.shape[0]), None, None, None


def step_fn(name, x, w_shard, y, v0, V, group):
    """One forward + backward of contender ``name`` on this rank; returns a closure returning
    ``(loss, dx, dW_shard)``."""
    # gather + a single-process loss: all_gather wants equal sizes, so the shards are padded to
    # ceil(V / P) rows and the padding cut off after
    P = dist.get_world_size(group)
    rows = w_shard.shape[0]

    def gathered(loss_fn):
        per = -(-V // P)
        padded = F.pad(w_shard.detach(), (0, 0, 0, per - rows))
        parts = [torch.empty_like(padded) for _ in range(P)]
        dist.all_gather(parts, padded, group=group)
        w = torch.cat(parts)[:V].requires_grad_()
        xs = x.detach().requires_grad_()
        loss = loss_fn(xs, w)
        loss.backward()
        return loss, xs.grad, w.grad[v0: v0 + rows]

    def megatron():
        xs = x.detach().requires_grad_()
        ws = w_shard.detach().requires_grad_()
        logits = _AllReduceGradient.apply(xs, group) @ ws.T
        loss = _MegatronVocabParallelCE.apply(logits.float(), y, v0, group)
        loss.backward()
        return loss, xs.grad, ws.grad

    def softxent(impl):
        xs = x.detach().requires_grad_()
        ws = w_shard.detach().requires_grad_()
        loss = linear_cross_entropy(xs, ws, y, process_group=group, impl=impl)
        loss.backward()
        return loss, xs.grad, ws.grad

    return {"gather+naive": lambda: gathered(lambda xs, w: F.cross_entropy((xs @ w.T).float(), y)),
            "gather+builtin": lambda: gathered(lambda xs, w: F.linear_cross_entropy(
                xs, w, y, options=torch.nn.LinearCrossEntropyOptions())),
            "megatron": megatron, "softxent": lambda: softxent("auto"),
            "softxent-chunked": lambda: softxent("chunked")}[name]


class SentBytes:
    """Counts the bytes of the tensors this rank hands to torch.distributed's collectives while active
    (the input of all-reduce and all-gather; the check's all-gather of a dozen numbers included)."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
             "reduce_scatter_single", "broadcast")

    def __enter__(self):
        self.bytes = 0
        self.originals = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}
        for name, fn in self.originals.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            sent = args[0] if name in ("all_reduce", "broadcast") else args[1]
            for t in (sent if isinstance(sent, (list, tuple)) else [sent]):
                self.bytes += t.numel() * t.element_size()
            return fn(*args, **kwargs)

        return counted

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(dist, name, fn)


# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------
def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def peak_extra_mib(fn, device) -> float:
    """Peak memory of one ``fn()`` above what was in use before it (MiB), on this rank."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed memory, so that RSS is what is in use
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) / 1024


# --------------------------------------------------------------------------------------------------
# the ranks
# --------------------------------------------------------------------------------------------------
def contenders(device) -> tuple[str, ...]:
    names = ["gather+naive"]
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        names.append("gather+builtin")
    names += ["megatron", "softxent"]
    if device.type == "cuda":  # 'auto' is the Triton path there: the chunked one as well
        names.append("softxent-chunked")
    return tuple(names)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rank_main(rank, a, port, out_path):
    if a.backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(a.threads)
    dist.init_process_group(a.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=a.nproc, timeout=datetime.timedelta(seconds=600))
    try:
        group = dist.group.WORLD
        names = contenders(device)
        dtype = DTYPES[a.dtype]
        g = torch.Generator().manual_seed(0)  # the same x, W, y on every rank
        x = (torch.randn(a.n, a.d, generator=g) / a.d**0.25).to(device)
        w = (torch.randn(a.v, a.d, generator=g) / a.d**0.25).to(device)
        y = torch.randint(0, a.v, (a.n,), generator=g).to(device)
        per = -(-a.v // a.nproc)
        v0 = rank * per
        rows = slice(v0, min(a.v, v0 + per))
        # the float64 reference on the full W (softxent's unsharded chunked path: no N x V buffer)
        x64, w64 = x.to(dtype).double().requires_grad_(), w.to(dtype).double().requires_grad_()
        loss64 = linear_cross_entropy(x64, w64, y, impl="chunked")
        loss64.backward()
        ref = (loss64.detach(), x64.grad, w64.grad[rows])
        del x64, w64, loss64
        x = x.to(dtype)
        w_shard = w[rows].to(dtype).clone()
        del w
        fns = {name: step_fn(name, x, w_shard, y, v0, a.v, group) for name in names}
        errors, sent = {}, {}
        for name in names:
            with SentBytes() as counter:
                got = fns[name]()
            sent[name] = counter.bytes
            errors[name] = {k: float((u.detach().double() - r).abs().max() / r.abs().max().clamp_min(1e-30))
                            for k, u, r in zip(("loss", "dx", "dW"), got, ref)}
        del ref, got
        # memory: one step each, in the same order on every rank
        memory = {name: peak_extra_mib(fns[name], device) for name in reversed(names)}
        # time: alternated rounds, every rank in the same order
        for fn in fns.values():
            fn()
        times = {name: [] for name in names}
        for _ in range(a.rounds):
            for name, fn in fns.items():
                dist.barrier(group)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append(time.perf_counter() - t0)
        with open(f"{out_path}.rank{rank}", "w") as f:
            json.dump({"times_s": times, "memory_mib": memory, "errors": errors, "sent_bytes": sent,
                       "shard_rows": w_shard.shape[0], "device": str(device),
                       "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (checks the script runs)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                   help="gloo: CPU processes; nccl: one GPU per process (rank r on cuda:r)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="inputs' dtype (bfloat16 for the GPU run; the math is float32 either way)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU rank")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.d, a.v, a.rounds = 128, 16, 1001, 2
    if a.backend == "nccl":
        if not dist.is_nccl_available():
            raise SystemExit("--backend nccl: this torch build has no NCCL")
        if torch.cuda.device_count() < a.nproc:
            raise SystemExit(f"--backend nccl needs {a.nproc} GPUs (one per process); "
                             f"{torch.cuda.device_count()} visible")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(rank_main, args=(a, _free_port(), out), nprocs=a.nproc, join=True)
        ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(a.nproc)]

    names = list(ranks[0]["times_s"])
    rows = []
    t_meg = median(ranks[0]["times_s"]["megatron"])
    m_meg = max(r["memory_mib"]["megatron"] for r in ranks)
    for name in names:
        t = median(ranks[0]["times_s"][name])
        m = max(r["memory_mib"][name] for r in ranks)
        err = ranks[0]["errors"][name]
        sent = max(r["sent_bytes"][name] for r in ranks)
        rows.append({"contender": name, "median s (rank 0)": t, "time / megatron": t / t_meg,
                     "peak extra MiB (max over ranks)": m,
                     "extra / megatron": m / m_meg if m_meg > 0 else float("nan"),
                     "KiB sent (max rank)": sent / 1024, "bytes sent / N": sent / a.n,
                     "loss err": err["loss"], "dx err": err["dx"], "dW err": err["dW"]})
    where = ranks[0]["gpu"] or f"{a.threads} thread(s) per rank"
    title = (f"vocab-parallel linear + cross-entropy, fwd+bwd, {a.backend} x {a.nproc}, {a.dtype}, "
             f"N={a.n} D={a.d} V={a.v} ({ranks[-1]['shard_rows']}..{ranks[0]['shard_rows']} rows per rank), "
             f"{where}; errors against float64")
    table = print_table(rows, list(rows[0]), title=title)
    if a.quick:
        print("(--quick: tiny sizes that only check the script runs)")
    ours = next(r for r in rows if r["contender"] == "softxent")
    vs = {"time": ours["time / megatron"], "extra": ours["extra / megatron"],
          "bytes_sent_per_row": ours["bytes sent / N"]}
    print(f"softxent vs megatron: extra memory {vs['extra']:.3f}x (target <= 1/8 = 0.125: "
          f"{'met' if vs['extra'] <= 0.125 else 'NOT met'}), time {vs['time']:.2f}x (target <= 1.2 on the "
          f"CPU: {'met' if vs['time'] <= 1.2 else 'NOT met'}), {vs['bytes_sent_per_row']:.0f} bytes sent per "
          f"row of x (O(N); megatron {rows[names.index('megatron')]['bytes sent / N']:.0f})")
    # every contender computes the same loss: float32 inputs to ~1e-5 of float64, 16-bit ones to their
    # own rounding
    tol = 1e-4 if a.dtype == "float32" else 5e-2
    for r in rows:
        for k in ("loss err", "dx err", "dW err"):
            if not r[k] < tol:
                raise SystemExit(f"{r['contender']} disagrees with the float64 reference: {k} {r[k]:.3g}")
    write_json("linear_ce_tp" + ("_quick" if a.quick else ""), {
        "sizes": {"N": a.n, "D": a.d, "V": a.v, "P": a.nproc}, "backend": a.backend, "dtype": a.dtype,
        "rounds": a.rounds, "threads_per_rank": a.threads, "ranks": ranks,
        "softxent_vs_megatron": vs, "table": table})


if __name__ == "__main__":
    main()

"""Vocabulary-parallel (tensor-parallel) fused linear + cross-entropy: time and peak memory per rank.

P ranks (default 2) each hold ``V / P`` rows of the output layer ``W`` ``(V, D)``; ``x`` ``(N, D)`` and
the targets are replicated.  Work per call: the 'mean' cross-entropy of ``x W^T``, forward + backward with
gradients for ``x`` and this rank's rows of ``W``.  Contenders (alternated in rounds, medians; every rank
runs the same sequence, the collectives keep them in step):

* ``gather+naive``  -- all-gather the shards into the full ``W``, ``F.cross_entropy(x @ W.T, y)``,
  backward (each rank keeps its rows of ``dW``): what a user does today without a sharded loss;
* ``megatron``      -- Megatron-LM's unfused vocab-parallel cross-entropy in plain PyTorch: the rank's
  ``N x V/P`` logits materialised, max / sum-exp / target-logit all-reduces, softmax kept for backward,
  ``dx`` all-reduced;
* ``softxent``      -- ``softxent.torch.linear_cross_entropy(x, W_r, y, process_group=group)``
  (chunked per shard, ``N x (1..4)`` all-reduces, ``dx`` all-reduced).

Peak memory per rank: on CPU the kernel's VmHWM, reset (after ``malloc_trim``) right before one step of a
contender, minus the resident set then ("extra": includes the gradients every contender returns); on CUDA
``torch.cuda.max_memory_allocated`` minus the allocated memory before the step.  Also each contender's
loss / dx / dW errors against ``gather+naive`` (both float32; relative max-norm).

    python benchmarks/linear_ce_tp.py                      # P = 2 gloo processes on the CPU
    python benchmarks/linear_ce_tp.py --quick              # tiny sizes, checks the script runs
    python benchmarks/linear_ce_tp.py --backend nccl --nproc 8 --n 16384 --d 4096 --v 128256   # GPUs
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
    """Megatron-LM's ``_VocabParallelCrossEntropy``: logits ``(N, V_r)`` of rows ``[v0, v0 + V_r)``."""

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
    P = dist.get_world_size(group)
    rows = w_shard.shape[0]

    def gather_naive():
        # all_gather wants equal sizes: shards padded to ceil(V / P) rows, the padding cut off after
        per = -(-V // P)
        padded = F.pad(w_shard.detach(), (0, 0, 0, per - rows))
        parts = [torch.empty_like(padded) for _ in range(P)]
        dist.all_gather(parts, padded, group=group)
        w = torch.cat(parts)[:V].requires_grad_()
        xs = x.detach().requires_grad_()
        loss = F.cross_entropy(xs @ w.T, y)
        loss.backward()
        return loss, xs.grad, w.grad[v0: v0 + rows]

    def megatron():
        xs = x.detach().requires_grad_()
        ws = w_shard.detach().requires_grad_()
        logits = _AllReduceGradient.apply(xs, group) @ ws.T
        loss = _MegatronVocabParallelCE.apply(logits, y, v0, group)
        loss.backward()
        return loss, xs.grad, ws.grad

    def softxent():
        xs = x.detach().requires_grad_()
        ws = w_shard.detach().requires_grad_()
        loss = linear_cross_entropy(xs, ws, y, process_group=group)
        loss.backward()
        return loss, xs.grad, ws.grad

    return {"gather+naive": gather_naive, "megatron": megatron, "softxent": softxent}[name]


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
NAMES = ("gather+naive", "megatron", "softxent")


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
        g = torch.Generator().manual_seed(0)  # the same x, W, y on every rank
        x = (torch.randn(a.n, a.d, generator=g) / a.d**0.25).to(device)
        w = (torch.randn(a.v, a.d, generator=g) / a.d**0.25).to(device)
        y = torch.randint(0, a.v, (a.n,), generator=g).to(device)
        per = -(-a.v // a.nproc)
        v0 = rank * per
        w_shard = w[v0: min(a.v, v0 + per)].clone()
        del w
        fns = {name: step_fn(name, x, w_shard, y, v0, a.v, group) for name in NAMES}
        # agreement against gather+naive (float32 both)
        ref = [t.detach().clone() for t in fns["gather+naive"]()]
        errors = {}
        for name in NAMES[1:]:
            got = fns[name]()
            errors[name] = {k: float((u.detach() - r).abs().max() / r.abs().max().clamp_min(1e-30))
                            for k, u, r in zip(("loss", "dx", "dW"), got, ref)}
        del ref, got
        # memory: ascending expected peaks, one step each
        memory = {name: peak_extra_mib(fns[name], device) for name in reversed(NAMES)}
        # time: alternated rounds, every rank in the same order
        for fn in fns.values():
            fn()
        times = {name: [] for name in NAMES}
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
            json.dump({"times_s": times, "memory_mib": memory, "errors": errors,
                       "shard_rows": w_shard.shape[0]}, f)
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
                   help="gloo: CPU processes; nccl: one GPU per process")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per CPU rank")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.d, a.v, a.rounds = 128, 16, 1001, 2
    if a.backend == "nccl" and torch.cuda.device_count() < a.nproc:
        raise SystemExit(f"--backend nccl needs {a.nproc} GPUs; {torch.cuda.device_count()} visible")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        mp.spawn(rank_main, args=(a, _free_port(), out), nprocs=a.nproc, join=True)
        ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(a.nproc)]

    rows = []
    t_ref = median(ranks[0]["times_s"]["gather+naive"])
    m_ref = max(r["memory_mib"]["gather+naive"] for r in ranks)
    for name in NAMES:
        t = median(ranks[0]["times_s"][name])
        m = max(r["memory_mib"][name] for r in ranks)
        err = ranks[0]["errors"].get(name, {})
        rows.append({"contender": name, "median s (rank 0)": t, "time / gather+naive": t / t_ref,
                     "peak extra MiB (max over ranks)": m,
                     "extra / gather+naive": m / m_ref if m_ref > 0 else float("nan"),
                     "dx err": err.get("dx", 0.0), "dW err": err.get("dW", 0.0)})
    title = (f"vocab-parallel linear + cross-entropy, fwd+bwd, {a.backend} x {a.nproc}, float32, "
             f"N={a.n} D={a.d} V={a.v} ({a.v // a.nproc}+ rows per rank), "
             f"{a.threads if a.backend == 'gloo' else 'GPU'} thread(s) per rank")
    table = print_table(rows, list(rows[0]), title=title)
    if a.quick:
        print("(--quick: tiny sizes that only check the script runs)")
    for name in NAMES[1:]:
        for k, e in ranks[0]["errors"][name].items():
            if not e < 1e-4:
                raise SystemExit(f"{name} disagrees with gather+naive: {k} relative error {e:.3g}")
    write_json("linear_ce_tp" + ("_quick" if a.quick else ""), {
        "sizes": {"N": a.n, "D": a.d, "V": a.v, "P": a.nproc}, "backend": a.backend, "rounds": a.rounds,
        "threads_per_rank": a.threads, "ranks": ranks, "table": table})


if __name__ == "__main__":
    main()

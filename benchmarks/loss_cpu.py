"""Forward + gradient of the softmax cross-entropy on the CPU: softxent vs PyTorch vs naive NumPy.

For float32 logits ``z`` of shape ``(N, K)`` and class-index targets ``y`` (mean reduction), each
contender computes the loss ``E`` and the gradient ``dE/dz``:

* ``softxent``                 -- ``softxent.cross_entropy_with_grad(z, y)`` (allocates the gradient);
* ``softxent (out=)``          -- the same, writing the gradient into a preallocated buffer;
* ``torch (N threads)``        -- ``F.cross_entropy(z, y).backward()`` with torch's default thread count;
* ``torch (1 thread)``         -- the same after ``torch.set_num_threads(1)``;
* ``numpy naive``              -- softmax, log, one-hot subtraction written plainly below.

Contenders alternate (A B C ... A B C ...) and medians are reported; every result is checked against
the float64 reference before timing.  Run on a quiet machine::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/loss_cpu.py
    .venv/bin/python benchmarks/loss_cpu.py --quick      # tiny sizes: checks that the script runs

Writes ``benchmarks/out/loss_cpu.json`` (``loss_cpu_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

import softxent  # noqa: E402

FULL_SHAPES = [(65536, 10), (8192, 1000), (1024, 32000)]
QUICK_SHAPES = [(2048, 10), (256, 1000), (16, 32000)]


def naive_numpy(z: np.ndarray, y: np.ndarray):
    """The textbook version: h = softmax(z), E = -mean log h[y], dE/dz = (h - onehot(y)) / N."""
    n = z.shape[0]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    h = e / e.sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(h[np.arange(n), y]))
    onehot = np.zeros_like(h)
    onehot[np.arange(n), y] = 1
    grad = (h - onehot) / n
    return loss, grad


def make_contenders(z: np.ndarray, y: np.ndarray, torch_threads: int):
    import torch
    import torch.nn.functional as F

    zt = torch.from_numpy(z)
    yt = torch.from_numpy(y)
    buf = np.empty_like(z)

    def run_softxent():
        return softxent.cross_entropy_with_grad(z, y)

    def run_softxent_out():
        return softxent.cross_entropy_with_grad(z, y, out=buf)

    def torch_step():
        leaf = zt.detach().requires_grad_(True)
        loss = F.cross_entropy(leaf, yt)
        loss.backward()
        return float(loss.detach()), leaf.grad.numpy()

    def run_torch_default():
        torch.set_num_threads(torch_threads)
        return torch_step()

    def run_torch_1():
        torch.set_num_threads(1)
        try:
            return torch_step()
        finally:
            torch.set_num_threads(torch_threads)

    def run_naive():
        return naive_numpy(z, y)

    return {
        "softxent": run_softxent,
        "softxent (out=)": run_softxent_out,
        f"torch ({torch_threads} threads)": run_torch_default,
        "torch (1 thread)": run_torch_1,
        "numpy naive": run_naive,
    }


def check_agreement(contenders: dict, z: np.ndarray, y: np.ndarray) -> None:
    """Every contender's loss and gradient match the float64 reference to float32 accuracy."""
    ref_loss, ref_grad = softxent.cross_entropy_with_grad(z.astype(np.float64), y)
    scale = np.max(np.abs(ref_grad))
    for name, fn in contenders.items():
        loss, grad = fn()
        grad = np.asarray(grad, dtype=np.float64)
        if not (abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss)
                and np.max(np.abs(grad - ref_grad)) <= 1e-5 * scale):
            raise AssertionError(f"{name} disagrees with the float64 reference at shape {z.shape}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (a smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per contender")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    torch_threads = torch.get_num_threads()
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    rounds = args.rounds or (3 if args.quick else 15)
    rng = np.random.default_rng(args.seed)
    rows, results = [], []
    for n, k in shapes:
        z = (3 * rng.standard_normal((n, k))).astype(np.float32)
        y = rng.integers(0, k, n)
        contenders = make_contenders(z, y, torch_threads)
        check_agreement(contenders, z, y)
        times = _harness.alternate(contenders, rounds=rounds, warmup=2)
        med = {name: _harness.median(t) for name, t in times.items()}
        t_torch = med[f"torch ({torch_threads} threads)"]
        t_torch1 = med["torch (1 thread)"]
        for name, t in med.items():
            rows.append({
                "N": n, "K": k, "contender": name, "median ms": 1e3 * t,
                "GB/s (z read + grad write)": 2 * z.nbytes / t / 1e9,
                f"x torch ({torch_threads} thr)": t / t_torch,
                "x torch (1 thr)": t / t_torch1,
            })
        results.append({"N": n, "K": k, "dtype": "float32", "rounds": rounds,
                        "times_s": times, "median_s": med})
    cols = ["N", "K", "contender", "median ms", "GB/s (z read + grad write)",
            f"x torch ({torch_threads} thr)", "x torch (1 thr)"]
    table = _harness.print_table(
        rows, cols,
        title="softmax cross-entropy forward + gradient, float32, index targets, mean "
              "(time relative to PyTorch: < 1 is faster)")
    _harness.write_json("loss_cpu_quick" if args.quick else "loss_cpu",
                        {"benchmark": "loss_cpu", "torch_version": torch.__version__,
                         "torch_threads": torch_threads, "numpy_version": np.__version__,
                         "results": results, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())

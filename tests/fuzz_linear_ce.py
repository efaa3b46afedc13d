"""Randomized search across linear_cross_entropy's options: every impl against the float64 reference.

Each draw picks a shape (V = 1, 2, 3 or up to 300; D up to 40; flat or (B, T) leading dims), and at
random: bias, ignored targets, label smoothing, sample and class weights, z-loss, softcap, an
ignore_index inside [0, V), shift, reduction ('mean', 'sum', 'none' with a per-token grad_output, 'sum'
with a normalizer), return_lse, the chunk size, non-contiguous x and W.  The plain-PyTorch impl
('torch') sets the bar on the same input: an impl is reported when its error (``rel_err`` of
test_torch_linear_ce: max-norm against the sum of absolute terms) exceeds both the float32 tolerance
and 10x the 'torch' impl's own error.  So float32 limits every PyTorch-style implementation shares are
not reported; what differs between impls is.

Draws with a row whose non-target mass ``q = 1 - p_y`` is below 1e-12 are passed over: there the float64
reference itself cancels in ``p_y - 1`` (the Triton path keeps ``q`` and is then the more accurate one).

Run from the repository root (the Triton kernels in the interpreter without a GPU)::

    python tests/fuzz_linear_ce.py --seconds 300 --seed 0      # prints each reported draw by its seed
    python tests/fuzz_linear_ce.py --only 201799                 # one draw again

Session 7 found with it that the chunked path gave ~1e-6 gradients instead of exactly 0 at V = 1 with a
softcap and reduction='none' (its forward and recomputing backward chunked the logits differently).
test_torch_linear_ce runs a fixed set of seeds of it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

# as tests/conftest.py: Triton's interpreter where there is no GPU, set before the kernels are imported
if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import test_torch_linear_ce as T  # noqa: E402


def draw_case(seed: int):
    """``(x, w, b, y, kw, grad_output)`` for one seed, or None when it has a too-confident row."""
    rng = np.random.default_rng(seed)
    D = int(rng.integers(1, 40))
    V = int(rng.choice([1, 2, 3, int(rng.integers(4, 300))]))
    lead = N = None
    if rng.random() < 0.4:
        lead = (int(rng.integers(1, 4)), int(rng.integers(1, 12)))
    else:
        N = int(rng.integers(1, 40))
    n_flat = N if lead is None else lead[0] * lead[1]
    ignored = ()
    if rng.random() < 0.5:
        ignored = tuple(rng.choice(n_flat, size=int(rng.integers(0, max(1, n_flat // 3) + 1)), replace=False))
    x, w, b, y = T.draw(rng, N, D, V, lead=lead, ignore=ignored, bias=bool(rng.random() < 0.5),
                        scale=float(rng.choice([0.3, 1.0, 3.0])))
    kw = {}
    if rng.random() < 0.3 and V > 1:
        kw["label_smoothing"] = float(rng.uniform(0, 1))
    if rng.random() < 0.3:
        kw["sample_weight"] = torch.from_numpy(rng.uniform(0, 2, tuple(y.shape))).float()
    if rng.random() < 0.3:
        kw["class_weight"] = torch.from_numpy(rng.uniform(0.2, 2, V)).float()
    if rng.random() < 0.3:
        kw["z_loss"] = float(rng.uniform(0, 0.1))
    if rng.random() < 0.3:
        kw["softcap"] = float(rng.uniform(0.5, 10))
    if rng.random() < 0.2 and V > 1:
        inside = int(rng.integers(0, V))
        kw["ignore_index"] = inside
        flat = y.view(-1)
        flat[flat == -100] = inside
        flat[: max(1, n_flat // 4)] = inside
    if lead is not None and lead[1] > 1 and rng.random() < 0.5:
        kw["shift"] = int(rng.integers(1, lead[1]))
    reduction = str(rng.choice(["mean", "sum", "none", "normalizer"]))
    if reduction == "normalizer":
        kw.update(reduction="sum", normalizer=float(rng.integers(1, 50)))
    else:
        kw["reduction"] = reduction
    if rng.random() < 0.3:
        kw["return_lse"] = True
    kw["max_chunk_bytes"] = int(rng.integers(1, 20)) * max(V, 1) * 4
    if rng.random() < 0.3:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        w = w.t().contiguous().t()
    shift = int(kw.get("shift", 0))
    shape = tuple(y.shape)
    out_shape = shape[:-1] + (shape[-1] - shift,) if shift else shape
    grad_output = (torch.tensor(float(rng.uniform(0.3, 2.0)), dtype=torch.float64) if kw["reduction"] != "none"
                   else torch.from_numpy(rng.uniform(-2, 2, out_shape)))
    z = x.double().reshape(-1, D) @ w.double().T + (0 if b is None else b.double())
    if "softcap" in kw:
        z = kw["softcap"] * torch.tanh(z / kw["softcap"])
    off_target = torch.softmax(z, 1)
    off_target[torch.arange(z.shape[0]), y.reshape(-1).clamp(min=0)] = 0
    if V > 1 and float(off_target.sum(1).min()) < 1e-12:
        return None
    return x, w, b, y, kw, grad_output


def errors(impl, x, w, b, y, kw, grad_output) -> dict:
    """Relative errors of ``impl`` against the float64 reference (test_torch_linear_ce.errors); only the
    'chunked' impl takes the chunk size."""
    run_kw = dict(kw) if impl == "chunked" else {k: v for k, v in kw.items() if k != "max_chunk_bytes"}
    return T.errors(impl, x, w, b, y, grad_output, **run_kw)[0]


def check_seed(seed: int, impls=("chunked", "triton")) -> list[str]:
    """The reports for one draw (empty when every impl is within the bar, or the draw is passed over)."""
    case = draw_case(seed)
    if case is None:
        return []
    base = errors("torch", *case)
    reports = []
    for impl in impls:
        if impl == "triton" and "triton" not in T.IMPLS_ALL:
            continue
        err = errors(impl, *case)
        worse = {k: (v, base[k]) for k, v in err.items() if v > T.TOL32 and v > 10 * base[k]}
        if worse:
            x, w, b, y, kw, _ = case
            opts = {k: ("tensor" if torch.is_tensor(v) else v) for k, v in kw.items()}
            reports.append(f"seed {seed} {impl}: x {tuple(x.shape)} V {w.shape[0]} bias {b is not None} "
                           f"{opts}: (error, torch's) {worse}")
    return reports


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0, help="first seed; the draws take seed, seed + 1, ...")
    ap.add_argument("--only", type=int, nargs="*", help="just these seeds")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = args.only if args.only else None
    deadline = time.time() + args.seconds
    n = n_bad = 0
    while (n < len(seeds)) if seeds else (time.time() < deadline):
        reports = check_seed(seeds[n] if seeds else args.seed + n)
        n += 1
        n_bad += bool(reports)
        for line in reports:
            print(line, flush=True)
    print(f"{n} draws, {n_bad} reported")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Softmax regression on the CPU: softxent's solvers vs scikit-learn and PyTorch L-BFGS, to the SAME objective.

For every data set and dtype, each contender minimises the same function
``E = (1/N) sum_i CE_i + alpha/2 ||Theta||^2`` (intercept unpenalised; scikit-learn with C = 1/(alpha N)).
Reported per contender: the time until its objective is first within ``--rel`` (1e-6) of the best
objective any contender reached, its final objective, and its total time.  Trajectories:

- softxent: the estimator's ``callback`` (objective after each iteration, wall clock from ``fit``'s call);
- scikit-learn lbfgs: ``scipy.optimize.minimize`` wrapped during the fit to record ``fun`` per iteration
  (scikit-learn's lbfgs objective is exactly E with this C);
- scikit-learn newton-cg / newton-cholesky / saga: refits with max_iter = 1, 2, 4, ... (each timed from
  scratch) until the objective reaches the target: the time of the first refit that reaches it;
- PyTorch ``torch.optim.LBFGS`` (strong Wolfe), full batch: objective recorded at each closure call.

Contenders run in alternation (A B C ... A B C) ``--repeats`` times; medians are quoted.  All BLAS /
OpenMP pools are limited to ``--threads`` (threadpoolctl; torch.set_num_threads) for every contender.
Also measured: one objective+gradient evaluation of softxent against its memory floor (the bytes of X
read twice at the measured memory bandwidth) and its FLOP floor.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/fit_cpu.py            # full
    python benchmarks/fit_cpu.py --quick                                                   # seconds
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.optimize
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine_info, median_time_to_target, print_table, write_json  # noqa: E402

from softxent import SoftmaxRegression  # noqa: E402
from softxent.objective import LinearSoftmaxObjective  # noqa: E402

ALPHA = 1e-4


# ------------------------------------------------------------------------------------------ data
def make_data(name: str, quick: bool):
    from sklearn.datasets import load_digits, make_classification

    rng = np.random.default_rng(0)
    if name == "digits":
        X, y = load_digits(return_X_y=True)
        return X, y
    if name == "dense-60000x784":
        n = 3000 if quick else 60000
        return make_classification(n_samples=n, n_features=784, n_informative=50, n_classes=10,
                                   class_sep=2.0, random_state=0)
    if name == "sparse-20000x100000":
        n, d, k = (1000, 5000, 20) if quick else (20000, 100000, 20)
        X = sp.random(n, d, density=0.001 if not quick else 0.01, format="csr", random_state=0,
                      data_rvs=lambda m: rng.standard_normal(m))
        theta = rng.standard_normal((k, d)) * 3
        z = np.asarray(X @ theta.T)
        y = np.array([rng.choice(k, p=p) for p in np.exp(z - z.max(1, keepdims=True)) /
                      np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)])
        return X, y
    if name == "dense-200000x256-100cls":
        n = 5000 if quick else 200000
        return make_classification(n_samples=n, n_features=256, n_informative=64, n_classes=100,
                                   n_clusters_per_class=1, class_sep=2.0, random_state=0)
    raise ValueError(name)


DATASETS = ["digits", "dense-60000x784", "sparse-20000x100000", "dense-200000x256-100cls"]


def objective_of(X, y_idx, K, coef, intercept):
    obj = LinearSoftmaxObjective(X.astype(np.float64) if not sp.issparse(X) else X.astype(np.float64),
                                 y_idx, K, alpha=ALPHA)
    return obj.objective(obj.pack(np.asarray(coef, dtype=np.float64), np.asarray(intercept, dtype=np.float64)))


# ------------------------------------------------------------------------------------ contenders
TIME_LIMIT = [float("inf")]   # seconds per contender run (--time-limit); a run stopped by it reports so


class _OutOfTime(Exception):
    pass


def run_softxent(solver, X, y, max_iter, time_limit=None):
    traj = []
    t0 = time.perf_counter()
    limit = TIME_LIMIT[0] if time_limit is None else min(time_limit, TIME_LIMIT[0])

    def cb(info):
        traj.append((time.perf_counter() - t0, info.objective))
        return traj[-1][0] > limit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = SoftmaxRegression(alpha=ALPHA, solver=solver, tol=1e-10, max_iter=max_iter, callback=cb).fit(X, y)
    total = time.perf_counter() - t0
    return traj, total, (m.coef_, m.intercept_)


def run_sklearn_lbfgs(X, y, max_iter):
    from sklearn.linear_model import LogisticRegression

    traj = []
    original = scipy.optimize.minimize
    t0 = None

    def recording_minimize(*args, **kwargs):
        def cb(intermediate_result):
            traj.append((time.perf_counter() - t0, float(intermediate_result.fun)))
            if traj[-1][0] > TIME_LIMIT[0]:
                raise StopIteration
        kwargs["callback"] = cb
        return original(*args, **kwargs)

    scipy.optimize.minimize = recording_minimize
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            m = LogisticRegression(C=1.0 / (ALPHA * X.shape[0]), solver="lbfgs", tol=1e-10,
                                   max_iter=max_iter).fit(X, y)
            total = time.perf_counter() - t0
    finally:
        scipy.optimize.minimize = original
    return traj, total, (m.coef_, m.intercept_)


def run_sklearn_refits(solver, X, y, target_fn, max_iter):
    """Refit with max_iter = 1, 2, 4, ...; trajectory = (time of that refit, its objective)."""
    from sklearn.linear_model import LogisticRegression

    traj, it, last = [], 1, None
    while it <= max_iter:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            m = LogisticRegression(C=1.0 / (ALPHA * X.shape[0]), solver=solver, tol=1e-10,
                                   max_iter=it).fit(X, y)
            dt = time.perf_counter() - t0
        f = target_fn(m.coef_, m.intercept_)
        traj.append((dt, f))
        last = (m.coef_, m.intercept_)
        if f <= target_fn.target or dt > TIME_LIMIT[0]:
            break
        it *= 2
    return traj, traj[-1][0], last


def run_torch_lbfgs(X, y, K, max_iter):
    import torch

    dtype = torch.float32 if X.dtype == np.float32 else torch.float64
    Xt = (torch.sparse_csr_tensor(torch.from_numpy(X.indptr).long(), torch.from_numpy(X.indices).long(),
                                  torch.from_numpy(X.data), size=X.shape, dtype=dtype)
          if sp.issparse(X) else torch.from_numpy(np.ascontiguousarray(X)))
    yt = torch.from_numpy(np.asarray(y)).long()
    W = torch.zeros(K, X.shape[1], dtype=dtype, requires_grad=True)
    b = torch.zeros(K, dtype=dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, max_eval=int(max_iter * 1.25),
                            tolerance_grad=1e-10, tolerance_change=1e-14, history_size=10,
                            line_search_fn="strong_wolfe")
    traj = []
    t0 = time.perf_counter()

    def closure():
        if traj and traj[-1][0] > TIME_LIMIT[0]:
            raise _OutOfTime
        opt.zero_grad()
        z = Xt @ W.T + b
        loss = torch.nn.functional.cross_entropy(z, yt) + 0.5 * ALPHA * (W * W).sum()
        loss.backward()
        traj.append((time.perf_counter() - t0, float(loss.detach())))
        return loss

    try:
        opt.step(closure)
    except _OutOfTime:
        pass
    total = time.perf_counter() - t0
    return traj, total, (W.detach().numpy(), b.detach().numpy())


# ------------------------------------------------------------------------------------ floors
def memory_bandwidth_gbs() -> float:
    a = np.ones(2**26)  # 512 MiB
    best = np.inf
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def eval_vs_floor(X, y_idx, K, bandwidth):
    obj = LinearSoftmaxObjective(X, y_idx, K, alpha=ALPHA)
    w = np.random.default_rng(0).standard_normal(obj.n_coef) * 0.01
    obj.loss_gradient(w)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        obj.loss_gradient(w)
        times.append(time.perf_counter() - t0)
    nbytes = (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) if sp.issparse(X) else X.nbytes
    floor = 2 * nbytes / (bandwidth * 1e9)
    return float(np.median(times)), floor


# ------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, seconds")
    ap.add_argument("--datasets", nargs="*", default=DATASETS)
    ap.add_argument("--dtypes", nargs="*", default=["float64", "float32"])
    ap.add_argument("--repeats", type=int, default=None, help="default 2 (--quick: 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rel", type=float, default=1e-6)
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--slow-time-limit", type=float, default=None,
                    help="seconds for softxent's proximal / gd / sgd / adam runs (digits only; default 30, "
                         "--quick: 1)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="stop each contender run after this many seconds (reported as not reaching the "
                         "target; default none, --quick: 3)")
    args = ap.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.slow_time_limit is None:
        args.slow_time_limit = 1.0 if args.quick else 30.0
    if args.time_limit is None:
        args.time_limit = 3.0 if args.quick else float("inf")

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    TIME_LIMIT[0] = args.time_limit
    bandwidth = memory_bandwidth_gbs()
    print(f"memory bandwidth (numpy sum): {bandwidth:.1f} GB/s; threads: {args.threads}")
    rows, evals = [], []
    with threadpool_limits(limits=args.threads):
        for name in args.datasets:
            X0, y0 = make_data(name, args.quick)
            classes, y_idx = np.unique(y0, return_inverse=True)
            K = len(classes)
            for dtype in args.dtypes:
                X = X0.astype(dtype)
                if sp.issparse(X):
                    X = sp.csr_matrix(X)
                t_eval, floor = eval_vs_floor(X, y_idx, K, bandwidth)
                nnz = X.nnz if sp.issparse(X) else X.size
                flops = 4 * nnz * K  # two products of 2 * nnz * K
                evals.append({"dataset": name, "dtype": dtype, "eval_s": t_eval, "memory_floor_s": floor,
                              "eval/memory_floor": t_eval / floor})
                print(f"{name} {dtype}: one objective+gradient {t_eval*1e3:.1f} ms, memory floor "
                      f"{floor*1e3:.1f} ms ({t_eval/floor:.2f}x), {flops/1e9:.2f} GFLOP")

                contenders = {
                    "softxent lbfgs": lambda: run_softxent("lbfgs", X, y0, args.max_iter),
                    "softxent newton-cg": lambda: run_softxent("newton-cg", X, y0, args.max_iter),
                    "sklearn lbfgs": lambda: run_sklearn_lbfgs(X, y0, args.max_iter),
                    "torch L-BFGS": lambda: run_torch_lbfgs(X, y_idx, K, args.max_iter),
                }
                if name == "digits":  # the slower solvers, where a run takes seconds
                    for solver in ("proximal", "gd", "sgd", "adam"):
                        contenders[f"softxent {solver}"] = lambda solver=solver: run_softxent(
                            solver, X, y0, 20000, time_limit=args.slow_time_limit)
                results = {c: [] for c in contenders}
                for _ in range(args.repeats):
                    for cname, fn in contenders.items():
                        traj, total, (coef, icpt) = fn()
                        final = objective_of(X, y_idx, K, coef, icpt)
                        results[cname].append((traj, total, final))
                        print(f"  {cname:20s} total {total:8.2f} s  final objective {final:.12g}", flush=True)
                best = min(r[2] for rs in results.values() for r in rs)
                target = best * (1 + args.rel)

                def target_fn(coef, icpt, _X=X, _y=y_idx, _K=K):
                    return objective_of(_X, _y, _K, coef, icpt)
                target_fn.target = target
                sk_extra = {}
                if name in ("digits",):
                    sk_extra["sklearn newton-cg"] = "newton-cg"
                    sk_extra["sklearn newton-cholesky"] = "newton-cholesky"
                if name.startswith("sparse"):
                    sk_extra["sklearn saga"] = "saga"
                    sk_extra["sklearn newton-cg"] = "newton-cg"
                for cname, solver in sk_extra.items():
                    results[cname] = []
                    for _ in range(args.repeats):
                        traj, total, (coef, icpt) = run_sklearn_refits(solver, X, y0, target_fn, args.max_iter)
                        results[cname].append((traj, total, objective_of(X, y_idx, K, coef, icpt)))
                        print(f"  {cname:20s} total {total:8.2f} s  final objective {results[cname][-1][2]:.12g}",
                              flush=True)

                for cname, rs in results.items():
                    rows.append({
                        "dataset": name, "dtype": dtype, "contender": cname,
                        "time_to_target_s": float(median_time_to_target([r[0] for r in rs], target)),
                        "final_objective": float(np.median([r[2] for r in rs])),
                        "final_rel_gap": float(np.median([r[2] for r in rs]) / best - 1),
                        "total_s": float(np.median([r[1] for r in rs])),
                    })
                sk_best = min((r["time_to_target_s"] for r in rows if r["dataset"] == name and r["dtype"] == dtype
                               and r["contender"].startswith("sklearn") and r["time_to_target_s"] == r["time_to_target_s"]),
                              default=float("nan"))
                for r in rows:
                    if r["dataset"] == name and r["dtype"] == dtype:
                        r["speedup_vs_fastest_sklearn"] = sk_best / r["time_to_target_s"]
                print_table([r for r in rows if r["dataset"] == name and r["dtype"] == dtype],
                            ["contender", "time_to_target_s", "speedup_vs_fastest_sklearn", "final_rel_gap", "total_s"],
                            title=f"{name} {dtype}")
                write_json("fit_cpu" + ("_quick" if args.quick else ""),
                           {"args": vars(args), "alpha": ALPHA, "bandwidth_gbs": bandwidth, "rows": rows,
                            "evals": evals, "partial": True})

    cols = ["dataset", "dtype", "contender", "time_to_target_s", "speedup_vs_fastest_sklearn", "final_rel_gap",
            "total_s"]
    print_table(rows, cols, title=f"time to within {args.rel:g} of the best objective (alpha={ALPHA}, "
                                  f"{args.threads} thread(s))")
    print_table(evals, ["dataset", "dtype", "eval_s", "memory_floor_s", "eval/memory_floor"],
                title=f"one objective+gradient evaluation vs its memory floor ({bandwidth:.1f} GB/s)")
    write_json("fit_cpu" + ("_quick" if args.quick else ""),
               {"args": vars(args), "alpha": ALPHA, "bandwidth_gbs": bandwidth, "rows": rows, "evals": evals})


if __name__ == "__main__":
    main()

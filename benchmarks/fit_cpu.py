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

Thread settings.  softxent runs as a user gets it: its defaults (``n_jobs=None``, i.e. the cores this
process may use, where the estimator has ``n_jobs``; before that, BLAS at its default thread count), no
limit set by this script.  scikit-learn and PyTorch run once per ``--threads`` setting (default 1 and 2;
threadpoolctl limits on BLAS and OpenMP, ``torch.set_num_threads``) as separate contenders
(``sklearn lbfgs @1``, ``sklearn lbfgs @2``, ...), and each table names the fastest scikit-learn
contender, threads included: scikit-learn at its best thread setting.  saga's loop uses no threads: it
runs at the lowest setting only.

Contenders run in alternation (A B C ... A B C) ``--repeats`` times; medians are quoted.

Modes (combine freely):

- ``--busy-neighbour``: every round runs the contenders twice, quiet and then busy: while another
  process (``while True: pass``) keeps one core busy, started before and killed after each busy group
  (also on Ctrl-C, an exception or SIGTERM).  Reported: each contender's busy / quiet time, and its
  speed-up over the fastest scikit-learn contender under the same load (issue 14's target: softxent
  busy <= 1.6x quiet).
- ``--scaling``: adds softxent at ``n_jobs`` = each ``--threads`` setting, and reports time(n_jobs=1) /
  time(n_jobs=2) (target >= 1.7x on the 200000x256 set); skipped with a note where ``SoftmaxRegression``
  has no ``n_jobs``.  ``--only softxent`` runs softxent alone.

Always measured (quiet, before the fits): one ``LinearSoftmaxObjective.loss_gradient`` at each
``--threads`` setting (through the objective's own thread-count argument when it has one, detected by
signature; through BLAS's thread limit otherwise) against its floor, the larger of

- bandwidth: X's bytes read once at the memory bandwidth measured with as many threads (``np.sum``);
- FLOPs: 4 N D K (4 nnz K for sparse X) at this machine's square-GEMM rate for that dtype and thread count

(target <= 1.5x on the dense sets).  The JSON records the BLAS (threadpoolctl), the thread settings,
whether the estimator has ``n_jobs``, and the 1-minute load average at the start, at each group and at
the end.

Data sets (``--datasets``): ``digits`` 1797x64 (10 classes); ``dense-60000x784`` (10 classes);
``sparse-20000x100000`` (0.1 %, 20 classes); ``dense-200000x256-100cls``; ``covtype-unscaled`` and
``covtype-standardised``: 100000x54, 7 classes, generated here from a seed (see :func:`make_covtype`).

Full runs, one part at a time on a quiet machine.  Times: estimates for the whole command on the 2-core
machine of RESULTS.md, from its earlier per-fit times (2 repeats, both dtypes, scikit-learn and torch at 1
and 2 threads; not yet measured with this script)::

    B="env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/fit_cpu.py"
    $B --evals-only                                                     # floors, every set: ~2 min
    $B --datasets digits --slow-time-limit 10                           # ~4 min (default 30 s limit: ~9)
    $B --datasets covtype-standardised --time-limit 60                  # ~7 min
    $B --datasets covtype-unscaled --time-limit 60                      # ~15-20 min (--skip "sklearn newton-cg": ~10)
    $B --datasets dense-60000x784 --time-limit 120                      # ~10 min (--skip torch: ~6)
    $B --datasets sparse-20000x100000 --time-limit 100                  # ~20 min (--skip "sklearn saga": ~7)
    $B --datasets dense-200000x256-100cls --time-limit 100 --repeats 1  # ~18 min (--skip torch: ~11)
    # busy neighbour: the same commands plus --busy-neighbour take about twice as long, e.g.
    $B --datasets covtype-standardised dense-60000x784 --busy-neighbour --skip torch --repeats 1 \
       --time-limit 60                                                  # ~13 min
    # n_jobs 1 vs 2 on the dense sets (skipped with a note before the estimator has n_jobs)
    $B --datasets covtype-standardised dense-60000x784 dense-200000x256-100cls --scaling --only softxent \
       --solvers newton-cg --time-limit 100                             # ~9 min
    python benchmarks/fit_cpu.py --quick                                # every set, tiny: about a minute

Writes ``benchmarks/out/<--out>.json``: by default named after the sets and modes, so that the commands
above do not overwrite each other (``fit_cpu_covtype-unscaled.json``, ``fit_cpu_quick.json``, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.optimize
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (busy_neighbour, loadavg_1m, median, median_time_to_target, print_table,  # noqa: E402
                      time_call, usable_cores, write_json)

from softxent import SoftmaxRegression  # noqa: E402
from softxent.objective import LinearSoftmaxObjective  # noqa: E402

ALPHA = 1e-4
DATASETS = ["digits", "dense-60000x784", "sparse-20000x100000", "dense-200000x256-100cls",
            "covtype-unscaled", "covtype-standardised"]
SOFTXENT_SOLVERS = ["lbfgs", "newton-cg"]
#: scikit-learn solvers timed by refits (beyond lbfgs, timed everywhere), per data set; the dense
#: 60000x784 / 200000x256 sets have none: newton-cholesky's Hessian there has 7850^2 / 25700^2 entries
REFIT_SOLVERS = {"digits": ("newton-cg", "newton-cholesky"), "sparse-20000x100000": ("saga", "newton-cg"),
                 "covtype-unscaled": ("newton-cg", "newton-cholesky"),
                 "covtype-standardised": ("newton-cg", "newton-cholesky")}
SINGLE_THREADED = {"saga"}  # scikit-learn's sag loop: no BLAS / OpenMP threads to set
#: issue 14's targets: the speed-up over scikit-learn's best, busy / quiet, n_jobs 1 -> 2 (that set),
#: one evaluation / its floor (dense sets)
TARGET_SPEEDUP, TARGET_BUSY, TARGET_SCALING, TARGET_FLOOR = 3.0, 1.6, 1.7, 1.5
SCALING_TARGET_SET = "dense-200000x256-100cls"


# ------------------------------------------------------------------------------------------ data
#: class shares of the UCI covertype data (classes 1..7: spruce/fir, lodgepole pine, ... krummholz)
COVTYPE_SHARES = (0.36, 0.49, 0.06, 0.005, 0.016, 0.03, 0.039)


def make_covtype(n: int, seed: int = 0):
    """A covtype-like set, ``(X (n, 54) float64, y in 1..7)``, from ``seed`` alone (nothing downloaded).

    The UCI covertype's columns and scales: 10 integer measurements (elevation ~2900 +- 290 m, aspect
    0-360, slope, horizontal / vertical distance to water, distance to roads and to fire points in the
    thousands, three hillshade indices 0-254), then 4 one-hot wilderness areas and 40 one-hot soil types
    (soil shares depend on the area; elevation on area and slope; hillshades on aspect and slope).
    Labels: a noisy linear softmax of the standardised features (elevation weighted most), its
    intercepts set so the class shares come out as :data:`COVTYPE_SHARES`, drawn by Gumbel-max: about
    82 % of the labels are the model's most likely class.
    """
    rng = np.random.default_rng([seed, 54])
    area = rng.choice(4, size=n, p=[0.449, 0.052, 0.436, 0.063])
    soil_p = rng.dirichlet(np.full(40, 0.3), size=4) * 0.98 + 0.02 / 40
    soil = np.empty(n, dtype=np.int64)
    for a in range(4):
        rows = np.flatnonzero(area == a)
        soil[rows] = rng.choice(40, size=rows.size, p=soil_p[a] / soil_p[a].sum())
    aspect = rng.uniform(0, 360, n)
    slope = rng.gamma(3.5, 4.0, n)
    to_water = rng.gamma(1.6, 168.0, n)
    sun = np.cos(np.radians(aspect - 90))
    measured = np.column_stack([
        np.array([3000.0, 3250.0, 2950.0, 2350.0])[area] + rng.normal(0, 230, n) - 2.0 * slope,  # elevation
        aspect, slope, to_water,
        0.17 * to_water + rng.normal(0, 45, n),                     # vertical distance to water
        rng.gamma(2.3, 1020.0, n),                                  # to roads
        212 + 25 * sun + rng.normal(0, 12, n),                      # hillshade 9am
        223 - 0.8 * (slope - 14) + rng.normal(0, 15, n),            # hillshade noon
        143 - 30 * sun + rng.normal(0, 20, n),                      # hillshade 3pm
        rng.gamma(2.2, 900.0, n),                                   # to fire points
    ])
    lo = [1859, 0, 0, 0, -173, 0, 0, 0, 0, 0]
    hi = [3858, 360, 66, 1397, 601, 7117, 254, 254, 254, 7173]
    X = np.zeros((n, 54))
    X[:, :10] = np.rint(np.clip(measured, lo, hi))
    X[np.arange(n), 10 + area] = 1.0
    X[np.arange(n), 14 + soil] = 1.0

    K = len(COVTYPE_SHARES)
    std = X.std(axis=0)
    z = ((X - X.mean(axis=0)) / np.where(std > 0, std, 1.0)) @ (
        np.random.default_rng([seed, K]).standard_normal((K, 54)) * np.r_[2.0, np.full(9, 0.5), np.full(44, 0.4)]).T
    b, zc = np.zeros(K), z[:20000]
    for _ in range(50):  # intercepts for the class shares (fixed point of mean softmax = shares)
        p = np.exp(zc + b - (zc + b).max(axis=1, keepdims=True))
        b += np.log(COVTYPE_SHARES) - np.log((p / p.sum(axis=1, keepdims=True)).mean(axis=0))
    y = np.argmax(z + b + rng.gumbel(size=(n, K)), axis=1) + 1
    return X, y


def make_data(name: str, quick: bool):
    from sklearn.datasets import load_digits, make_classification

    rng = np.random.default_rng(0)
    if name == "digits":
        X, y = load_digits(return_X_y=True)
        return X, y
    if name == "dense-60000x784":
        n = 2000 if quick else 60000
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
        n = 3000 if quick else 200000
        return make_classification(n_samples=n, n_features=256, n_informative=64, n_classes=100,
                                   n_clusters_per_class=1, class_sep=2.0, random_state=0)
    if name in ("covtype-unscaled", "covtype-standardised"):
        X, y = make_covtype(2000 if quick else 100000)
        if name == "covtype-standardised":
            from sklearn.preprocessing import StandardScaler
            X = StandardScaler().fit_transform(X)
        return X, y
    raise ValueError(name)


def make_scorer(X, y_idx, K):
    """``score(coef, intercept)``: E in float64 on ``X`` (one float64 objective, made once per set)."""
    obj = LinearSoftmaxObjective(X.astype(np.float64, copy=False), y_idx, K, alpha=ALPHA)

    def score(coef, intercept):
        return obj.objective(obj.pack(np.asarray(coef, dtype=np.float64), np.asarray(intercept, dtype=np.float64)))
    return score


# ------------------------------------------------------------------------------------ contenders
TIME_LIMIT = [float("inf")]   # seconds per contender run (--time-limit); a run stopped by it reports so


class _OutOfTime(Exception):
    pass


@dataclass
class Contender:
    name: str                     # the row's label, e.g. "sklearn lbfgs @2"
    family: str                   # "softxent", "sklearn" or "torch"
    threads: str                  # "default", "n_jobs=2", or the thread limit "2"
    run: Callable[[], tuple]      # -> (trajectory [(seconds, objective)], total seconds, (coef, intercept))


def estimator_has_n_jobs() -> bool:
    return "n_jobs" in SoftmaxRegression().get_params()


def run_softxent(solver, X, y, max_iter, time_limit=None, **params):
    traj = []
    t0 = time.perf_counter()
    limit = TIME_LIMIT[0] if time_limit is None else min(time_limit, TIME_LIMIT[0])

    def cb(info):
        traj.append((time.perf_counter() - t0, info.objective))
        return traj[-1][0] > limit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = SoftmaxRegression(alpha=ALPHA, solver=solver, tol=1e-10, max_iter=max_iter, callback=cb,
                              **params).fit(X, y)
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


def run_sklearn_refits(solver, X, y, score, target, max_iter):
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
        f = score(m.coef_, m.intercept_)
        traj.append((dt, f))
        last = (m.coef_, m.intercept_)
        if f <= target or dt > TIME_LIMIT[0]:
            break
        it *= 2
    return traj, traj[-1][0], last


def run_torch_lbfgs(X, y, K, max_iter, threads):
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _torch_lbfgs(torch, X, y, K, max_iter)
    finally:
        torch.set_num_threads(previous)


def _torch_lbfgs(torch, X, y, K, max_iter):
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


def with_threads(fn, threads):
    """``fn`` run under threadpoolctl's limit of ``threads`` for every BLAS and OpenMP pool."""
    def run():
        with threadpool_limits(limits=threads):
            return fn()
    return run


def main_contenders(name, X, y0, y_idx, K, args, n_jobs_values):
    """softxent at its defaults (and at each ``n_jobs`` of ``n_jobs_values``), scikit-learn lbfgs and
    torch L-BFGS at each ``--threads`` setting; on digits also softxent's slower solvers."""
    out = [Contender(f"softxent {s}", "softxent", "default", partial(run_softxent, s, X, y0, args.max_iter))
           for s in args.solvers]
    out += [Contender(f"softxent {s} n_jobs={t}", "softxent", f"n_jobs={t}",
                      partial(run_softxent, s, X, y0, args.max_iter, n_jobs=t))
            for s in args.solvers for t in n_jobs_values]
    out += [Contender(f"sklearn lbfgs @{t}", "sklearn", str(t),
                      with_threads(partial(run_sklearn_lbfgs, X, y0, args.max_iter), t)) for t in args.threads]
    out += [Contender(f"torch L-BFGS @{t}", "torch", str(t),
                      with_threads(partial(run_torch_lbfgs, X, y_idx, K, args.max_iter, t), t)) for t in args.threads]
    if name == "digits" and args.slow_time_limit > 0:  # the slower solvers, where a run takes seconds
        out += [Contender(f"softxent {s}", "softxent", "default",
                          partial(run_softxent, s, X, y0, 20000, time_limit=args.slow_time_limit))
                for s in ("proximal", "gd", "sgd", "adam")]
    return selected(out, args)


def refit_contenders(name, X, y0, score, target, args):
    out = []
    for solver in REFIT_SOLVERS.get(name, ()):
        for t in ([min(args.threads)] if solver in SINGLE_THREADED else args.threads):
            out.append(Contender(f"sklearn {solver} @{t}", "sklearn", str(t), with_threads(
                partial(run_sklearn_refits, solver, X, y0, score, target, args.max_iter), t)))
    return selected(out, args)


def selected(contenders, args):
    """Those whose name starts with one of ``--only`` (all when not given) and with none of ``--skip``."""
    return [c for c in contenders
            if (not args.only or c.name.startswith(tuple(args.only))) and not c.name.startswith(tuple(args.skip))]


def run_groups(contenders, loads, repeats, score, groups_log, where):
    """Each round: for each load (quiet, busy), one group of every contender in turn (A B C ...), the busy
    group with a neighbour spinning on one core.  -> ``{(name, load): [(trajectory, total, final E)]}``."""
    results = {(c.name, load): [] for c in contenders for load in loads}
    if not contenders:
        return results
    for rnd in range(repeats):
        for load in loads:
            groups_log.append({**where, "round": rnd, "load": load, "contenders": len(contenders),
                               "loadavg_1m": loadavg_1m()})
            with busy_neighbour(load == "busy"):
                for c in contenders:
                    traj, total, (coef, icpt) = c.run()
                    final = score(coef, icpt)
                    results[(c.name, load)].append((traj, total, final))
                    print(f"  {load:5s} {c.name:28s} total {total:8.2f} s  final objective {final:.12g}", flush=True)
    return results


# ------------------------------------------------------------------------------------ rows
def fastest(rows, family):
    """The row of ``family`` with the shortest finite time to the target, or None."""
    done = [r for r in rows if r["family"] == family and r["time_to_target_s"] == r["time_to_target_s"]]
    return min(done, key=lambda r: r["time_to_target_s"], default=None)


def ratio(a, b):
    """``a / b`` for two times to the target, NaN meaning never reached: NaN when ``b`` is, inf when only
    ``a`` is (``b`` got there, ``a`` never did)."""
    if b != b:
        return float("nan")
    return a / b if a == a else float("inf")


def result_rows(where, contenders, results, loads, best, target):
    rows = []
    for load in loads:
        mine = []
        for c in contenders:
            rs = results[(c.name, load)]
            final = float(median([r[2] for r in rs]))
            mine.append({**where, "load": load, "contender": c.name, "family": c.family, "threads": c.threads,
                         "time_to_target_s": float(median_time_to_target([r[0] for r in rs], target)),
                         "final_objective": final, "final_rel_gap": final / best - 1,
                         "total_s": float(median([r[1] for r in rs]))})
        sk = fastest(mine, "sklearn")
        for r in mine:
            r["speedup_vs_fastest_sklearn"] = ratio(sk["time_to_target_s"] if sk else float("nan"),
                                                    r["time_to_target_s"])
        rows += mine
    return rows


def summary_rows(rows):
    """Per (set, dtype, load): softxent's fastest contender against scikit-learn's fastest (threads
    included), with issue 14's >= 3x target."""
    out = []
    keys = dict.fromkeys((r["dataset"], r["dtype"], r["load"]) for r in rows)
    for key in keys:
        mine = [r for r in rows if (r["dataset"], r["dtype"], r["load"]) == key]
        sx, sk = fastest(mine, "softxent"), fastest(mine, "sklearn")
        speedup = ratio(sk["time_to_target_s"] if sk else float("nan"), sx["time_to_target_s"] if sx else float("nan"))
        out.append({"dataset": key[0], "dtype": key[1], "load": key[2],
                    "softxent_best": sx["contender"] if sx else "-",
                    "softxent_s": sx["time_to_target_s"] if sx else float("nan"),
                    "sklearn_best": sk["contender"] if sk else "- (never within --rel)",
                    "sklearn_s": sk["time_to_target_s"] if sk else float("nan"),
                    "speedup": speedup, "target": f">= {TARGET_SPEEDUP:g}x", "met": speedup >= TARGET_SPEEDUP})
    return out


def busy_rows(rows):
    """Per contender run both quiet and busy: busy / quiet time (to the target, and total), and the
    speed-up over the fastest scikit-learn contender under each load."""
    quiet = {(r["dataset"], r["dtype"], r["contender"]): r for r in rows if r["load"] == "quiet"}
    out = []
    for r in rows:
        q = quiet.get((r["dataset"], r["dtype"], r["contender"]))
        if r["load"] != "busy" or q is None:
            continue
        busy_over_quiet = ratio(r["time_to_target_s"], q["time_to_target_s"])
        target = r["family"] == "softxent"
        out.append({"dataset": r["dataset"], "dtype": r["dtype"], "contender": r["contender"],
                    "quiet_s": q["time_to_target_s"], "busy_s": r["time_to_target_s"],
                    "busy/quiet": busy_over_quiet, "busy/quiet_total": r["total_s"] / q["total_s"],
                    "speedup_quiet": q["speedup_vs_fastest_sklearn"], "speedup_busy": r["speedup_vs_fastest_sklearn"],
                    "target": f"<= {TARGET_BUSY:g}x" if target else "",
                    "met": busy_over_quiet <= TARGET_BUSY if target else ""})
    return out


def scaling_rows(rows, n_jobs_values):
    """Per softxent solver and load: time to the target at each ``n_jobs``, and the lowest's / highest's."""
    out = []
    lo, hi = min(n_jobs_values), max(n_jobs_values)
    for r in rows:
        if r["threads"] != f"n_jobs={lo}":
            continue
        solver = r["contender"].removeprefix("softxent ").rsplit(" n_jobs=", 1)[0]
        same = {x["threads"]: x["time_to_target_s"] for x in rows
                if (x["dataset"], x["dtype"], x["load"]) == (r["dataset"], r["dtype"], r["load"])
                and x["contender"].startswith(f"softxent {solver} n_jobs=")}
        speedup = ratio(same[f"n_jobs={lo}"], same[f"n_jobs={hi}"])
        target = r["dataset"] == SCALING_TARGET_SET
        out.append({"dataset": r["dataset"], "dtype": r["dtype"], "load": r["load"], "solver": solver,
                    **{f"n_jobs={t}_s": same[f"n_jobs={t}"] for t in n_jobs_values},
                    f"speedup_{lo}to{hi}": speedup, "target": f">= {TARGET_SCALING:g}x" if target else "",
                    "met": speedup >= TARGET_SCALING if target else ""})
    return out


# ------------------------------------------------------------------------------------ floors
def memory_bandwidth_gbs(threads: int, nbytes: int) -> float:
    """Bytes per second read by ``np.sum`` over an array of ``nbytes``, split among ``threads`` threads
    (NumPy releases the GIL in the sum): the best of 5."""
    a = np.ones(nbytes // 8)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        best = min(time_call(lambda: list(pool.map(np.sum, parts)), repeat=5))
    return a.nbytes / best / 1e9


def gemm_gflops(dtype, threads: int, n: int) -> float:
    """This machine's square-GEMM rate (``n x n`` by ``n x n``) for ``dtype`` with BLAS on ``threads``."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))
    with threadpool_limits(limits=threads, user_api="blas"):
        best = min(time_call(lambda: a @ b, repeat=3))
    return 2.0 * n**3 / best / 1e9


def measure_rates(threads, dtypes, quick):
    """Bandwidth (GB/s) per thread count and GEMM rate (GFLOP/s) per dtype and thread count; each the
    best over thread counts up to that one (the floor is what any of them allows)."""
    bandwidth, gemm = {}, {d: {} for d in dtypes}
    for t in sorted(threads):
        bandwidth[t] = max([memory_bandwidth_gbs(t, (64 if quick else 512) << 20), *bandwidth.values()])
        for d in dtypes:
            gemm[d][t] = max([gemm_gflops(d, t, 256 if quick else 2000), *gemm[d].values()])
    return {"bandwidth_gbs": bandwidth, "gemm_gflops": gemm}


def objective_threads_arg():
    """``(method, parameter)`` through which ``LinearSoftmaxObjective`` takes a thread count (the
    constructor's or ``loss_gradient``'s ``n_jobs`` / ``threads`` / ``n_threads``), None without one."""
    for method in ("__init__", "loss_gradient"):
        params = inspect.signature(getattr(LinearSoftmaxObjective, method)).parameters
        for name in ("n_jobs", "threads", "n_threads"):
            if name in params:
                return method, name
    return None


def eval_vs_floor(where, X, y_idx, K, threads, rates, quick):
    """One ``loss_gradient`` at ``threads`` against max(bandwidth floor, FLOP floor)."""
    arg = objective_threads_arg()
    init_kw = {arg[1]: threads} if arg and arg[0] == "__init__" else {}
    call_kw = {arg[1]: threads} if arg and arg[0] == "loss_gradient" else {}
    obj = LinearSoftmaxObjective(X, y_idx, K, alpha=ALPHA, **init_kw)
    w = np.random.default_rng(0).standard_normal(obj.n_coef) * 0.01
    with contextlib.nullcontext() if arg else threadpool_limits(limits=threads, user_api="blas"):
        t_eval = median(time_call(lambda: obj.loss_gradient(w, **call_kw), repeat=3 if quick else 7))
    sparse = sp.issparse(X)
    nbytes = (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) if sparse else X.nbytes
    flops = 4 * (X.nnz if sparse else X.size) * K  # X Theta^T and delta^T X: 2 nnz K each
    bw_floor = nbytes / (rates["bandwidth_gbs"][threads] * 1e9)
    flop_floor = flops / (rates["gemm_gflops"][str(X.dtype)][threads] * 1e9)
    floor = max(bw_floor, flop_floor)
    return {**where, "threads": f"{arg[1]}={threads}" if arg else f"BLAS {threads}", "eval_s": t_eval,
            "bandwidth_floor_s": bw_floor, "flop_floor_s": flop_floor,
            "bound": "memory" if bw_floor >= flop_floor else "FLOPs", "eval/floor": t_eval / floor,
            "gflop": flops / 1e9, "target": "" if sparse else f"<= {TARGET_FLOOR:g}x",
            "met": "" if sparse else t_eval / floor <= TARGET_FLOOR}


# ------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, seconds per set")
    ap.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS, metavar="SET",
                    help=f"default: all of {' '.join(DATASETS)}")
    ap.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    ap.add_argument("--repeats", type=int, default=None, help="rounds of alternation (default 2; --quick: 1)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="thread settings for scikit-learn and torch (best reported), the evaluations, and "
                         "softxent's n_jobs with --scaling (default 1 2)")
    ap.add_argument("--solvers", nargs="+", default=SOFTXENT_SOLVERS,
                    help="softxent's solvers (default lbfgs newton-cg; 'auto' is the estimator's default)")
    ap.add_argument("--only", nargs="+", default=[], metavar="PREFIX",
                    help="run only the contenders whose name starts with one of these (e.g. softxent, "
                         "'sklearn lbfgs')")
    ap.add_argument("--skip", nargs="+", default=[], metavar="PREFIX",
                    help="leave out the contenders whose name starts with one of these (e.g. torch)")
    ap.add_argument("--busy-neighbour", action="store_true",
                    help="run every round quiet and busy (one core kept busy by another process)")
    ap.add_argument("--scaling", action="store_true", help="add softxent at n_jobs = each --threads setting")
    ap.add_argument("--evals-only", action="store_true",
                    help="only the evaluations against their floors (no fits): a minute or two for every set")
    ap.add_argument("--rel", type=float, default=1e-6)
    ap.add_argument("--max-iter", type=int, default=None, help="default 1000 (--quick: 100)")
    ap.add_argument("--slow-time-limit", type=float, default=None,
                    help="seconds for softxent's proximal / gd / sgd / adam runs (digits only; 0: leave them "
                         "out; default 30, --quick: 0.1)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="stop each contender run after this many seconds (reported as not reaching the "
                         "target; default none, --quick: 0.5)")
    ap.add_argument("--out", default=None,
                    help="JSON name in benchmarks/out (default: fit_cpu, then the sets when not all of them and "
                         "the modes, e.g. fit_cpu_covtype-unscaled_busy; _quick with --quick)")
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    if args.slow_time_limit is None:
        args.slow_time_limit = 0.1 if args.quick else 30.0
    if args.time_limit is None:
        args.time_limit = 0.5 if args.quick else float("inf")
    if args.max_iter is None:
        args.max_iter = 100 if args.quick else 1000
    if args.out is None:
        parts = ["fit_cpu", *(args.datasets if args.datasets != DATASETS else []),
                 *(mode for mode, on in (("evals", args.evals_only), ("busy", args.busy_neighbour),
                                         ("scaling", args.scaling), ("quick", args.quick)) if on)]
        args.out = "_".join(parts)
    if min(args.threads) < 1:
        ap.error("--threads: positive thread counts")
    return args


def main(argv=None):
    args = parse_args(argv)
    TIME_LIMIT[0] = args.time_limit
    has_n_jobs = estimator_has_n_jobs()
    notes = []
    n_jobs_values = []
    if args.scaling:
        if has_n_jobs:
            n_jobs_values = sorted(set(args.threads))
        else:
            notes.append("threads scaling skipped: this SoftmaxRegression has no n_jobs parameter")
            print(f"note: {notes[-1]}")
    loads = ["quiet", "busy"] if args.busy_neighbour else ["quiet"]
    record = {
        "args": vars(args), "alpha": ALPHA, "notes": notes,
        "loadavg_1m": {"start": loadavg_1m()},
        "threads": {"settings": args.threads, "usable_cores": usable_cores(), "estimator_n_jobs": has_n_jobs,
                    "objective_threads_arg": objective_threads_arg(),
                    "softxent_default": (f"n_jobs=None ({usable_cores()} usable cores)" if has_n_jobs else
                                         "no n_jobs: BLAS at its default thread count")},
        "rows": [], "summary": [], "busy": [], "scaling": [], "evals": [], "groups": [],
    }
    rates = measure_rates(args.threads, args.dtypes, args.quick)
    record["rates"] = rates
    print(f"memory bandwidth (np.sum) GB/s by threads: {rates['bandwidth_gbs']}; square GEMM GFLOP/s: "
          f"{rates['gemm_gflops']}; softxent default: {record['threads']['softxent_default']}", flush=True)

    for name in args.datasets:
        X0, y0 = make_data(name, args.quick)
        classes, y_idx = np.unique(y0, return_inverse=True)
        K = len(classes)
        for dtype in args.dtypes:
            X = X0.astype(dtype)
            if sp.issparse(X):
                X = sp.csr_matrix(X)
            where = {"dataset": name, "dtype": dtype}
            for t in args.threads:
                e = eval_vs_floor(where, X, y_idx, K, t, rates, args.quick)
                record["evals"].append(e)
                print(f"{name} {dtype}: one objective+gradient ({e['threads']}) {e['eval_s']*1e3:.2f} ms, floor "
                      f"{max(e['bandwidth_floor_s'], e['flop_floor_s'])*1e3:.2f} ms ({e['bound']}): "
                      f"{e['eval/floor']:.2f}x", flush=True)
            if args.evals_only:
                continue

            score = make_scorer(X, y_idx, K)
            contenders = main_contenders(name, X, y0, y_idx, K, args, n_jobs_values)
            results = run_groups(contenders, loads, args.repeats, score, record["groups"], where)
            best = min((r[2] for rs in results.values() for r in rs), default=float("nan"))
            target = best * (1 + args.rel)
            refits = refit_contenders(name, X, y0, score, target, args)
            results.update(run_groups(refits, loads, args.repeats, score, record["groups"], where))
            rows = result_rows(where, contenders + refits, results, loads, best, target)
            record["rows"] += rows
            print_table(rows, ["load", "contender", "time_to_target_s", "speedup_vs_fastest_sklearn",
                               "final_rel_gap", "total_s"], title=f"{name} {dtype}")
            record["summary"] += summary_rows(rows)
            record["busy"] += busy_rows(rows)
            if n_jobs_values:
                record["scaling"] += scaling_rows(rows, n_jobs_values)
            record["loadavg_1m"]["end"] = loadavg_1m()
            write_json(args.out, {**record, "partial": True})

    print_tables(record, args)
    record["loadavg_1m"]["end"] = loadavg_1m()
    write_json(args.out, record)


def print_tables(record, args):
    if record["rows"]:
        print_fit_tables(record, args)
    for note in record["notes"]:
        print(f"note: {note}")
    print_table(record["evals"], ["dataset", "dtype", "threads", "eval_s", "bandwidth_floor_s", "flop_floor_s",
                                  "bound", "eval/floor", "target", "met"],
                title="one objective+gradient evaluation vs its floor: max(X read once at the measured "
                      "bandwidth, 4NDK FLOPs at the square-GEMM rate)")


def print_fit_tables(record, args):
    print_table(record["rows"], ["dataset", "dtype", "load", "contender", "time_to_target_s",
                                 "speedup_vs_fastest_sklearn", "final_rel_gap", "total_s"],
                title=f"time to within {args.rel:g} of the best objective (alpha={ALPHA})")
    print_table(record["summary"], ["dataset", "dtype", "load", "softxent_best", "softxent_s", "sklearn_best",
                                    "sklearn_s", "speedup", "target", "met"],
                title="softxent's fastest vs scikit-learn at its best solver and thread setting")
    if record["busy"]:
        print_table(record["busy"], ["dataset", "dtype", "contender", "quiet_s", "busy_s", "busy/quiet",
                                     "busy/quiet_total", "speedup_quiet", "speedup_busy", "target", "met"],
                    title="busy neighbour (one core kept busy by another process): time to the target")
    if record["scaling"]:
        print_table(record["scaling"], list(record["scaling"][0]), title="softxent threads scaling (n_jobs)")


if __name__ == "__main__":
    main()

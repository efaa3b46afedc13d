"""Softmax regression beyond one machine: softxent on Dask vs in memory vs Spark MLlib, to the SAME objective.

Part 1 (in one run, on the same generated data): dense N x D float64, K classes drawn from a random softmax
model; every engine minimises ``E = (1/N) sum_i CE_i + alpha/2 ||Theta||^2`` (intercepts unpenalised,
alpha = Spark's regParam = 1e-4):

- softxent in memory (lbfgs, BLAS on 1 thread and on 2 threads);
- softxent on a LocalCluster of 1 and of 2 single-threaded workers (lbfgs; the data persisted on the
  workers before the fit, as Spark's DataFrame is cached; the fit's time includes its own passes:
  classes/NaN scan and preparing the blocks);
- Spark MLlib ``LogisticRegression(family='multinomial', regParam=alpha, elasticNetParam=0,
  standardization=False)`` on ``local[2]``, its warm fits (the first fit, untimed, also finds how many
  L-BFGS iterations it needs).  Spark always optimises in the space of features scaled by their standard
  deviations; ``standardization=False`` only moves the penalty back onto the original coefficients, so
  it minimises the same E -- its objective is checked by recomputing E from its coefficients with
  LinearSoftmaxObjective (not from Spark's own objectiveHistory).

Reported: the time until each engine's objective is first within ``--rel`` (1e-9) of the best objective
any engine reached (softxent: from the fit's callback; Spark: a warm refit with ``maxIter`` = the first
iteration whose objective is within ``--rel``, whose recomputed objective must be within too), total
time and iterations.  Per evaluation: one objective+gradient in memory vs as a Dask map-reduce on 1 and 2
workers, the same group sums timed inside the worker task, and a map-reduce of a no-op block function
(scheduling and communication alone); Dask's overhead per evaluation = (Dask, 1 worker) - (in memory,
1 thread), each Dask evaluation after a pause as long as an in-memory evaluation (the solver's step in
a fit; back to back, the client's 10 ms message batching adds a wait no fit pays).

Part 2 (out of core): Parquet files ``--ooc-factor`` (3) times the workers' total ``memory_limit``
(``--ooc-workers`` 2 x ``--ooc-memory-limit`` 640 MiB -> 3.75 GiB of float64), read with
``softxent.dask.read_table`` and fitted with lbfgs (blocks streamed from the files at every evaluation,
since they do not fit); reported: time, iterations, peak RSS of each worker process (polled every 0.2 s)
against its limit, and whether any worker was restarted (worker process ids before and after, and the
scheduler's count of workers that left).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/fit_dask.py            # full
    python benchmarks/fit_dask.py --quick                       # seconds: tiny sizes, no Spark
    python benchmarks/fit_dask.py --quick --spark               # tiny sizes with Spark
    python benchmarks/fit_dask.py --skip-ooc                    # part 1 only

Needs the ``dask`` extra; Spark needs ``pip install pyspark`` and Java 17 (``pandas<3`` is recommended by
pyspark; this script does not use pandas with Spark, only Parquet).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import median_time_to_target, print_table, write_json  # noqa: E402

ALPHA = 1e-4


# ------------------------------------------------------------------------------------------ data
def softmax_model(D, K, seed):
    """The random softmax model ``(W (K, D), b (K,))`` the labels are drawn from."""
    rng = np.random.default_rng([seed, 0])
    return rng.standard_normal((K, D)) * (2.0 / np.sqrt(D)), rng.standard_normal(K) * 0.5


def make_block(index, rows, D, K, seed):
    """Block ``index`` of the data set: ``rows`` rows of standard normal X and labels from the model.

    Every block has its own seed, so the same data come out on a worker, on the client, or in a Parquet
    file, and Dask can recompute any block."""
    W, b = softmax_model(D, K, seed)
    rng = np.random.default_rng([seed, 1, index])
    X = rng.standard_normal((rows, D))
    z = X @ W.T + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    y = (p.cumsum(axis=1) > rng.random((rows, 1))).argmax(axis=1).astype(np.int64)
    return X, y


def block_rows(N, rows_per_block):
    sizes = [rows_per_block] * (N // rows_per_block)
    if N % rows_per_block:
        sizes.append(N % rows_per_block)
    return sizes


def numpy_data(N, D, K, seed, rows_per_block):
    parts = [make_block(i, n, D, K, seed) for i, n in enumerate(block_rows(N, rows_per_block))]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def dask_data(N, D, K, seed, rows_per_block):
    """The same data as :func:`numpy_data`, generated block by block on the workers."""
    import dask
    import dask.array as da

    gen = dask.delayed(make_block, pure=True, nout=2)
    xs, ys = [], []
    for i, n in enumerate(block_rows(N, rows_per_block)):
        X_i, y_i = gen(i, n, D, K, seed)
        xs.append(da.from_delayed(X_i, shape=(n, D), dtype=np.float64))
        ys.append(da.from_delayed(y_i, shape=(n,), dtype=np.int64))
    return da.concatenate(xs), da.concatenate(ys)


def objective_of(X, y, K, coef, intercept):
    from softxent.objective import LinearSoftmaxObjective

    obj = LinearSoftmaxObjective(X, y, K, alpha=ALPHA)
    return obj.objective(obj.pack(np.asarray(coef, dtype=np.float64), np.asarray(intercept, dtype=np.float64)))


# ------------------------------------------------------------------------------------ contenders
def fit_softxent(X, y, tol, max_iter, **dask_options):
    """(trajectory [(seconds since fit's call, objective)], total seconds, model); ``dask_options`` (dask
    input only) go to :func:`softxent.dask.fit_dask`."""
    from softxent import SoftmaxRegression
    from softxent.dask import fit_dask

    traj = []
    t0 = time.perf_counter()

    def cb(info):
        traj.append((time.perf_counter() - t0, info.objective))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = SoftmaxRegression(alpha=ALPHA, solver="lbfgs", tol=tol, max_iter=max_iter, callback=cb)
        if dask_options:
            fit_dask(m, X, y, **dask_options)
        else:
            m.fit(X, y)
    return traj, time.perf_counter() - t0, m


class Spark:
    def __init__(self, X, y, workdir, threads=2):
        import pyarrow as pa
        import pyarrow.parquet as pq
        from pyspark.ml.feature import VectorAssembler
        from pyspark.sql import SparkSession

        D = X.shape[1]
        path = os.path.join(workdir, "spark_data.parquet")
        pq.write_table(pa.table({**{f"f{j}": X[:, j] for j in range(D)}, "label": y.astype(np.float64)}), path)
        self.spark = (SparkSession.builder.master(f"local[{threads}]").appName("softxent-fit-dask")
                      .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
                      .config("spark.ui.enabled", "false").config("spark.driver.memory", "6g")
                      .config("spark.sql.shuffle.partitions", str(threads)).getOrCreate())
        self.spark.sparkContext.setLogLevel("ERROR")
        df = self.spark.read.parquet(path)
        df = VectorAssembler(inputCols=[f"f{j}" for j in range(D)], outputCol="features").transform(df)
        self.df = df.select("features", "label").repartition(threads).cache()
        self.df.count()

    def fit(self, max_iter, tol):
        from pyspark.ml.classification import LogisticRegression

        lr = LogisticRegression(family="multinomial", regParam=ALPHA, elasticNetParam=0.0, standardization=False,
                                fitIntercept=True, maxIter=max_iter, tol=tol, labelCol="label")
        t0 = time.perf_counter()
        m = lr.fit(self.df)
        dt = time.perf_counter() - t0
        return dt, m.coefficientMatrix.toArray(), m.interceptVector.toArray(), list(m.summary.objectiveHistory)

    def stop(self):
        """Stop Spark AND its JVM: a JVM left running (pyspark keeps its gateway) shares the 2 cores with
        the evaluation timing that follows."""
        from pyspark import SparkContext

        gateway = SparkContext._gateway
        self.spark.stop()
        if gateway is None:
            return
        gateway.shutdown()
        proc = getattr(gateway, "proc", None)
        if proc is not None:  # pyspark's JVM exits when its stdin closes
            proc.stdin.close()
            proc.wait(timeout=60)
        SparkContext._gateway = SparkContext._jvm = None


# ------------------------------------------------------------------------------------ evaluations
def noop_group(w, *blocks):
    return 0.0


def eval_times(obj, n=7, pause=0.0):
    w = np.random.default_rng(0).standard_normal(obj.n_coef) * 0.01
    obj.loss_gradient(w)
    ts = []
    for i in range(n):
        w[0] += 1e-3
        time.sleep(pause)
        t0 = time.perf_counter()
        obj.loss_gradient(w)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def timed_group_sums(spec, w, need_grad, *blocks):
    """The group task of an evaluation, timed inside the worker: ``(seconds, loss_sum)``."""
    from softxent.dask import _blocks

    t0 = time.perf_counter()
    loss_sum, _ = _blocks.group_sums(spec, w, need_grad, *blocks)
    return time.perf_counter() - t0, loss_sum


def inside_task_time(dobj, pause=0.0):
    """The slowest worker's time for its group sums, measured inside its task."""
    w = np.random.default_rng(0).standard_normal(dobj.n_coef) * 0.01
    time.sleep(pause)
    return max(t for t, _ in dobj.client.gather(dobj._map(timed_group_sums, dobj.spec, dobj._node(w), True)))


def noop_map_reduce_time(dobj, n=15, pause=0.0):
    """One map-reduce of a no-op over the persisted blocks (w passed as in an evaluation)."""
    w = np.zeros(dobj.n_coef)
    ts = []
    for i in range(n + 1):
        w[0] = i
        time.sleep(pause)
        t0 = time.perf_counter()
        dobj.client.gather(dobj._map(noop_group, dobj._node(w)))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts[1:]))


# ------------------------------------------------------------------------------------------- part 1
def part1(args, rows, workdir):
    import distributed
    from threadpoolctl import threadpool_limits

    from softxent.dask import DaskBlocks, start_local_cluster
    from softxent.objective import LinearSoftmaxObjective

    N, D, K = args.n, args.d, args.k
    X, y = numpy_data(N, D, K, args.seed, args.block_rows)
    print(f"data: {N} x {D} float64 ({X.nbytes / 2**20:.0f} MiB), {K} classes, blocks of {args.block_rows} rows; "
          f"class counts {np.bincount(y, minlength=K).tolist()}", flush=True)
    clusters = {}
    for n_workers in (1, 2):
        cluster = start_local_cluster(n_workers=n_workers, silence_logs=False)  # logging: see main
        client = distributed.Client(cluster, set_as_default=False)
        Xd, yd = dask_data(N, D, K, args.seed, args.block_rows)
        Xd, yd = client.persist([Xd, yd])
        with client.as_current():
            distributed.wait([Xd, yd])
        clusters[n_workers] = (cluster, client, Xd, yd)
    spark = Spark(X, y, workdir) if args.spark else None

    contenders = {}
    for threads in (1, 2):
        def run_numpy(threads=threads):
            with threadpool_limits(limits=threads):
                return fit_softxent(X, y, args.tol, args.max_iter)
        contenders[f"softxent in memory ({threads} thread{'s' if threads > 1 else ''})"] = run_numpy
    for n_workers, (cluster, client, Xd, yd) in clusters.items():
        def run_dask(client=client, Xd=Xd, yd=yd):  # SoftmaxRegression.fit: the defaults
            with client.as_current():
                return fit_softxent(Xd, yd, args.tol, args.max_iter)
        contenders[f"softxent dask, {n_workers} worker{'s' if n_workers > 1 else ''}"] = run_dask
    cluster, client, Xd, yd = clusters[2]

    def run_dask_node():  # w as one graph node that the per-worker tasks depend on (the default inlines it)
        return fit_softxent(Xd, yd, args.tol, args.max_iter, client=client, coef_node=True)
    contenders["softxent dask, 2 workers, w as a graph node"] = run_dask_node

    results = {c: [] for c in contenders}
    spark_first = None
    if spark is not None:
        dt, coef, icpt, hist = spark.fit(args.spark_max_iter, args.spark_tol)  # cold fit: warm-up + history
        spark_first = {"seconds": dt, "iterations": len(hist) - 1, "history": hist,
                       "objective": objective_of(X, y, K, coef, icpt)}
        print(f"  spark cold fit: {dt:.2f} s, {len(hist) - 1} iterations, objective {spark_first['objective']:.15g}",
              flush=True)
    for rep in range(args.repeats):
        for cname, fn in contenders.items():
            traj, total, m = fn()
            final = objective_of(X, y, K, m.coef_, m.intercept_)
            results[cname].append((traj, total, final, m.n_iter_))
            print(f"  {cname:32s} total {total:8.2f} s  {m.n_iter_:4d} iterations  objective {final:.15g}", flush=True)
    finals = [r[2] for rs in results.values() for r in rs]
    if spark_first is not None:
        finals.append(spark_first["objective"])
    best = min(finals)
    target = best * (1 + args.rel)

    for cname, rs in results.items():
        ttt = float(median_time_to_target([r[0] for r in rs], target))
        rows.append({"contender": cname, "time_to_target_s": ttt,
                     "total_s": float(np.median([r[1] for r in rs])), "iterations": int(np.median([r[3] for r in rs])),
                     "final_rel_gap": float(np.median([r[2] for r in rs]) / best - 1),
                     "reached": ttt == ttt})
    spark_row = None
    if spark is not None:
        hist = spark_first["history"]
        # objectiveHistory[i] is Spark's objective after i iterations; its iterate is not returned, so the
        # warm refit stops at the first i within the target and its objective is recomputed from coefficients
        k = next((i for i, f in enumerate(hist) if f <= target), len(hist) - 1)
        k = max(k, 1)
        times, objs = [], []
        for rep in range(args.repeats):
            dt, coef, icpt, _ = spark.fit(k, args.spark_tol)
            times.append(dt)
            objs.append(objective_of(X, y, K, coef, icpt))
            print(f"  spark local[2] warm, maxIter={k}: {dt:.2f} s, objective {objs[-1]:.15g}", flush=True)
        spark_row = {"contender": "Spark MLlib local[2] (warm)", "time_to_target_s": float(np.median(times)),
                     "total_s": float("nan"), "iterations": k,
                     "final_rel_gap": float(np.median(objs) / best - 1), "reached": all(o <= target for o in objs)}
        rows.append(spark_row)
        spark.stop()
    for r in rows:
        if spark_row is not None:
            r["spark_time/this"] = spark_row["time_to_target_s"] / r["time_to_target_s"]

    # ---- one evaluation: in memory vs a Dask map-reduce, alternated (A B C ... A B C), medians.
    # This machine's timings drift by 20-40% between minutes, so only an alternated comparison means
    # anything: one round times each contender for a couple of evaluations, then the next round starts.
    # For the Dask contenders each round also times the same group sums INSIDE the worker task (so the
    # overhead splits into "the worker computes slower" and "messages and scheduling") and a no-op
    # map-reduce.  Each Dask evaluation follows a pause as long as an in-memory one, as in a fit where
    # the client's solver step separates evaluations (back to back, the client's 10 ms message batching
    # would add a wait that no fit pays).
    obj = LinearSoftmaxObjective(X, y, K, alpha=ALPHA)
    contenders = {"in memory, 1 thread": (obj, None)}
    for n_workers, (cluster, client, Xd, yd) in clusters.items():
        for coef_node in (True, False):
            dobj = DaskBlocks.from_arrays(client, Xd, yd, persist=True).objective(np.arange(K), alpha=ALPHA,
                                                                                 coef_node=coef_node)
            what = (f"dask map-reduce, {n_workers} worker(s), w "
                    + ("as one graph node" if coef_node else "inlined per worker task"))
            contenders[what] = (dobj, n_workers)
    samples = {what: [] for what in contenders}
    noop = {what: [] for what in contenders}
    inside = {what: [] for what in contenders}
    pause = 0.0
    for _ in range(args.eval_rounds):
        for what, (o, n_workers) in contenders.items():
            if n_workers is None:
                with threadpool_limits(limits=1):
                    samples[what].append(eval_times(o, n=2))
                pause = samples[what][-1]
            else:
                samples[what].append(eval_times(o, n=2, pause=pause))
                inside[what].append(inside_task_time(o, pause=pause))
                noop[what].append(noop_map_reduce_time(o, n=2, pause=pause))
    t_mem = float(np.median(samples["in memory, 1 thread"]))
    evals = []
    for what, (o, n_workers) in contenders.items():
        t = float(np.median(samples[what]))
        row = {"what": what, "eval_s": t, "samples_s": samples[what]}
        if n_workers is not None:
            t_in = float(np.median(inside[what]))
            row.update({"noop_map_reduce_s": float(np.median(noop[what])), "blocks": len(o.blocks),
                        "tasks": len(o._current_groups()), "worker_compute_s": t_in,
                        "worker_compute/in_memory": t_in / (t_mem / n_workers),
                        "overhead_vs_ideal": (t - t_mem / n_workers) / (t_mem / n_workers)})
        evals.append(row)
    del contenders, o
    for cluster, client, *_ in clusters.values():
        client.close()
        cluster.close()
    return {"best_objective": best, "target": target, "spark_first_fit": spark_first, "evals": evals}


# ------------------------------------------------------------------------------------------- part 2
def write_parquet_data(path, n_rows, D, K, seed, rows_per_file):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(path, exist_ok=True)
    for i, n in enumerate(block_rows(n_rows, rows_per_file)):
        X, y = make_block(i, n, D, K, seed)
        table = pa.table({**{f"f{j}": X[:, j] for j in range(D)}, "y": y})
        tmp = os.path.join(path, f".part-{i:05d}.parquet.tmp")
        pq.write_table(table, tmp, compression="none", row_group_size=n)
        os.replace(tmp, os.path.join(path, f"part-{i:05d}.parquet"))


class RssPoller:
    """Peak resident memory of the given processes, polled every ``interval`` seconds in a thread."""

    def __init__(self, pids, interval=0.2):
        import psutil

        self.procs = {pid: psutil.Process(pid) for pid in pids}
        self.peak = {pid: 0 for pid in pids}
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for pid, proc in self.procs.items():
                try:
                    self.peak[pid] = max(self.peak[pid], proc.memory_info().rss)
                except Exception:  # the process is gone (a restart: reported through the pids)
                    pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def part2(args, workdir):
    import distributed
    from dask.utils import parse_bytes

    from softxent import SoftmaxRegression
    from softxent.dask import read_table, start_local_cluster

    limit = parse_bytes(args.ooc_memory_limit)
    D, K = args.d, args.k
    n_rows = args.ooc_rows or int(args.ooc_factor * args.ooc_workers * limit / (8 * (D + 1)))
    data_bytes = n_rows * 8 * (D + 1)
    path = os.path.join(workdir, "ooc")
    t0 = time.perf_counter()
    write_parquet_data(path, n_rows, D, K, args.seed + 1, args.ooc_rows_per_file)
    t_write = time.perf_counter() - t0
    on_disk = sum(f.stat().st_size for f in Path(path).glob("*.parquet"))
    print(f"out of core: {n_rows} rows x {D} float64 + int64 label = {data_bytes / 2**30:.2f} GiB in memory, "
          f"{on_disk / 2**30:.2f} GiB of Parquet in {len(list(Path(path).glob('*.parquet')))} files "
          f"(written in {t_write:.1f} s); workers: {args.ooc_workers} x {args.ooc_memory_limit}", flush=True)
    cluster = start_local_cluster(n_workers=args.ooc_workers, memory_limit=args.ooc_memory_limit,
                                  silence_logs=False)
    client = distributed.Client(cluster, set_as_default=False)
    pids_before = client.run(os.getpid)
    curve = []
    t_start = time.perf_counter()
    with client.as_current(), RssPoller(pids_before.values()) as poller:
        X, y, _ = read_table(os.path.join(path, "*.parquet"), target="y")
        t_read = time.perf_counter() - t_start
        est = SoftmaxRegression(alpha=ALPHA, solver="lbfgs", tol=args.ooc_tol, max_iter=args.max_iter,
                                callback=lambda info: curve.append((time.perf_counter() - t_start, info.objective)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est.fit(X, y)
    total = time.perf_counter() - t_start
    pids_after = client.run(os.getpid)
    left = client.run_on_scheduler(
        lambda dask_scheduler: sum(1 for e in dask_scheduler.get_events("all")
                                   if isinstance(e[1], dict) and e[1].get("action") == "remove-worker"))
    restarted = pids_before != pids_after
    peaks = {addr: poller.peak[pid] for addr, pid in pids_before.items()}
    result = {
        "rows": n_rows, "features": D, "classes": K, "data_gib": data_bytes / 2**30, "parquet_gib": on_disk / 2**30,
        "workers": args.ooc_workers, "memory_limit": args.ooc_memory_limit,
        "data/total_memory_limit": data_bytes / (args.ooc_workers * limit),
        "read_table_s": t_read, "fit_total_s": total, "iterations": est.n_iter_,
        "evaluations": getattr(est, "n_evaluations_", None), "objective": est.objective_,
        "s_per_evaluation": (total - t_read) / max(1, getattr(est, "n_evaluations_", 1) or 1),
        "peak_worker_rss_gib": {a: p / 2**30 for a, p in peaks.items()},
        "peak_rss/memory_limit": max(peaks.values()) / limit,
        "workers_restarted": bool(restarted), "scheduler_remove_worker_events": int(left),
        "warnings": [str(w.message)[:200] for w in caught],
    }
    print(f"  fit: {total:.1f} s ({t_read:.1f} s read_table), {est.n_iter_} iterations, objective "
          f"{est.objective_:.12g}; peak worker RSS {[round(p / 2**30, 2) for p in peaks.values()]} GiB "
          f"(limit {args.ooc_memory_limit}); workers restarted: {restarted}", flush=True)
    client.close()
    cluster.close()
    return result


# ------------------------------------------------------------------------------------------- main
def main():
    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)  # no INFO chatter from clusters starting / closing
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no Spark unless --spark; seconds")
    ap.add_argument("--spark", action=argparse.BooleanOptionalAction, default=None,
                    help="include Spark MLlib (default: yes, except with --quick)")
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--block-rows", type=int, default=25_000, help="rows per Dask block")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-rounds", type=int, default=15, help="alternated rounds of the one-evaluation timing")
    ap.add_argument("--tol", type=float, default=1e-10, help="softxent's gradient tolerance")
    ap.add_argument("--rel", type=float, default=1e-9, help="'same objective': within this of the best")
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--spark-tol", type=float, default=1e-12)
    ap.add_argument("--spark-max-iter", type=int, default=1000)
    ap.add_argument("--skip-ooc", action="store_true", help="skip part 2 (out of core)")
    ap.add_argument("--skip-part1", action="store_true", help="skip part 1 (engines on the same data)")
    ap.add_argument("--ooc-workers", type=int, default=2)
    ap.add_argument("--ooc-memory-limit", default="640MiB", help="memory_limit of each out-of-core worker")
    ap.add_argument("--ooc-factor", type=float, default=3.0, help="data size / total memory_limit")
    ap.add_argument("--ooc-rows", type=int, default=0, help="rows of the out-of-core data (0: from --ooc-factor)")
    ap.add_argument("--ooc-rows-per-file", type=int, default=25_000,
                    help="rows per Parquet file = per block (20 MB at D=100: the few copies a block goes through "
                         "while read fit next to a worker's own ~0.25 GiB)")
    ap.add_argument("--ooc-tol", type=float, default=1e-6)
    ap.add_argument("--workdir", default=None, help="where the Parquet files go (default: a temporary folder)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.d, args.k, args.block_rows, args.repeats = 6000, 20, 4, 1500, 1
        args.ooc_rows = args.ooc_rows or 40_000
        args.ooc_rows_per_file = 10_000
    if args.spark is None:
        args.spark = not args.quick

    workdir = args.workdir or tempfile.mkdtemp(prefix="softxent-fit-dask-")
    os.makedirs(workdir, exist_ok=True)
    rows = []
    try:
        p1 = None if args.skip_part1 else part1(args, rows, workdir)
        p2 = None if args.skip_ooc else part2(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if p1 is not None:
        _print_part1(args, rows, p1)
    if p2 is not None:
        print_table([{k: v for k, v in p2.items() if not isinstance(v, (dict, list))}],
                    ["rows", "data_gib", "data/total_memory_limit", "memory_limit", "fit_total_s", "iterations",
                     "s_per_evaluation", "peak_rss/memory_limit", "workers_restarted"],
                    title="out of core (lbfgs, blocks streamed from Parquet)")
    partial = args.skip_part1 or args.skip_ooc
    write_json("fit_dask" + ("_quick" if args.quick else "") + ("_partial" if partial else ""),
               {"args": vars(args), "alpha": ALPHA, "rows": rows, "part1": p1, "out_of_core": p2})


def _print_part1(args, rows, p1):
    print_table(rows, ["contender", "time_to_target_s", "spark_time/this", "iterations", "final_rel_gap", "reached",
                       "total_s"],
                title=f"{args.n} x {args.d}, {args.k} classes: time to within {args.rel:g} of the best objective "
                      f"(alpha = regParam = {ALPHA})")
    print_table(p1["evals"], ["what", "eval_s", "worker_compute_s", "worker_compute/in_memory", "noop_map_reduce_s",
                              "blocks", "tasks", "overhead_vs_ideal"],
                title="one objective+gradient evaluation")


if __name__ == "__main__":
    main()

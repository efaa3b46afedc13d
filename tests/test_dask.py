"""SoftmaxRegression on Dask: the map-reduce objective against the in-memory one, fits against in-memory
fits, streaming partial_fit, a worker killed mid-fit, bad input, lazy predict, reading tables.

One LocalCluster (2 single-threaded worker processes on 127.0.0.1) serves the whole module.  Data are
small (3000 x 20, 4 classes) so that the ~20 map-reduces of a fit take seconds even on 2 busy cores.
"""

import os
import platform
import signal
import time

import numpy as np
import pytest

pytest.importorskip("sklearn")
distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

from softxent import SoftmaxRegression  # noqa: E402
from softxent.dask import DaskBlocks, fit_dask, read_table, start_local_cluster  # noqa: E402
from softxent.dask.objective import DaskLinearSoftmaxObjective  # noqa: E402
from softxent.objective import LinearSoftmaxObjective  # noqa: E402

N, D, K = 3000, 20, 4
CHUNKS = (700, 1300, 1000)  # uneven row blocks


@pytest.fixture(scope="module")
def client():
    cluster = start_local_cluster(n_workers=2, memory_limit="2GiB")
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def _softmax_data(seed, n=N, d=D, k=K, single_class_rows=0):
    """Rows from a random softmax model; the first ``single_class_rows`` rows all get class 0."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d)
    W = rng.standard_normal((k, d)) / np.sqrt(d) * 2
    z = X @ W.T
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    y = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    y[:single_class_rows] = 0
    sw = rng.uniform(0.0, 3.0, n)
    return X, y, sw


def _dask(*arrays, chunks=CHUNKS):
    return [None if a is None else da.from_array(a, chunks=(chunks,) + a.shape[1:]) for a in arrays]


# ------------------------------------------------------------------------------ the objective itself
@pytest.mark.parametrize("persist, coef_node", [(True, True), (True, False), (False, True)])
def test_objective_matches_in_memory(client, persist, coef_node):
    """Loss, gradient, Hessian-vector product, Hessian diagonal and Lipschitz bound of the map-reduce equal
    LinearSoftmaxObjective's on the concatenated data (at random w, with weights and both penalties)."""
    X, y, sw = _softmax_data(1)
    Xd, yd, swd = _dask(X, y, sw)
    blocks = DaskBlocks.from_arrays(client, Xd, yd, swd, persist=persist)
    assert blocks.persisted is persist
    np.testing.assert_array_equal(blocks.labels, np.arange(K))
    np.testing.assert_array_equal(blocks.label_counts, np.bincount(y))
    cw = np.array([1.0, 2.0, 0.5, 1.5])
    obj = blocks.objective(np.arange(K), cw, alpha=0.03, l1_ratio=0.3, fit_intercept=True, coef_node=coef_node)
    ref = LinearSoftmaxObjective(X, y, K, sw * cw[y], alpha=0.03, l1_ratio=0.3, fit_intercept=True)
    assert isinstance(obj, DaskLinearSoftmaxObjective)
    assert obj.weight_sum == pytest.approx(ref.weight_sum, rel=1e-14)
    rng = np.random.default_rng(2)
    w, v = rng.standard_normal(ref.n_coef), rng.standard_normal(ref.n_coef)
    f, g = obj.loss_gradient(w)
    f_ref, g_ref = ref.loss_gradient(w)
    assert f == pytest.approx(f_ref, rel=1e-13)
    np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-14)
    assert obj.loss(w) == pytest.approx(f_ref, rel=1e-13)
    assert obj.objective(w) == pytest.approx(ref.objective(w), rel=1e-13)
    np.testing.assert_allclose(obj.hessp(w, v), ref.hessp(w, v), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(obj.hessp(w, 2 * v), ref.hessp(w, 2 * v), rtol=1e-12, atol=1e-14)  # cached h
    np.testing.assert_allclose(obj.hessian_diag(w), ref.hessian_diag(w), rtol=1e-12, atol=1e-14)
    assert obj.lipschitz_bound() == pytest.approx(ref.lipschitz_bound(), rel=1e-14)
    np.testing.assert_array_equal(obj.prox_l1(w, 0.5), ref.prox_l1(w, 0.5))
    assert obj.n_coef == ref.n_coef and obj.n_rows == N and obj.chunks == CHUNKS
    gram, weight = obj.data_gram_sum()  # Newton-CG's preconditioner: all rows of all blocks
    gram_ref, weight_ref = ref.data_gram_sum()
    np.testing.assert_allclose(gram, gram_ref, rtol=1e-12, atol=1e-12)
    assert weight == pytest.approx(weight_ref, rel=1e-13)


def test_graph_does_not_grow(client):
    """Each evaluation's tasks are released after it: the scheduler holds as many tasks after 15
    evaluations as after one (only the persisted blocks and their lineage)."""
    X, y, _ = _softmax_data(3)
    Xd, yd = _dask(X, y)
    obj = DaskBlocks.from_arrays(client, Xd, yd, persist=True).objective(np.arange(K), alpha=1e-2)

    def n_tasks():
        return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))

    w = np.zeros(obj.n_coef)
    obj.loss_gradient(w)
    obj.hessp(w, w + 1)  # the softmax at w stays on the workers (one task per worker) until w changes
    # one task per worker and evaluation, over the blocks that worker holds
    groups = obj._current_groups()
    assert sorted(i for g in groups for i in g) == list(range(len(CHUNKS)))
    who_has = client.who_has(obj.blocks)
    assert len(groups) == len({sorted(who_has[b.key])[0] for b in obj.blocks}) <= 2
    before = n_tasks()
    for i in range(15):
        w[i] = 0.1
        obj.loss_gradient(w)
        obj.hessp(w, w + 1)
    # the client releases futures in the background: poll until the scheduler has caught up
    deadline = time.monotonic() + 10
    while n_tasks() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert n_tasks() <= before
    del obj  # dropping the objective releases its blocks and their lineage too
    deadline = time.monotonic() + 10
    while n_tasks() > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert n_tasks() == 0


def test_local_cluster_listens_on_loopback_only(client):
    psutil = pytest.importorskip("psutil")
    procs = [psutil.Process()] + psutil.Process().children(recursive=True)
    listening = [c.laddr for p in procs for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 5  # scheduler (+ its HTTP routes), 2 workers, 2 nannies
    assert all(addr.ip == "127.0.0.1" for addr in listening), listening


def test_workers_blas_single_threaded(client):
    def blas_threads():
        from threadpoolctl import threadpool_info

        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    for threads in client.run(blas_threads).values():
        assert threads and all(t == 1 for t in threads)
    addresses = list(client.scheduler_info()["workers"])
    assert addresses and all(a.startswith("tcp://127.0.0.1:") for a in addresses)


# Minor page faults while 20 arrays of 1 MiB are allocated, filled and freed in turn: 0 when the freed heap
# is reused, ~256 per array when each one is a fresh mmap.  Source text, to run in a fresh process too.
_PAGE_FAULTS_SOURCE = """
def _page_faults_of_fresh_arrays():
    import resource
    import numpy as np

    np.ones(1 << 17).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        np.ones(1 << 17).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""
exec(_PAGE_FAULTS_SOURCE)


# What the malloc tests measure is glibc's allocator; elsewhere tune_malloc does nothing by design.  The
# C library is read from the interpreter (not from tune_malloc's answer), so that a tune_malloc that
# wrongly gave up on glibc fails these tests instead of skipping them.
_needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")


@_needs_glibc
def test_tune_malloc_reuses_freed_heap():
    """In a process started as distributed's Nanny starts workers (MALLOC_TRIM_THRESHOLD_=65536), every
    1 MiB temporary is a fresh mmap; after tune_malloc the freed heap is reused."""
    import subprocess
    import sys
    import textwrap

    code = _PAGE_FAULTS_SOURCE + textwrap.dedent("""
        from softxent.dask.worker_setup import tune_malloc
        before = _page_faults_of_fresh_arrays()
        tuned = tune_malloc()
        print(before, tuned, _page_faults_of_fresh_arrays())
    """)
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    before, tuned, after = out.stdout.split()
    assert tuned == "True", out.stdout  # glibc (the module's skip mark): tune_malloc must take effect
    assert int(before) > 20 * 200 and int(after) < 200, out.stdout


@_needs_glibc
def test_workers_preload_malloc_tuning(client):
    """start_local_cluster's workers run softxent.dask.worker_setup: fresh temporaries reuse the heap."""
    faults = client.run(_page_faults_of_fresh_arrays)
    assert len(faults) == 2 and all(f < 200 for f in faults.values()), faults


# ------------------------------------------------------------------------------ fits
@pytest.mark.parametrize("case", [
    dict(params=dict(solver="lbfgs", alpha=1e-3, tol=1e-9), weights=True, persist="auto"),
    dict(params=dict(solver="newton-cg", alpha=1e-3, tol=1e-9, class_weight="balanced"), weights=True,
         persist=True, coef_node=True),
    dict(params=dict(solver="proximal", alpha=2e-2, l1_ratio=0.7, tol=1e-7, class_weight={0: 3.0, 2: 0.5}),
         weights=False, persist=True),
], ids=["lbfgs-weights", "newton-cg-balanced", "proximal-l1"])
def test_fit_equals_in_memory(client, case):
    """The dask fit reaches the in-memory fit's objective (1e-8 relative) and coefficients, on uneven
    blocks whose first block holds a single class."""
    X, y, sw = _softmax_data(4, single_class_rows=CHUNKS[0])
    sw = sw if case["weights"] else None
    ref = SoftmaxRegression(**case["params"]).fit(X, y, sample_weight=sw)
    Xd, yd, swd = _dask(X, y, sw)
    assert np.unique(y[:CHUNKS[0]]).size == 1
    est = fit_dask(SoftmaxRegression(**case["params"]), Xd, yd, swd, persist=case["persist"],
                   coef_node=case.get("coef_node", False))
    assert abs(est.objective_ - ref.objective_) <= 1e-8 * abs(ref.objective_)
    np.testing.assert_allclose(est.coef_, ref.coef_, atol=1e-5)
    np.testing.assert_allclose(est.intercept_, ref.intercept_, atol=1e-5)
    np.testing.assert_array_equal(est.classes_, ref.classes_)
    assert est.n_features_in_ == D and est.solver_ == case["params"]["solver"]
    assert isinstance(est.coef_, np.ndarray) and est.n_iter_ > 1
    if case["params"]["solver"] == "proximal":
        assert np.sum(est.coef_ == 0) > 0
        np.testing.assert_array_equal(est.coef_ == 0, ref.coef_ == 0)
    if case["params"]["solver"] == "lbfgs":  # the estimator's own fit dispatches dask input here
        est2 = SoftmaxRegression(**case["params"]).fit(Xd, yd, sample_weight=swd)
        assert est2.objective_ == pytest.approx(est.objective_, rel=1e-12)


def test_fit_streamed_from_source(client):
    """persist=False (out of core): every evaluation recomputes the blocks from the (seeded) source."""
    rs = da.random.default_rng(7)
    Xd = rs.standard_normal((N, D), chunks=(CHUNKS, (D,)))
    yd = (Xd[:, :K] + rs.standard_normal((N, K), chunks=(CHUNKS, (K,)))).argmax(axis=1)
    X, y = Xd.compute(), yd.compute()
    ref = SoftmaxRegression(alpha=1e-3, tol=1e-9).fit(X, y)
    est = fit_dask(SoftmaxRegression(alpha=1e-3, tol=1e-9), Xd, yd, persist=False)
    assert abs(est.objective_ - ref.objective_) <= 1e-8 * ref.objective_
    np.testing.assert_allclose(est.coef_, ref.coef_, atol=1e-6)


def test_fit_without_a_client_starts_and_closes_a_local_cluster(client, monkeypatch):
    """With no current client, fit starts a LocalCluster on 127.0.0.1 (one worker here, to save time) and
    shuts it down after the fit."""
    import softxent.dask._cluster as cluster_module

    started = []

    def one_worker_cluster(n_workers=None, **kwargs):
        cluster = start_local_cluster(n_workers=1, **kwargs)
        started.append(cluster)
        return cluster

    monkeypatch.setattr(cluster_module, "current_client", lambda: None)
    monkeypatch.setattr(cluster_module, "start_local_cluster", one_worker_cluster)
    X, y, _ = _softmax_data(16)
    Xd, yd = _dask(X, y)
    est = SoftmaxRegression(alpha=1e-2, tol=1e-9).fit(Xd, yd)
    ref = SoftmaxRegression(alpha=1e-2, tol=1e-9).fit(X, y)
    assert abs(est.objective_ - ref.objective_) <= 1e-8 * ref.objective_
    assert len(started) == 1 and started[0].scheduler_address.startswith("tcp://127.0.0.1:")
    assert started[0].status.name == "closed"
    assert distributed.default_client() is client  # the caller's default client is untouched


def test_interrupted_fit_keeps_last_iterate(client):
    X, y, _ = _softmax_data(17)
    Xd, yd = _dask(X, y)
    seen = []

    def stop_at_3(info):
        seen.append(info.coef.copy())
        if info.iteration == 3:
            raise KeyboardInterrupt

    est = SoftmaxRegression(alpha=1e-3, callback=stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        est.fit(Xd, yd)
    assert est.interrupted_ and len(est.loss_curve_) == 3
    np.testing.assert_array_equal(est.coef_, seen[-1])


def test_not_converged_warns_at_the_callers_line(client):
    from sklearn.exceptions import ConvergenceWarning

    X, y, _ = _softmax_data(7)
    Xd, yd = _dask(X, y)
    with pytest.warns(ConvergenceWarning, match="did not converge within max_iter=2") as record:
        SoftmaxRegression(alpha=1e-4, max_iter=2, tol=1e-12).fit(Xd, yd)
    assert record[0].filename == __file__


def test_fit_string_labels_float32(client):
    X, y, _ = _softmax_data(5)
    labels = np.array(["cat", "dog", "eel", "fox"], dtype=object)[y]
    X32 = X.astype(np.float32)
    ref = SoftmaxRegression(alpha=1e-2, tol=1e-6).fit(X32, labels)
    Xd, yd = _dask(X32, labels)
    est = SoftmaxRegression(alpha=1e-2, tol=1e-6).fit(Xd, yd)
    assert est.coef_.dtype == np.float32
    np.testing.assert_array_equal(est.classes_, ref.classes_)
    assert est.objective_ == pytest.approx(ref.objective_, rel=1e-6)
    assert (est.predict(Xd).compute() == ref.predict(X32)).mean() > 0.99


def test_worker_killed_mid_fit(client):
    """Kill (SIGKILL) the worker process holding the most blocks after iteration 3: Dask recomputes its
    blocks from the seeded source and the fit reaches the same objective."""
    rs = da.random.default_rng(42)
    Xd = rs.standard_normal((N, D), chunks=(600, D))
    yd = (Xd[:, :K] * 2 + rs.standard_normal((N, K), chunks=(600, K))).argmax(axis=1)
    ref = SoftmaxRegression(alpha=1e-3, tol=1e-8).fit(Xd, yd)
    killed = {}

    def kill_one(info):
        if info.iteration == 3 and not killed:
            held = {w: sum(str(k).startswith("prepare_block") for k in keys)
                    for w, keys in client.has_what().items()}
            victim = max(held, key=held.get)
            pid = client.run(os.getpid, workers=[victim])[victim]
            os.kill(pid, signal.SIGKILL)
            killed.update(address=victim, pid=pid, blocks=held[victim])
        return False

    est = SoftmaxRegression(alpha=1e-3, tol=1e-8, callback=kill_one).fit(Xd, yd)
    assert killed and killed["blocks"] >= 1
    with pytest.raises(OSError):
        os.kill(killed["pid"], 0)  # the process is gone
    assert abs(est.objective_ - ref.objective_) <= 1e-8 * abs(ref.objective_)
    np.testing.assert_allclose(est.coef_, ref.coef_, atol=1e-6)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it for the next tests
    faults = client.run(_page_faults_of_fresh_arrays)  # the restarted worker ran the preload too
    assert all(f < 200 for f in faults.values()), faults


def test_fit_sgd_streams_blocks(client):
    """sgd / adam on dask: epochs of plain minibatches over the blocks, streamed to the client.  They get
    as far as the same epochs of in-memory ``partial_fit`` (whose minibatches are shuffled over all rows,
    not within blocks); the in-memory ``fit`` (variance-reduced minibatches) gets at least as far."""
    X, y, _ = _softmax_data(6)
    Xd, yd = _dask(X, y)
    for solver, lr in (("sgd", "auto"), ("adam", 0.05)):
        params = dict(solver=solver, alpha=1e-3, max_iter=12, tol=0.0, random_state=0, learning_rate=lr)
        streamed = SoftmaxRegression(**params)
        for _ in range(12):
            streamed.partial_fit(X, y, classes=np.arange(K))
        with pytest.warns(Warning):  # tol=0: all epochs run, and it says it did not converge
            in_memory = SoftmaxRegression(**params).fit(X, y)
        with pytest.warns(Warning):
            est = SoftmaxRegression(**params).fit(Xd, yd)
        assert est.n_iter_ == 12 and len(est.loss_curve_) == 12
        assert est.loss_curve_[-1] < est.loss_curve_[0]
        assert est.objective_ == pytest.approx(streamed.objective_, rel=0.05)
        assert in_memory.objective_ <= est.objective_ * (1 + 1e-9)


def test_sgd_early_stopping_on_validation_rows(client):
    """early_stopping holds out validation_fraction of each block (the same rows on the cluster and on the
    client); the curve is the validation objective, and the fit stops when it stalls."""
    from softxent.dask import _blocks

    X, y, _ = _softmax_data(18)
    Xd, yd = _dask(X, y)
    est = SoftmaxRegression(solver="adam", learning_rate=0.05, alpha=1e-3, early_stopping=True,
                            validation_fraction=0.2, n_iter_no_change=2, tol=1e-3, max_iter=50, random_state=3)
    est.fit(Xd, yd)
    assert 3 <= est.n_iter_ < 50
    # the validation rows: the same split_block draw, evaluated in memory at the final coefficients
    starts = np.cumsum((0,) + CHUNKS)
    parts = [_blocks.split_block((X[a:b], y[a:b], None), 0.2, [3, 0], i, "validation")
             for i, (a, b) in enumerate(zip(starts[:-1], starts[1:]))]
    X_val, y_val = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    assert 0.15 * N < len(y_val) < 0.25 * N
    val = LinearSoftmaxObjective(X_val, y_val, K, alpha=1e-3)
    assert est.loss_curve_[-1] == pytest.approx(val.objective(val.pack(est.coef_, est.intercept_)), rel=1e-12)


# ------------------------------------------------------------------------------ partial_fit
def test_partial_fit_over_blocks_equals_numpy_sequence(client):
    X, y, sw = _softmax_data(7)
    Xd, yd, swd = _dask(X, y, sw)
    classes = np.arange(K)
    ref = SoftmaxRegression(solver="adam", random_state=0, batch_size=128)
    starts = np.cumsum((0,) + CHUNKS)
    for _ in range(2):
        for a, b in zip(starts[:-1], starts[1:]):
            ref.partial_fit(X[a:b], y[a:b], classes=classes, sample_weight=sw[a:b])
    est = SoftmaxRegression(solver="adam", random_state=0, batch_size=128)
    est.partial_fit(Xd, yd, classes=classes, sample_weight=swd)
    est.partial_fit(Xd, yd, sample_weight=swd)
    np.testing.assert_array_equal(est.coef_, ref.coef_)
    np.testing.assert_array_equal(est.intercept_, ref.intercept_)
    assert est.n_iter_ == ref.n_iter_ == 6


def test_partial_fit_unknown_label_in_later_block(client):
    X, y, _ = _softmax_data(8)
    y[2500] = 7  # block 2 (rows 2000..2999)
    Xd, yd = _dask(X, y)
    est = SoftmaxRegression(solver="sgd", random_state=0)
    with pytest.raises(ValueError, match=r"labels \[7\] in block 2 \(rows 2000\.\.2999\).*not in classes"):
        est.partial_fit(Xd, yd, classes=np.arange(K))


def test_partial_fit_nan_block():
    X, y, _ = _softmax_data(9)
    X[800, 1] = np.inf
    Xd, yd = _dask(X, y)
    with pytest.raises(ValueError, match=r"NaN or infinity in block 1 \(rows 700\.\.1999\)"):
        SoftmaxRegression(solver="sgd").partial_fit(Xd, yd, classes=np.arange(K))


# ------------------------------------------------------------------------------ bad input
def test_unknown_chunk_sizes():
    X, y, _ = _softmax_data(10)
    Xd, yd = _dask(X, y)
    keep = Xd[:, 0] > -10  # always true, but dask cannot know the block lengths
    with pytest.raises(ValueError, match=r"X has unknown chunk sizes.*compute_chunk_sizes\(\)"):
        SoftmaxRegression().fit(Xd[keep], yd[keep])
    with pytest.raises(ValueError, match=r"y has unknown chunk sizes.*compute_chunk_sizes\(\)"):
        SoftmaxRegression().fit(Xd, yd[keep])


def test_chunks_do_not_line_up():
    X, y, sw = _softmax_data(11)
    Xd, _ = _dask(X, y)
    yd = da.from_array(y, chunks=1000)
    with pytest.raises(ValueError, match=r"row chunks of X and y do not line up: X has row chunks "
                                         r"\(700, 1300, 1000\), y has \(1000, 1000, 1000\)"):
        SoftmaxRegression().fit(Xd, yd)
    with pytest.raises(ValueError, match="X and y have different numbers of rows"):
        SoftmaxRegression().fit(Xd, da.from_array(y[:-1], chunks=1000))
    with pytest.raises(ValueError, match="row chunks of X and sample_weight do not line up"):
        SoftmaxRegression().fit(Xd, _dask(y)[0], sample_weight=da.from_array(sw, chunks=1000))


def test_nan_in_one_block(client):
    X, y, sw = _softmax_data(12)
    X[2100, 5] = np.nan
    Xd, yd = _dask(X, y)
    with pytest.raises(ValueError, match=r"X contains NaN or infinity: 1 entries in block 2 \(rows 2000\.\.2999\)"):
        SoftmaxRegression().fit(Xd, yd)
    X[2100, 5] = 0.0
    sw[900] = -1.0
    Xd, yd, swd = _dask(X, y, sw)
    with pytest.raises(ValueError, match=r"Negative values in data passed to sample_weight: 1 in block 1"):
        SoftmaxRegression().fit(Xd, yd, sample_weight=swd)


def test_other_bad_input(client):
    X, y, _ = _softmax_data(13)
    Xd, _ = _dask(X, y)
    with pytest.raises(ValueError, match="only one class"):
        SoftmaxRegression().fit(Xd, _dask(np.zeros(N, dtype=int))[0])
    with pytest.raises(ValueError, match="Unknown label type"):
        SoftmaxRegression().fit(Xd, _dask(np.linspace(0, 1, N))[0])
    with pytest.raises(ValueError, match="must not sum to zero"):
        SoftmaxRegression().fit(Xd, _dask(y)[0], sample_weight=np.zeros(N))
    with pytest.raises(TypeError, match="X must hold numbers"):
        SoftmaxRegression().fit(da.from_array(np.full((N, 2), "a"), chunks=1000), _dask(y)[0])
    with pytest.raises(ValueError, match="persist must be"):
        fit_dask(SoftmaxRegression(), Xd, _dask(y)[0], persist="sometimes")


def test_weight_taming_and_scale_check_as_in_memory(client):
    """Issue 18: fit_dask skipped the in-memory fit's weight taming (weights near 1e308: S overflowed) and its
    scale check (features of 1e150: lbfgs returned the uniform model); both now run through the estimator's
    own functions."""
    X, y, sw = _softmax_data(14, n=600, d=5)
    chunks = (200, 150, 250)
    params = dict(solver="lbfgs", alpha=1e-3, tol=1e-8, class_weight={0: 1.0, 1: 0.5})
    weights = sw * 1e307  # up to 3e307: their sum overflows
    ref = SoftmaxRegression(**params).fit(X, y, sample_weight=weights)
    est = SoftmaxRegression(**params).fit(*_dask(X, y, weights, chunks=chunks))
    assert np.isfinite(est.objective_) and abs(est.objective_ - ref.objective_) <= 1e-8 * ref.objective_
    np.testing.assert_allclose(est.coef_, ref.coef_, atol=1e-5)
    with pytest.raises(ValueError, match=r"X has rows of norm up to \d\.\d+e\+150: .*scale the features"):
        SoftmaxRegression().fit(*_dask(X * 1e150, y, chunks=chunks))


# ------------------------------------------------------------------------------ predict
@pytest.mark.parametrize("n_classes", [2, K])
def test_predict_lazily_on_dask(client, n_classes):
    X, y, _ = _softmax_data(14, k=n_classes)
    est = SoftmaxRegression(alpha=1e-2).fit(X, y)
    Xd = da.from_array(X, chunks=(CHUNKS, (10, 10)))  # column blocks too: rechunked to one
    for method in ("predict", "predict_proba", "predict_log_proba", "decision_function"):
        lazy = getattr(est, method)(Xd)
        assert isinstance(lazy, da.Array)
        expected = getattr(est, method)(X)
        assert lazy.shape == expected.shape and lazy.dtype == expected.dtype
        np.testing.assert_array_equal(lazy.compute(), expected)
    with pytest.raises(ValueError, match="X has 3 features, but SoftmaxRegression is expecting 20"):
        est.predict(Xd[:, :3])


# ------------------------------------------------------------------------------ tables
def test_read_table_and_fit_dataframe(client, tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    dd = pytest.importorskip("dask.dataframe")
    X, y, _ = _softmax_data(15)
    names = [f"f{j}" for j in range(D)]
    frame = pd.DataFrame(X, columns=names).assign(label=np.array(["a", "b", "c", "d"])[y])
    for i, part in enumerate(np.array_split(np.arange(N), 3)):
        frame.iloc[part].to_parquet(tmp_path / f"part{i}.parquet")
        frame.iloc[part].to_csv(tmp_path / f"part{i}.csv", index=False)
    for pattern in ("*.parquet", "*.csv"):
        Xr, yr, cols = read_table(str(tmp_path / pattern), target="label")
        assert cols == names and Xr.dtype == np.float64 and Xr.numblocks[1] == 1
        assert not any(np.isnan(c) for c in Xr.chunks[0]) and Xr.chunks[0] == yr.chunks[0]
        np.testing.assert_allclose(Xr.compute(), X, rtol=1e-15)
        np.testing.assert_array_equal(yr.compute(), frame["label"].to_numpy())
    with pytest.raises(ValueError, match="target column 'nope' is not in the data"):
        read_table(str(tmp_path / "*.parquet"), target="nope")
    with pytest.raises(ValueError, match="no files match"):
        read_table(str(tmp_path / "*.feather"), target="label")
    with pytest.raises(ValueError, match=r"feature columns must be numeric for a Dask fit; \['label'\]"):
        read_table(str(tmp_path / "*.parquet"), target="f0")
    # a dask DataFrame goes straight into fit: feature names are kept
    ddf = dd.read_parquet(str(tmp_path / "*.parquet"))
    ref = SoftmaxRegression(alpha=1e-2, tol=1e-9).fit(frame[names], frame["label"])
    est = SoftmaxRegression(alpha=1e-2, tol=1e-9).fit(ddf[names], ddf["label"])
    assert list(est.feature_names_in_) == names
    assert abs(est.objective_ - ref.objective_) <= 1e-8 * ref.objective_
    np.testing.assert_array_equal(est.predict(ddf[names]).compute(), ref.predict(frame[names]))


def test_aligned_copies_only_misaligned_blocks():
    """A block received from another process can start at any byte; load_block copies it to an
    aligned address once (the values unchanged), and leaves an aligned block alone."""
    from softxent.dask._blocks import ALIGNMENT, aligned, load_block

    rng = np.random.default_rng(3)
    X = rng.standard_normal((37, 5))
    raw = np.empty(X.nbytes + 3, dtype=np.uint8)
    odd = raw[3:3 + X.nbytes].view(np.float64).reshape(X.shape)  # starts 3 bytes past the buffer
    odd[...] = X
    if odd.ctypes.data % ALIGNMENT == 0:  # the buffer itself started 3 bytes before a boundary
        odd = raw[:X.nbytes].view(np.float64).reshape(X.shape)
        odd[...] = X
    assert odd.ctypes.data % ALIGNMENT != 0
    fixed = aligned(odd)
    assert fixed.ctypes.data % ALIGNMENT == 0 and fixed.flags.c_contiguous
    np.testing.assert_array_equal(fixed, X)
    assert aligned(fixed) is fixed
    Xb, yb, sb = load_block(odd, np.arange(37) % 3, None, np.float64)
    assert Xb.ctypes.data % ALIGNMENT == 0
    np.testing.assert_array_equal(Xb, X)

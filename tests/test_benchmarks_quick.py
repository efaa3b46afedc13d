"""The benchmark scripts still run: each one's ``--quick`` mode (tiny sizes, seconds) end to end in a
subprocess, writing its JSON.  Timings are not checked here (speed is measured by running the scripts
on a quiet machine); this keeps them from rotting between those runs -- above all the GPU script, which
runs on a lent GPU with one try, and whose --quick mode runs the same code on the CPU under Triton's
interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"


def _run(script, *args, env_extra=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), **(env_extra or {}))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def _json(name):
    data = json.loads((OUT / f"{name}.json").read_text())
    assert "machine" in data
    return data


def test_loss_cpu_quick():
    pytest.importorskip("torch")
    _run("loss_cpu.py")
    assert _json("loss_cpu_quick")


def test_linear_ce_cpu_quick():
    pytest.importorskip("torch")
    _run("linear_ce_cpu.py")
    assert _json("linear_ce_cpu_quick")


def test_linear_ce_gpu_quick():
    """The gate against float64 (kernels and API pass), the bitwise checks, and every softxent row 'ok'
    (the peers' rows are errors when their packages are absent, by design): on a GPU with tiny shapes,
    without one on the CPU under Triton's interpreter."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    _run("linear_ce_gpu.py", env_extra=None if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"})
    data = _json("linear_ce_gpu_quick")
    gate = data["gate"]
    for label in ("plain", "bias+softcap30+ignore"):
        assert all(gate[label][k]["pass"] for k in ("kernels", "kernels_bf16delta", "api", "api_sorted")), \
            gate[label]
    assert gate["bitwise"] == {"repeat_equal": True, "lo_in_dw_equal": True}, gate["bitwise"]
    options = gate["options"]   # issue 17: soft targets, differentiable lse, z-loss part, accuracy
    assert set(options) == {"soft", "lse", "z_loss", "accuracy"} and all(v.get("pass") for v in options.values()), \
        options
    ours = [r for r in data["rows"] if r["impl"].startswith("softxent")]
    assert ours and all(r["status"] == "ok" for r in ours), ours


def test_fit_dask_quick():
    pytest.importorskip("dask")
    pytest.importorskip("distributed")
    _run("fit_dask.py")
    assert _json("fit_dask_quick")


def test_fit_cpu_quick_on_two_datasets():
    """Two of its six data sets (one dense, one sparse) in float32, every contender (scikit-learn and torch
    at 1 and 2 threads, the refits): the full --quick takes one to two minutes."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    _run("fit_cpu.py", "--datasets", "digits", "sparse-20000x100000", "--dtypes", "float32")
    data = _json("fit_cpu_digits_sparse-20000x100000_quick")
    assert {r["contender"] for r in data["rows"]} >= {"softxent newton-cg", "sklearn lbfgs @1", "sklearn lbfgs @2",
                                                      "torch L-BFGS @2", "sklearn saga @1", "sklearn newton-cg @2"}
    assert len(data["summary"]) == 2 and len(data["evals"]) == 4
    assert set(data["loadavg_1m"]) == {"start", "end"}


def _fit_cpu_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import fit_cpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return fit_cpu


def test_fit_cpu_quick_busy_neighbour_and_scaling(monkeypatch):
    """The covtype-like sets, busy-neighbour and n_jobs-scaling modes, in this process (seconds): with an
    estimator and an objective that take ``n_jobs`` (stand-ins for issue 14's, which do nothing with it),
    and once with an estimator without it, where --scaling is skipped with a note."""
    pytest.importorskip("sklearn")
    pytest.importorskip("threadpoolctl")
    fit_cpu = _fit_cpu_module()

    class WithNJobs(fit_cpu.SoftmaxRegression):
        def __init__(self, alpha=1e-4, solver="auto", max_iter=1000, tol=1e-6, callback=None, n_jobs=None):
            super().__init__(alpha=alpha, solver=solver, max_iter=max_iter, tol=tol, callback=callback)
            self.n_jobs = n_jobs

    class ObjectiveWithNJobs(fit_cpu.LinearSoftmaxObjective):
        def __init__(self, *args, n_jobs=None, **kwargs):
            super().__init__(*args, **kwargs)

    args = ["--quick", "--datasets", "covtype-unscaled", "--dtypes", "float32", "--solvers", "newton-cg",
            "--only", "softxent", "sklearn lbfgs", "--scaling", "--busy-neighbour", "--out", "fit_cpu_modes_quick"]
    with monkeypatch.context() as m:
        m.setattr(fit_cpu, "SoftmaxRegression", WithNJobs)
        m.setattr(fit_cpu, "LinearSoftmaxObjective", ObjectiveWithNJobs)
        fit_cpu.main(args)
    data = _json("fit_cpu_modes_quick")
    names = {"softxent newton-cg", "softxent newton-cg n_jobs=1", "softxent newton-cg n_jobs=2",
             "sklearn lbfgs @1", "sklearn lbfgs @2"}
    assert {(r["contender"], r["load"]) for r in data["rows"]} == {(n, ld) for n in names for ld in ("quiet", "busy")}
    assert {r["contender"] for r in data["busy"]} == names
    assert [g["load"] for g in data["groups"]] == ["quiet", "busy"]
    assert {(r["load"], r["solver"]) for r in data["scaling"]} == {("quiet", "newton-cg"), ("busy", "newton-cg")}
    assert [e["threads"] for e in data["evals"]] == ["n_jobs=1", "n_jobs=2"]
    assert data["threads"]["estimator_n_jobs"] and data["threads"]["objective_threads_arg"] == ["__init__", "n_jobs"]
    assert data["machine"]["threadpools"] and not data["notes"]

    with monkeypatch.context() as m:
        m.setattr(fit_cpu, "estimator_has_n_jobs", lambda: False)
        fit_cpu.main(["--quick", "--datasets", "covtype-standardised", "--dtypes", "float32", "--solvers",
                      "newton-cg", "--only", "softxent", "--threads", "1", "--scaling", "--out", "fit_cpu_modes_quick"])
    data = _json("fit_cpu_modes_quick")
    assert not data["scaling"] and "no n_jobs parameter" in data["notes"][0]
    assert [r["contender"] for r in data["rows"]] == ["softxent newton-cg"]


def test_busy_neighbour_is_killed_however_the_block_ends():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _harness import busy_neighbour
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    with pytest.raises(KeyboardInterrupt):
        with busy_neighbour() as proc:
            assert proc.poll() is None  # spinning
            raise KeyboardInterrupt
    assert proc.poll() is not None
    with busy_neighbour(False) as nothing:
        assert nothing is None


def test_skip_accuracy_cpu_quick():
    """The skip-accuracy measurement runs, drops tiles once the vocabulary is sorted, its first-order
    correction of the dropped tiles reduces the grad-x error it measures, and float16 deltas beat bf16
    ones on the exact path."""
    pytest.importorskip("torch")
    _run("skip_accuracy_cpu.py")
    rows = {(r["order"], r["variant"]): r for r in _json("skip_accuracy_cpu_quick")["table"]}
    plain, corrected = rows[("sorted", "skip eps/32, no correction")], rows[("sorted", "skip eps/32")]
    assert plain["dropped_tiles"] > 0.1 and plain["dropped_tiles"] == corrected["dropped_tiles"]
    assert corrected["gx_err"] < plain["gx_err"]
    exact, naive = rows[("natural", "exact")], rows[("natural", "naive PyTorch")]
    assert exact["gx_err"] < 1.5 * naive["gx_err"] and exact["gW_err"] < 1.5 * naive["gW_err"]
    bf16_delta = rows[("natural", "exact, bf16 delta")]
    assert exact["gx_err"] < bf16_delta["gx_err"] and exact["delta_dtype"] == "float16"


def test_skip_accuracy_kernels_quick():
    """--kernels runs the Triton backward itself (the interpreter without a GPU) for every variant."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    _run("skip_accuracy_cpu.py", "--kernels",
         env_extra=None if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"})
    rows = {r["variant"]: r for r in _json("skip_accuracy_kernels_quick")["table"]}
    assert len(rows) == 6
    exact = rows["exact"]
    assert exact["dropped_tiles"] == 0 and exact["dx_err"] < 1e-2 and exact["dW_err"] < 1e-2


def test_cli_startup_quick():
    pytest.importorskip("typer")
    _run("cli_startup.py", timeout=600)
    rows = {r["command"]: r for r in _json("cli_startup_quick")["rows"]}
    assert rows["softxent train iris -q --no-report"]["median_s"] > 0
    assert rows["softxent train iris -q --no-report"]["starting_s"] > 0  # the CLI reports its start-up


def test_linear_ce_tp_quick():
    """The tensor-parallel benchmark: 2 gloo processes on 127.0.0.1, its contenders agreeing."""
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        assert not sys.platform.startswith("linux"), "every Linux build of torch has gloo"
        pytest.skip("torch.distributed with gloo is not available")
    _run("linear_ce_tp.py")
    data = _json("linear_ce_tp_quick")
    assert {r["shard_rows"] for r in data["ranks"]} == {501, 500}

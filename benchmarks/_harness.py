"""Shared benchmark harness: machine description, thread control, A/B/A/B timing, table and JSON output.

Every benchmark script times softxent and the peers a user would pick instead *in the same run*,
alternating them (A B A B ...) and quoting medians, then prints a table and writes JSON to
``benchmarks/out/<name>.json``.  Record the printed table in ``benchmarks/RESULTS.md`` with the machine.

Benchmark on a quiet machine, one benchmark at a time.  OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE slow a
current NumPy where they are set: unset both *in the benchmark's command*, e.g.
``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/loss_cpu.py``; the JSON records which
BLAS kernel ran (threadpoolctl).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "out"


def machine_info() -> dict:
    """CPU, cores, memory, load, thread settings and the BLAS libraries in use."""
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "loadavg_1m": loadavg_1m(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                               "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
    }
    try:
        import numpy
        info["numpy"] = numpy.__version__
        from threadpoolctl import threadpool_info
        info["threadpools"] = [
            {k: p.get(k) for k in ("internal_api", "num_threads", "version", "architecture", "filepath")}
            for p in threadpool_info()
        ]
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    return info


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), which is what ``n_jobs=None`` means."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def loadavg_1m() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def time_call(fn, *, repeat: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``fn()`` over ``repeat`` runs after ``warmup`` untimed runs, with the garbage
    collector run once before and off during them (a collection costs ~0.1 s in a process holding
    scikit-learn and torch: more than the millisecond calls timed here)."""
    for _ in range(warmup):
        fn()
    times = []
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        if was_enabled:
            gc.enable()
    return times


def alternate(contenders: dict, *, rounds: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Time each ``name -> fn`` in turn, round after round (A B A B ...), so drifts hit all alike."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


# A busy neighbour: ``while True: pass`` in another Python process, which also stops by itself once its
# parent is gone (checked every 2**16 turns, a few milliseconds), so no spinner outlives a killed benchmark.
_SPINNER = ("import os, sys\n"
            "parent = os.getppid()\n"
            "sys.stdout.write('spinning\\n'); sys.stdout.flush()\n"
            "while True:\n"
            "    for _ in range(1 << 16):\n"
            "        pass\n"
            "    if os.getppid() != parent:\n"
            "        break\n")


@contextlib.contextmanager
def busy_neighbour(active: bool = True):
    """Keep one core busy with another process (a ``while True`` loop) for the ``with`` block.

    The process is started, and spinning, before the block runs and killed when it ends, however it
    ends: an exception, Ctrl-C, or SIGTERM (turned into ``SystemExit`` for the block's duration, in the
    main thread).  Yields the process (None when ``active`` is false: a quiet group).
    """
    if not active:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", _SPINNER], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        proc.stdout.readline()  # it spins from here on
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def median(xs) -> float:
    return statistics.median(xs)


def time_to_target(trajectory, target: float) -> float:
    """Seconds until the objective first reaches ``target`` (``<=``) along ``trajectory``, a list of
    ``(seconds, objective)``; NaN when it never does."""
    return next((t for t, f in trajectory if f <= target), float("nan"))


def median_time_to_target(trajectories, target: float) -> float:
    """The median over repeats of :func:`time_to_target`; NaN unless every repeat reached ``target``."""
    times = [time_to_target(tr, target) for tr in trajectories]
    return median(times) if all(t == t for t in times) else float("nan")


def print_table(rows: list[dict], columns: list[str], title: str = "") -> str:
    """A GitHub-markdown table of ``rows`` (dicts) restricted to ``columns``; printed and returned."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    text = "\n".join(lines)
    print(text)
    sys.stdout.flush()
    return text


def write_json(name: str, payload: dict) -> Path:
    """Write ``payload`` plus the machine description to ``benchmarks/out/<name>.json`` (atomically)."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2, default=str))
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path

#!/usr/bin/env python3
"""The command line's first visible output and whole run on a small file, against the import a scikit-learn
user pays anyway (``python -c "import sklearn.linear_model"``), alternated, medians.

Contenders, each a fresh process (wall clock, from spawn to exit):

* ``python -c pass``                      -- the interpreter alone;
* ``import sklearn.linear_model``          -- what the peer costs before any work;
* ``import softxent``                      -- the package alone (its names, and NumPy, load on first use);
* ``softxent --help``                      -- typer + rich, no command;
* ``softxent train iris -q --no-report``   -- the whole job on 150 rows, no report;
* ``softxent train iris -q``               -- the same with report.html and the PNGs (matplotlib).

For the train runs the script also records the CLI's own split of the time (``starting`` = Python imports
before the data are read, ``reading data``, ``fitting``) from its summary line, and ``python -X importtime``'s
heaviest top-level imports of one run.

Run on a quiet machine, from the repository root (the command line of the current venv)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/cli_startup.py
    .venv/bin/python benchmarks/cli_startup.py --quick     # 1 round: checks that the script runs

Writes ``benchmarks/out/cli_startup.json`` (``cli_startup_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402


def iris_csv(folder: Path) -> Path:
    from sklearn.datasets import load_iris

    d = load_iris(as_frame=True)
    frame = d.frame.drop(columns="target")
    frame["species"] = [d.target_names[i] for i in d.target]
    path = folder / "iris.csv"
    frame.to_csv(path, index=False)
    return path


def spawn(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return wall, proc.stdout + proc.stderr


def cli_split(output: str) -> dict:
    """'... 0.04 s fitting, 0.01 s reading data, 1.21 s starting' -> the three numbers."""
    found = dict((k, float(v)) for v, k in re.findall(r"([\d.]+) s (fitting|reading data|starting)", output))
    return found


def top_imports(cmd: list[str], cwd: Path, n: int = 8) -> list[tuple[str, float]]:
    proc = subprocess.run([sys.executable, "-X", "importtime", *cmd], cwd=cwd, capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) <= 1:  # top-level imports only
            rows.append((m.group(3), int(m.group(1)) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:n]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one round: a self-check of the script")
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    softxent_bin = str(Path(sys.executable).with_name("softxent"))
    if not Path(softxent_bin).exists():  # e.g. run with PYTHONPATH=src: the module form of the console script
        softxent_cmd = [sys.executable, "-m", "softxent.cli"]
    else:
        softxent_cmd = [softxent_bin]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = iris_csv(tmp)
        counter = iter(range(10**6))
        contenders = {
            "python -c pass": lambda: [sys.executable, "-c", "pass"],
            "import sklearn.linear_model": lambda: [sys.executable, "-c", "import sklearn.linear_model"],
            "import softxent": lambda: [sys.executable, "-c", "import softxent"],
            "softxent --help": lambda: [*softxent_cmd, "--help"],
            "softxent train iris -q --no-report": lambda: [*softxent_cmd, "train", str(data), "-t", "species", "-q",
                                                           "--no-report", "--out", f"r{next(counter)}"],
            "softxent train iris -q": lambda: [*softxent_cmd, "train", str(data), "-t", "species", "-q",
                                               "--out", f"r{next(counter)}"],
        }
        spawn(contenders["import sklearn.linear_model"](), tmp)  # warm the file cache
        times = {name: [] for name in contenders}
        splits = {name: [] for name in contenders if "train" in name}
        for _ in range(rounds):  # alternated: A B C ... A B C ...
            for name, make in contenders.items():
                wall, out = spawn(make(), tmp)
                times[name].append(wall)
                if name in splits:
                    splits[name].append(cli_split(out))
        imports = top_imports(["-m", "softxent.cli", "train", str(data), "-t", "species", "-q", "--no-report",
                               "--out", "imp"], tmp)
    ref = statistics.median(times["import sklearn.linear_model"])
    rows = []
    for name, ts in times.items():
        row = {"command": name, "median_s": statistics.median(ts), "min_s": min(ts),
               "x_sklearn_import": statistics.median(ts) / ref}
        if name in splits and splits[name] and all(splits[name]):
            for k in ("starting", "reading data", "fitting"):
                row[k + "_s"] = statistics.median(s.get(k, float("nan")) for s in splits[name])
        rows.append(row)
    cols = ["command", "median_s", "min_s", "x_sklearn_import", "starting_s", "reading data_s", "fitting_s"]
    _harness.print_table(rows, cols, title=f"CLI start-up ({rounds} alternated rounds, medians)")
    print("heaviest top-level imports of one `softxent train iris -q --no-report`: "
          + ", ".join(f"{m} {s:.3f} s" for m, s in imports))
    _harness.write_json("cli_startup_quick" if args.quick else "cli_startup",
                        {"rounds": rounds, "rows": rows, "times": times, "top_imports": imports,
                         "load_avg": os.getloadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

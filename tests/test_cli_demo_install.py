"""The command line as installed by ``make demo`` alone (the ``cli`` extra, nothing else): its promises hold
with that extra only.  ``make test`` builds that environment beside the full one and names it in
``SOFTXENT_DEMO_VENV``; each case runs its real ``softxent`` executable in a fresh working folder.

Every bad input ends with one line ``softxent: error: ...`` on stderr, exit status 2, no traceback and
nothing written; the main job, predict, evaluate, info and gradcheck work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DEMO_VENV = os.environ.get("SOFTXENT_DEMO_VENV")
pytestmark = pytest.mark.skipif(not DEMO_VENV, reason="needs the cli-only environment that `make test` builds "
                                                      "(SOFTXENT_DEMO_VENV)")


def _bin(name: str) -> str:
    return str(Path(DEMO_VENV).resolve() / "bin" / name)


def softxent(cwd, *args, timeout=180):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SOFTXENT_DEBUG")}
    return subprocess.run([_bin("softxent"), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small CSV (3 classes), the same with one bad cell, in a folder the commands may read."""
    folder = tmp_path_factory.mktemp("demo-data")
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    X = np.round(rng.standard_normal((90, 3)) + 2.0 * np.eye(3)[y], 3)
    lines = ["a,b,c,label"] + [f"{r[0]},{r[1]},{r[2]},{'xyz'[k]}" for r, k in zip(X, y)]
    (folder / "d.csv").write_text("\n".join(lines) + "\n")
    lines[12] = "abc," + lines[12].split(",", 1)[1]
    (folder / "bad.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_the_environment_is_cli_only():
    """The environment really is `make demo`'s: no test runner, no torch or dask (so what passes here
    passes for a user who installed only the cli extra)."""
    probe = subprocess.run([_bin("python"), "-c", "import importlib.util as u; print(*[int(u.find_spec(m) is not None)"
                            " for m in ('typer', 'rich', 'sklearn', 'pytest', 'torch', 'dask')])"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.split() == ["1", "1", "1", "0", "0", "0"], probe


@pytest.mark.parametrize("args, fragment", [
    (["train", "nope.csv", "-t", "y"], "nope.csv"),
    (["train", "{data}/d.csv", "-t", "label", "--alpha", "-1"], "--alpha"),
    (["train", "{data}/d.csv", "-t", "label", "--solver", "lbfsg"], "did you mean 'lbfgs'"),
    (["train", "{data}/d.csv", "-t", "label", "--max-iter", "0"], "--max-iter"),
    (["train", "{data}/bad.csv", "-t", "label"], "row 12 'abc'"),
    (["train", "{data}/d.csv", "-t", "lable"], "'lable'"),
    (["train", "{data}/d.csv", "-t", "label", "--out", "/proc/softxent-x"], "--out '/proc/softxent-x'"),
    (["predict", "no-model", "{data}/d.csv"], "no-model"),
    (["export", "no-model", "--onnx", "m.onnx"], "onnx"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, data, args, fragment):
    res = softxent(tmp_path, *[a.format(data=data) for a in args])
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("softxent: error: "), res.stderr
    assert fragment in lines[0] and "Traceback" not in res.stderr + res.stdout
    assert list(tmp_path.iterdir()) == []


def test_main_job_and_the_other_commands(tmp_path, data):
    res = softxent(tmp_path, "train", data / "d.csv", "-t", "label", "--out", "m")
    assert res.returncode == 0, res.stderr
    assert {"model.safetensors", "model.json", "report.html"} <= {p.name for p in (tmp_path / "m").iterdir()}
    assert "converged:" in res.stderr and "━" not in res.stderr  # not a terminal: plain progress lines
    res = softxent(tmp_path, "predict", "m", data / "d.csv", "-o", "p.csv", "--proba")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == "prediction,proba_x,proba_y,proba_z"
    for args in (["evaluate", "m", data / "d.csv", "--out", "ev"], ["info", "m"], ["gradcheck"]):
        res = softxent(tmp_path, *args)
        assert res.returncode == 0, (args, res.stderr)
    assert (tmp_path / "ev" / "report.html").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX paths")
def test_resume_without_data_in_the_cli_only_install(tmp_path, data):
    assert softxent(tmp_path, "train", data / "d.csv", "-t", "label", "--out", "m", "--max-iter", "2", "-q",
                    "--no-report").returncode == 0
    res = softxent(tmp_path, "train", "--out", "m", "--resume", "-q", "--no-report")
    assert res.returncode == 0 and "data recorded in the model" in res.stderr, res.stderr

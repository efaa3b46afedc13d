"""The real ``softxent`` process: a SIGINT (Ctrl-C) during training, then ``--resume``; and a one-line error.

Runs ``python -m softxent.cli`` (the console script's ``main``) in a subprocess, so signal handling, exit
statuses and stderr are exactly what a user sees.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("typer")
pytest.importorskip("safetensors")
pytest.importorskip("sklearn")
from softxent.cli.model_io import load_model  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def softxent(*args, **kw):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "softxent.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_sigint_saves_the_last_iterate_and_resume_finishes(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 6)) * [1, 2, 3, 4, 5, 6]
    y = np.argmax(X[:, :3] / [1, 2, 3] + 0.5 * rng.standard_normal((400, 3)), axis=1)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    out = tmp_path / "run"
    # plain gradient descent with a small fixed step and no stopping rule: runs until interrupted
    proc = softxent("train", tmp_path / "d.npz", "--out", out, "--solver", "gd", "--learning-rate", "0.01",
                    "--max-iter", "100000000", "--tol", "0", "--checkpoint-every", "0.3", "-q", "--no-report")
    try:
        deadline = time.monotonic() + 120
        while not (out / "model.json").exists():  # the first checkpoint: training is under way
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        checkpoint = load_model(out)
        assert checkpoint.status == "checkpoint" and len(checkpoint.loss_curve) >= 1
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr and "Interrupted after" in stderr and "--resume" in stderr
    model = load_model(out)
    assert model.status == "interrupted"
    n = model.meta["estimator"]["n_iter"]
    assert n == len(model.loss_curve) >= len(checkpoint.loss_curve)
    assert np.all(np.diff(model.loss_curve) <= 1e-12)  # gd with a small step: the objective never rises
    assert model.meta["estimator"]["objective"] == model.loss_curve[-1]

    proc = softxent("train", tmp_path / "d.npz", "--out", out, "--resume", "--solver", "lbfgs", "--max-iter", "500",
                    "-q", "--no-report")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, (stdout, stderr)
    assert f"+{n} before --resume" in stdout
    done = load_model(out)
    assert done.status == "complete" and done.meta["estimator"]["n_iter"] == len(done.loss_curve) > n
    assert done.loss_curve[n - 1] == model.loss_curve[-1]
    assert done.meta["estimator"]["objective"] < model.loss_curve[-1]


def test_process_error_is_one_line_with_status_2(tmp_path):
    proc = softxent("predict", tmp_path / "no-model", tmp_path / "x.csv")
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert stderr.strip().splitlines() == [f"softxent: error: no such model folder: '{tmp_path / 'no-model'}'"]
    assert stdout == ""


def _console_script(tmp_path):
    """The installed ``softxent`` script beside this Python, or the same three lines pip writes for it."""
    script = Path(sys.executable).with_name("softxent")
    if not script.exists():
        script = tmp_path / "softxent"
        script.write_text(f"#!{sys.executable}\nimport sys\nfrom softxent.cli import main\n"
                          "if __name__ == '__main__':\n    sys.exit(main())\n")
        script.chmod(0o755)
    return script


# frames a traceback may show when SIGINT lands in Python's own start-up, before any softxent code can
# handle it: the interpreter's initialisation, the console script's first lines, importlib, and the two
# light __init__ files the script imports (docs/cli.md, "Ctrl-C")
_STARTUP_FRAMES = ("<frozen ", "softxent/__init__.py", "softxent/cli/__init__.py")


def test_sigint_at_any_moment_of_start_up_is_one_line_and_130(tmp_path):
    """Issue 18: Ctrl-C while the imports ran printed a KeyboardInterrupt traceback (``import softxent``
    imported NumPy before ``main`` could catch it)."""
    script = _console_script(tmp_path)
    np.savez(tmp_path / "d.npz", X=np.eye(4), y=np.arange(4) % 2)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    reported = 0
    for delay in (0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3):
        proc = subprocess.Popen([str(script), "train", tmp_path / "d.npz", "--out", tmp_path / "m", "-q",
                                 "--no-report"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        if "Traceback" in stderr or "Fatal Python error" in stderr:
            frames = [ln.strip() for ln in stderr.splitlines() if ln.strip().startswith("File ")]
            outside = [f for f in frames if str(script) not in f and not any(s in f for s in _STARTUP_FRAMES)]
            assert not outside, f"SIGINT at {delay} s: a traceback through {outside[0]}\n{stderr}"
            continue  # the interpreter was still starting (a loaded machine): nothing of softxent ran yet
        if proc.returncode == -signal.SIGINT:  # before Python installed its handler: killed, nothing printed
            assert stderr == "", stderr
            continue
        assert proc.returncode == 130, (delay, proc.returncode, stderr)
        assert stderr.strip().splitlines()[-1:] == ["softxent: error: interrupted"] or "Interrupted" in stderr, stderr
        reported += 1
    assert reported, "no SIGINT reached softxent's code: the moments are too early for this machine"

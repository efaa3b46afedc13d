"""Saving a model folder is one step: killed at any moment, the folder loads as exactly the old model or exactly
the new one, and what a killed save leaves behind never breaks the next save.

Three ways of dying: a fault injected at every file-system call of the save (everything after it fails too, as
if the process had died there: no cleanup runs); SIGKILL of a forked process saving in a loop at random
moments; SIGKILL of a real ``softxent train --force`` that checkpoints every iteration over an existing model.
Also: a reader loading while another process saves, format version 1 folders, leftovers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("sklearn")
from softxent.cli.data import Preprocessing  # noqa: E402
from softxent.cli.model_io import MODEL_JSON, MODEL_TENSORS, SavedModel, load_model, save_model  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX fork and signals")


def model(seed: int, iterations: int, status: str = "complete") -> SavedModel:
    rng = np.random.default_rng(seed)
    names = ["a", "b", "c", "d"]
    pre = Preprocessing(input_columns=names, feature_names=names, mean=rng.standard_normal(4),
                        scale=rng.uniform(0.5, 2, 4))
    return SavedModel(classes=np.array(["x", "y", "z"]), coef=rng.standard_normal((3, 4)),
                      intercept=rng.standard_normal(3), preprocessing=pre, loss_curve=np.linspace(2, 1, iterations),
                      target="t", status=status, meta={"estimator": {"n_iter": iterations}})


OLD, NEW, LATER = model(0, 5), model(1, 40, "checkpoint"), model(2, 7)


def same(a: SavedModel, b: SavedModel) -> bool:
    return (a.status == b.status and a.classes.tolist() == b.classes.tolist()
            and all(np.array_equal(getattr(a, n), getattr(b, n)) for n in ("coef", "intercept", "loss_curve"))
            and np.array_equal(a.preprocessing.mean, b.preprocessing.mean)
            and np.array_equal(a.preprocessing.scale, b.preprocessing.scale))


def which(d) -> str:
    m = load_model(d)
    for name, ref in (("old", OLD), ("new", NEW), ("later", LATER)):
        if same(m, ref):
            return name
    raise AssertionError("the folder loads as a model that was never saved")


def model_files(d) -> list[str]:
    return sorted(os.listdir(d))


class Died(BaseException):
    """The injected death: a BaseException, so that no `except Exception` cleanup can run past it."""


def dying_at(mp, step: int) -> list[int]:
    """From file-system call number ``step`` of the save on, every call dies (as the process would have)."""
    calls = [0]

    def wrap(fn):
        def call(*args, **kw):
            if calls[0] >= step:
                raise Died
            calls[0] += 1
            return fn(*args, **kw)
        return call

    for name in ("open", "fsync", "replace", "rename", "unlink", "chmod", "fdopen"):
        mp.setattr(os, name, wrap(getattr(os, name)))
    mp.setattr(tempfile, "mkstemp", wrap(tempfile.mkstemp))
    return calls


def test_death_at_every_step_of_the_save_leaves_the_old_or_the_new_model(tmp_path, monkeypatch):
    probe = tmp_path / "probe"
    save_model(probe, OLD)
    with monkeypatch.context() as mp:
        calls = dying_at(mp, 10**9)
        save_model(probe, NEW)
    n_steps = calls[0]
    assert n_steps >= 12  # staged write (mkstemp, chmod, fdopen, fsync, replace, dir fsync), model.json, rename, ...

    seen = []
    for step in range(n_steps + 1):
        d = tmp_path / f"m{step}"
        save_model(d, OLD)
        (d / "report.html").write_text("not ours")
        with monkeypatch.context() as mp:
            dying_at(mp, step)
            if step < n_steps:
                with pytest.raises(Died):
                    save_model(d, NEW)
            else:
                save_model(d, NEW)
        seen.append(which(d))
        save_model(d, LATER)  # what the dead save left does not get in the way
        assert which(d) == "later"
        assert model_files(d) == [MODEL_JSON, MODEL_TENSORS, "report.html"]
    # the old model until the commit (model.json's rename), the new one from then on; both occur
    commit = seen.index("new")
    assert seen == ["old"] * commit + ["new"] * (n_steps + 1 - commit), seen
    assert 0 < commit < n_steps


def test_sigkill_at_random_moments_of_saving_in_a_loop(tmp_path):
    d = tmp_path / "m"
    save_model(d, OLD)
    rng = np.random.default_rng(0)
    found, debris = set(), 0
    for _ in range(40):
        pid = os.fork()
        if pid == 0:  # the child saves NEW and OLD in turn until it is killed
            try:
                while True:
                    save_model(d, NEW)
                    save_model(d, OLD)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.02))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        found.add(which(d))
        debris += len(model_files(d)) > 2
    assert found == {"old", "new"}
    assert debris > 0  # some kills landed inside a save (otherwise this test would prove nothing)
    save_model(d, LATER)
    assert which(d) == "later" and model_files(d) == [MODEL_JSON, MODEL_TENSORS]


def test_a_reader_sees_the_old_or_the_new_model_while_another_process_saves(tmp_path):
    d = tmp_path / "m"
    save_model(d, OLD)
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(2000):
                save_model(d, NEW)
                time.sleep(0.001)
                save_model(d, OLD)
                time.sleep(0.001)
        finally:
            os._exit(0)
    try:
        found = {which(d) for _ in range(300)}
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert found <= {"old", "new"} and found


def test_format_version_1_loads_with_a_note(tmp_path):
    from typer.testing import CliRunner

    from softxent.cli.app import app

    save_model(tmp_path, OLD)
    meta = json.loads((tmp_path / MODEL_JSON).read_text())
    del meta["checksum"]  # format 1 is format 2 without the metadata's checksum
    meta["format_version"] = 1
    (tmp_path / MODEL_JSON).write_text(json.dumps(meta, indent=2))
    m = load_model(tmp_path)
    assert same(m, OLD) and len(m.notes) == 1 and "format version 1" in m.notes[0]
    result = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 0 and "format version 1" in result.stderr and "no checksum" in result.stderr
    meta["classes"]["values"] = ["x", "x", "z"]  # version 1 is still validated
    (tmp_path / MODEL_JSON).write_text(json.dumps(meta))
    with pytest.raises(Exception, match="sorted and distinct"):
        load_model(tmp_path)
    save_model(tmp_path, OLD)  # saving again upgrades it
    assert json.loads((tmp_path / MODEL_JSON).read_text())["format_version"] == 2 and not load_model(tmp_path).notes


def test_info_json_prints_exactly_the_validated_model_json(tmp_path):
    from typer.testing import CliRunner

    from softxent.cli.app import app

    save_model(tmp_path, OLD)
    result = CliRunner().invoke(app, ["info", str(tmp_path), "--json"])
    assert result.exit_code == 0 and result.stdout == (tmp_path / MODEL_JSON).read_text()
    assert load_model(tmp_path).json_text == result.stdout


def softxent(*args):
    return subprocess.Popen([sys.executable, "-m", "softxent.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})


def test_sigkill_of_train_force_checkpointing_over_a_model_keeps_a_loadable_model(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 5))
    y = np.argmax(X[:, :3] + 0.5 * rng.standard_normal((300, 3)), axis=1)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    out = tmp_path / "m"
    first = softxent("train", tmp_path / "d.npz", "--out", out, "--alpha", "1e-2", "-q", "--no-report")
    assert first.wait(timeout=120) == 0, first.communicate()
    for delay in (0.3, 0.9):
        # gd with no stopping rule, a checkpoint after (almost) every iteration: saves back to back
        proc = softxent("train", tmp_path / "d.npz", "--out", out, "--force", "--solver", "gd", "--learning-rate",
                        "0.01", "--max-iter", "100000000", "--tol", "0", "--checkpoint-every", "0.0001", "-q",
                        "--no-report")
        deadline = time.monotonic() + 60
        while load_model(out).status == "complete" and time.monotonic() < deadline:
            time.sleep(0.02)  # loads while it saves: never an error
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=60)
        now = load_model(out)
        assert now.status == "checkpoint" and now.meta["estimator"]["n_iter"] == len(now.loss_curve) > 0
    last = softxent("train", tmp_path / "d.npz", "--out", out, "--force", "--alpha", "1e-2", "-q", "--no-report")
    assert last.wait(timeout=120) == 0, last.communicate()
    assert load_model(out).status == "complete" and model_files(out) == [MODEL_JSON, MODEL_TENSORS]

"""A new user's first mistakes on the command line (issue 16): each gives one honest line and exit status 2,
before any data is read or any folder made; and what a run prints and writes when nothing is wrong.

In-process through typer's CliRunner (not a terminal: the plain progress lines), on small generated files.
"""

from __future__ import annotations

import builtins
import csv
import sys

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("typer")
pytest.importorskip("safetensors")
pytest.importorskip("sklearn")
from typer.testing import CliRunner  # noqa: E402

from softxent.cli.app import CONSTANT_MODEL_SPREAD, app  # noqa: E402
from softxent.cli.model_io import load_model  # noqa: E402
from softxent.cli.report import plot_reliability, reliability_bins, wilson_interval  # noqa: E402

SPECIES = np.array(["setosa", "versicolor", "virginica"])


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, *fragments) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("softxent: error: "), result.stderr
    assert "Traceback" not in result.output
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


@pytest.fixture()
def iris_csv(tmp_path):
    """Iris-like data: 4 numeric columns, 3 string classes, rows shuffled."""
    rng = np.random.default_rng(1)
    y = rng.permutation(np.arange(150) % 3)
    centres = np.array([[5.0, 3.4, 1.5, 0.2], [5.9, 2.8, 4.3, 1.3], [6.6, 3.0, 5.6, 2.0]])
    X = np.round(centres[y] + 0.35 * rng.standard_normal((150, 4)), 1)
    frame = pd.DataFrame(X, columns=["sepal length", "sepal width", "petal length", "petal width"])
    frame["species"] = SPECIES[y]
    path = tmp_path / "iris.csv"
    frame.to_csv(path, index=False)
    return path


# ---- 3 / 5 / 10: options checked first; nothing written ----------------------------------------------
@pytest.mark.parametrize("args, flag", [
    (["--alpha", "-1"], "--alpha"), (["--alpha", "nan"], "--alpha"), (["--alpha", "inf"], "--alpha"),
    (["--max-iter", "0"], "--max-iter"), (["--solver", "lbfsg"], "'lbfgs'"), (["--tol", "-1"], "--tol"),
    (["--l1-ratio", "2"], "--l1-ratio"), (["--batch-size", "0"], "--batch-size"),
    (["--learning-rate", "-0.1"], "--learning-rate"), (["--learning-rate", "fast"], "--learning-rate"),
    (["--test-size", "1"], "--test-size"), (["--test-size", "nan"], "--test-size"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"), (["--format", "xls"], "--format"),
    (["--impute", "median"], "--impute"), (["--class-weight", "heavy"], "--class-weight"),
    (["--solver", "lbfgs", "--l1-ratio", "0.5"], "--solver proximal"),
])
def test_bad_option_is_refused_before_data_or_folders(tmp_path, monkeypatch, args, flag):
    """The data path does not exist: an error about the option proves it was checked first; the working
    folder stays empty (no runs/<timestamp>/), and no progress line is printed."""
    monkeypatch.chdir(tmp_path)
    res = run("train", tmp_path / "not-read-yet.csv", "-t", "y", *args)
    line = one_error_line(res, flag)
    assert "not-read-yet" not in line and "parameter of SoftmaxRegression" not in line
    assert res.stdout == "" and list(tmp_path.iterdir()) == []


def test_estimator_constraint_words_name_the_flag(tmp_path):
    line = one_error_line(run("train", tmp_path / "x.csv", "--alpha", "-1"))
    assert line == "softxent: error: --alpha must be a float in the range [0.0, inf); got -1.0"


def test_unwritable_out_is_refused_before_loading(tmp_path, iris_csv):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_error_line(run("train", tmp_path / "missing.csv", "--out", blocker / "run"), "--out",
                   str(blocker / "run"), "not a folder")
    one_error_line(run("train", iris_csv, "-t", "species", "--out", blocker), "--out", "not a folder")
    if sys.platform.startswith("linux"):  # /proc takes no new folders, even for root
        one_error_line(run("train", tmp_path / "missing.csv", "--out", "/proc/softxent-run"), "--out",
                       "/proc/softxent-run", "not writable")
    one_error_line(run("evaluate", tmp_path / "no-model", iris_csv, "--out", blocker / "r"), "--out")


def test_predict_output_errors_name_the_users_path(tmp_path, iris_csv):
    assert run("train", iris_csv, "-t", "species", "--out", tmp_path / "m", "-q", "--no-report").exit_code == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = one_error_line(run("predict", tmp_path / "m", iris_csv, "-o", blocker / "p.csv"), str(blocker / "p.csv"))
    assert ".tmp" not in line
    if sys.platform.startswith("linux"):
        line = one_error_line(run("predict", tmp_path / "m", iris_csv, "-o", "/proc/x.csv"), "/proc/x.csv")
        assert ".tmp" not in line
    (tmp_path / "dir.csv").mkdir()
    one_error_line(run("predict", tmp_path / "m", iris_csv, "-o", tmp_path / "dir.csv"), "is a folder")


def test_failed_run_leaves_no_folder(tmp_path, monkeypatch, iris_csv):
    """A run that fails after loading (here: one class in the training data) makes no output folder."""
    monkeypatch.chdir(tmp_path)
    frame = pd.read_csv(iris_csv)
    frame["species"] = "setosa"
    frame.to_csv(tmp_path / "one.csv", index=False)
    one_error_line(run("train", tmp_path / "one.csv", "-t", "species"), "only one class")
    assert not (tmp_path / "runs").exists()


# ---- 1: errors without click (the cli extra does not install it) ------------------------------------
def test_errors_are_one_line_without_click(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_click(name, *args, **kw):
        if name == "click" or name.startswith("click."):
            raise ModuleNotFoundError("No module named 'click'", name="click")
        return real_import(name, *args, **kw)

    monkeypatch.delitem(sys.modules, "click", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_click)
    one_error_line(run("train", tmp_path / "nope.csv", "-t", "y"), "nope.csv")


# ---- 2: garbage in a numeric column ---------------------------------------------------------------
def test_a_non_number_in_a_numeric_column_is_named(tmp_path, iris_csv):
    rows = list(csv.reader(open(iris_csv)))
    rows[18][0] = "abc"  # data row 18 (line 19 of the file)
    rows[40][0] = "5,1"
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    line = one_error_line(run("train", bad, "-t", "species", "--test-size", "0", "--out", tmp_path / "m"),
                          "'sepal length'", "row 18 'abc'", "row 40 '5,1'", "2 cell(s)", "--impute")
    assert "--categorical" not in line
    assert not (tmp_path / "m").exists()
    # held out or not, the bad cell is named (with one bad cell, in whichever split the seed puts it)
    rows[40][0] = "5.1"
    with open(bad, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    for seed in range(4):
        one_error_line(run("train", bad, "-t", "species", "--seed", seed, "--out", tmp_path / "m"),
                       "'sepal length'", "row 18 'abc'")
    # --categorical on a mostly numeric column: done as asked, with a warning
    res = run("train", bad, "-t", "species", "--categorical", "--test-size", "0", "--out", tmp_path / "m", "-q",
              "--no-report")
    assert res.exit_code == 0, res.output
    assert "warning: --categorical one-hot encodes column 'sepal length'" in res.stderr
    assert "99% of its cells are numbers" in res.stderr


def test_a_text_column_still_asks_for_categorical(tmp_path, iris_csv):
    frame = pd.read_csv(iris_csv)
    frame["colour"] = np.where(np.arange(len(frame)) % 2, "red", "blue")
    frame.to_csv(tmp_path / "c.csv", index=False)
    one_error_line(run("train", tmp_path / "c.csv", "-t", "species"), "non-numeric", "'colour'", "--categorical")
    res = run("train", tmp_path / "c.csv", "-t", "species", "--categorical", "-q", "--no-report",
              "--out", tmp_path / "m")
    assert res.exit_code == 0 and "warning" not in res.stderr, res.output


# ---- 6: --resume without DATA -------------------------------------------------------------------
def test_resume_without_data_uses_the_recorded_files(tmp_path, iris_csv):
    out = tmp_path / "m"
    assert run("train", iris_csv, "-t", "species", "--out", out, "--max-iter", "3", "-q",
               "--no-report").exit_code == 0
    first = load_model(out)
    res = run("train", "--out", out, "--resume", "-q", "--no-report")
    assert res.exit_code == 0, res.output
    assert "training on the data recorded in the model" in res.stderr
    resumed = load_model(out)
    assert resumed.meta["estimator"]["n_iter"] > first.meta["estimator"]["n_iter"]
    assert resumed.meta["estimator"]["objective"] < first.meta["estimator"]["objective"]
    iris_csv.rename(tmp_path / "moved.csv")
    one_error_line(run("train", "--out", out, "--resume"), "give the data path", str(iris_csv))


# ---- 7: a constant model warns ---------------------------------------------------------------------
def test_a_constant_model_warns(tmp_path, iris_csv):
    res = run("train", iris_csv, "-t", "species", "--alpha", "1e12", "--out", tmp_path / "m", "--no-report")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "the fitted model is (numerically) constant" in text and "--alpha 1e+12" in text
    m = load_model(tmp_path / "m")
    assert m.meta["metrics"]["train"]["log_loss"] == pytest.approx(np.log(3), rel=1e-3)
    res = run("train", iris_csv, "-t", "species", "--out", tmp_path / "m2", "-q", "--no-report")
    assert "numerically" not in res.output
    assert CONSTANT_MODEL_SPREAD == 1e-6  # the threshold docs/cli.md states


# ---- 8: convergence, in the command line's words ---------------------------------------------------
@pytest.mark.parametrize("solver", ["gd", "adam"])
def test_not_converged_advice_fits_the_command_line(tmp_path, iris_csv, solver):
    res = run("train", iris_csv, "-t", "species", "--solver", solver, "--max-iter", "5", "--out", tmp_path / "m",
              "--no-report")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert f"{solver} stopped at --max-iter 5" in text and "--tol 1e-06" in text
    assert "StandardScaler" not in text and "standardised already" in text and "--resume" in text
    assert f"{solver} did not converge: 5/5" in res.stderr  # the progress ends in a finished state
    res = run("train", iris_csv, "-t", "species", "--solver", solver, "--max-iter", "5", "--no-standardize",
              "--out", tmp_path / "m2", "--no-report")
    assert "drop --no-standardize" in " ".join(res.output.split())
    assert not load_model(tmp_path / "m2").meta["estimator"]["converged"]


def test_converged_fit_prints_phase_lines_without_a_terminal(tmp_path, iris_csv):
    res = run("train", iris_csv, "-t", "species", "--out", tmp_path / "m", "--no-report")
    assert res.exit_code == 0, res.output
    n_iter = load_model(tmp_path / "m").meta["estimator"]["n_iter"]
    assert "lbfgs: fitting (at most 1000 iterations)" in res.stderr
    assert f"lbfgs converged: {n_iter}/{n_iter}, objective" in res.stderr
    assert "━" not in res.stderr and "…" not in res.output  # no bar redrawn, nothing cut at a width
    assert "warning" not in res.output


# ---- 9: the reliability diagram's sparse bins ------------------------------------------------------
def test_wilson_interval_is_wide_for_few_rows():
    lo, hi = wilson_interval(np.array([1.0, 0.5, 0.0, np.nan]), np.array([1, 100, 3, 0]))
    # one correct row out of one: 95 % interval [0.207, 1]; 50 of 100: about ±0.097; none: [0, 1]
    np.testing.assert_allclose([lo[0], hi[0]], [0.2065, 1.0], atol=1e-4)
    np.testing.assert_allclose([lo[1], hi[1]], [0.4038, 0.5962], atol=1e-4)
    assert lo[2] == 0.0 and 0.5 < hi[2] < 0.6
    assert (lo[3], hi[3]) == (0.0, 1.0)


def test_reliability_diagram_with_a_bin_of_one_row():
    rng = np.random.default_rng(0)
    P = np.full((51, 3), 1 / 3)
    P[0] = [0.97, 0.02, 0.01]  # alone in the top bin
    y = rng.integers(0, 3, 51)
    _, _, _, counts = reliability_bins(P.max(axis=1), P.argmax(axis=1) == y)
    assert counts[-1] == 1 and counts.sum() == 51
    png = plot_reliability(np.log(P), y, title="t")
    assert png.startswith(b"\x89PNG")

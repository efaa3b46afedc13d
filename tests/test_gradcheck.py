"""softxent.gradcheck (finite differences), check_seed_derivation, and the `softxent gradcheck` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import softxent
from softxent import check_seed_derivation, cross_entropy, cross_entropy_with_grad, gradcheck, softmax


def cubic(x):
    return float(np.sum(x**3) + np.prod(x[:2]))


def cubic_grad(x):
    g = 3 * x**2
    g[0] += x[1]
    g[1] += x[0]
    return g


def test_accepts_a_right_gradient_and_detects_a_wrong_one():
    x = np.random.default_rng(0).standard_normal(6)
    assert gradcheck(cubic, x, cubic_grad) < 1e-10
    # a gradient that is wrong in one coordinate only, and one that is wrong by a factor
    def off_by_one_coordinate(v):
        g = cubic_grad(v)
        g[3] += 0.05 * np.max(np.abs(g))
        return g
    assert gradcheck(cubic, x, off_by_one_coordinate) > 1e-2
    assert gradcheck(cubic, x, lambda v: 3 * v) > 0.1
    assert gradcheck(cubic, x, lambda v: 1.01 * cubic_grad(v)) > 5e-3


def test_value_and_gradient_from_one_callable():
    x = np.random.default_rng(1).standard_normal((3, 2))
    assert gradcheck(lambda v: (float(np.sum(np.sin(v))), np.cos(v)), x) < 1e-10
    assert gradcheck(lambda v: (float(np.sum(np.sin(v))), -np.cos(v)), x) > 1.0


def test_cross_entropy_gradient_and_a_wrong_one():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((5, 4))
    y = rng.integers(0, 4, 5)
    good = gradcheck(lambda v: cross_entropy_with_grad(v, y), z)
    assert good < 1e-9
    # the seed's delta without the 1/N of the mean is off by a factor N = 5
    bad = gradcheck(lambda v: cross_entropy(v, y), z, lambda v: softmax(v) - np.eye(4)[y])
    assert bad > 0.5
    # sign error on the one-hot part
    bad = gradcheck(lambda v: cross_entropy(v, y), z, lambda v: (softmax(v) + np.eye(4)[y]) / 5)
    assert bad > 0.5


def test_n_checks_samples_coordinates_and_x_is_left_alone():
    x = np.random.default_rng(3).standard_normal(50)
    x0 = x.copy()
    calls = []

    def f(v):
        calls.append(1)
        return cubic(v)

    assert gradcheck(f, x, cubic_grad, n_checks=7, random_state=0) < 1e-10
    assert len(calls) == 4 * 7               # four evaluations per checked coordinate
    np.testing.assert_array_equal(x, x0)
    # the wrong coordinate is found when it is among the sampled ones
    def wrong_everywhere(v):
        return cubic_grad(v) + 1.0
    assert gradcheck(cubic, x, wrong_everywhere, n_checks=3, random_state=1) > 1e-2


def test_integer_point_and_step():
    assert gradcheck(lambda v: float(np.sum(v**2)), np.array([1, 2, 3]), lambda v: 2 * v) < 1e-12
    assert gradcheck(lambda v: float(np.sum(np.exp(v))), np.zeros(3), np.exp, h=1e-2) < 1e-8


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"h must be > 0; got 0"):
        gradcheck(cubic, np.ones(3), cubic_grad, h=0)
    with pytest.raises(ValueError, match=r"the analytic gradient must have the shape of x \(3,\); got \(2,\)"):
        gradcheck(cubic, np.ones(3), lambda v: np.ones(2))


@pytest.mark.parametrize("n,d,k,seed", [(8, 5, 4, 0), (1, 1, 2, 3), (20, 3, 7, 11), (4, 2, 1, 5)])
def test_check_seed_derivation(n, d, k, seed):
    rows = check_seed_derivation(n=n, d=d, k=k, seed=seed)
    assert [r.name for r in rows] == ["dE/dz", "dE/dTheta", "dE/db", "dE/dX"]
    for r in rows:
        assert r.fd_error < 1e-8, r
        assert r.closed_form_error < 1e-13, r
        assert r.formula


# --------------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------------
def test_cli_gradcheck_prints_the_table():
    pytest.importorskip("typer")
    from typer.testing import CliRunner

    from softxent.cli.app import app

    runner = CliRunner()
    result = runner.invoke(app, ["gradcheck", "--n", "6", "--k", "3", "--seed", "2"])
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("dE/dz", "dE/dTheta", "dE/db", "dE/dX", "delta Theta", "N=6", "K=3", "seed=2",
                 "The seed's derivation holds."):
        assert text in out, (text, out)
    assert "NO" not in out
    # an impossible tolerance fails, with exit code 1
    result = runner.invoke(app, ["gradcheck", "--tol", "1e-300"])
    assert result.exit_code == 1 and "FAILED" in result.output
    # bad sizes are refused with a usage error naming them
    result = runner.invoke(app, ["gradcheck", "--k", "0"])
    assert result.exit_code == 2 and "k=0" in result.output


def test_softxent_script_gradcheck_subprocess():
    script = Path(sys.executable).with_name("softxent")
    if not script.exists():
        pytest.skip(f"no softxent console script next to {sys.executable}")
    proc = subprocess.run([str(script), "gradcheck"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "dE/dTheta" in proc.stdout and "The seed's derivation holds." in proc.stdout


def test_gradcheck_is_exported():
    assert softxent.gradcheck is gradcheck and "gradcheck" in softxent.__all__

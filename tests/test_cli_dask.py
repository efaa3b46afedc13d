"""`softxent train --dask`: partitioned Parquet read lazily, fitted on a LocalCluster, same model as in memory."""

import json

import numpy as np
import pytest

pytest.importorskip("dask")
pytest.importorskip("distributed")
pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")
from typer.testing import CliRunner  # noqa: E402

from softxent.cli.app import app  # noqa: E402
from softxent.cli.model_io import load_model  # noqa: E402


@pytest.fixture()
def parquet_parts(tmp_path):
    rng = np.random.default_rng(0)
    n, d, k = 900, 6, 3
    X = rng.standard_normal((n, d)) * rng.uniform(0.5, 5, d) + rng.uniform(-3, 3, d)
    theta = rng.standard_normal((k, d))
    z = (X - X.mean(0)) / X.std(0) @ theta.T
    y = np.array(["ant", "bee", "cat"])[np.argmax(z + rng.gumbel(size=z.shape), axis=1)]
    frame = pd.DataFrame(X, columns=[f"f{j}" for j in range(d)]).assign(label=y)
    folder = tmp_path / "parts"
    folder.mkdir()
    for i, part in enumerate(np.array_split(np.arange(n), 3)):
        frame.iloc[part].to_parquet(folder / f"part-{i}.parquet", index=False)
    frame.to_parquet(tmp_path / "all.parquet", index=False)
    return tmp_path


def test_train_dask_equals_in_memory(parquet_parts):
    runner = CliRunner()
    opts = ["--target", "label", "--solver", "newton-cg", "--tol", "1e-10", "--alpha", "1e-3"]
    res = runner.invoke(app, ["train", str(parquet_parts / "parts" / "*.parquet"), "--dask",
                              "--out", str(parquet_parts / "m_dask"), *opts])
    assert res.exit_code == 0, res.output
    # the same report and plots as in memory (scored on the training rows), and a progress display that ends
    # in a finished state (without a terminal: a line when the fit starts, one when it ends)
    assert (parquet_parts / "m_dask" / "report.html").stat().st_size > 10_000
    assert {p.name for p in (parquet_parts / "m_dask").glob("*.png")} >= {"objective_curve.png",
                                                                          "confusion_matrix.png"}
    n_iter = load_model(parquet_parts / "m_dask").meta["estimator"]["n_iter"]
    assert f"newton-cg converged: {n_iter}/{n_iter}" in res.stderr, res.stderr
    res2 = runner.invoke(app, ["train", str(parquet_parts / "all.parquet"), "--test-size", "0",
                               "--out", str(parquet_parts / "m_mem"), *opts, "-q", "--no-report"])
    assert res2.exit_code == 0, res2.output
    a, b = load_model(parquet_parts / "m_dask"), load_model(parquet_parts / "m_mem")
    assert list(a.classes) == ["ant", "bee", "cat"]
    np.testing.assert_allclose(a.preprocessing.mean, b.preprocessing.mean, rtol=1e-10)
    np.testing.assert_allclose(a.preprocessing.scale, b.preprocessing.scale, rtol=1e-10)
    np.testing.assert_allclose(a.coef, b.coef, rtol=1e-6, atol=1e-8)
    meta = json.loads((parquet_parts / "m_dask" / "model.json").read_text())
    assert meta["training"]["dask"] is True and meta["training"]["n_rows"] == 900
    # the model predicts like any other
    out = parquet_parts / "pred.csv"
    res3 = runner.invoke(app, ["predict", str(parquet_parts / "m_dask"), str(parquet_parts / "all.parquet"),
                               "-o", str(out)])
    assert res3.exit_code == 0, res3.output
    assert set(pd.read_csv(out).iloc[:, 0]) <= {"ant", "bee", "cat"}


def test_train_dask_bad_input(parquet_parts):
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(parquet_parts / "parts" / "*.parquet"), "--dask"])
    assert res.exit_code == 2 and "--target" in res.output
    res = runner.invoke(app, ["train", str(parquet_parts / "parts" / "*.parquet"), "--dask", "--target", "label",
                              "--impute", "mean"])
    assert res.exit_code == 2 and "--impute is not supported with --dask" in res.output
    res = runner.invoke(app, ["train", str(parquet_parts / "nothing-*.parquet"), "--dask", "--target", "label"])
    assert res.exit_code == 2 and "no file matches the pattern" in res.output

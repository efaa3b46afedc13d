"""The ``softxent`` command line, driven in-process through typer's CliRunner on small generated files.

Each test writes its data into ``tmp_path``, runs the real commands and checks the files they write and what
they print: train -> predict round trips for CSV, Parquet, npz and svmlight (several files and globs too), the
default data set, evaluate / info / export, every one-line error of issue 4 (exit status 2, no traceback
unless --debug), the corrupted-model cases, and Ctrl-C + --resume.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("typer")
pytest.importorskip("safetensors")
pytest.importorskip("sklearn")
from typer.testing import CliRunner  # noqa: E402

from softxent.cli import app as app_module  # noqa: E402
from softxent.cli.app import app  # noqa: E402
from softxent.cli.data import train_test_indices  # noqa: E402
from softxent.cli.model_io import load_model  # noqa: E402
from softxent.loss import cross_entropy, softmax  # noqa: E402

FAST = ["--alpha", "1e-2", "-q", "--no-report"]  # strong penalty: lbfgs converges in a few dozen iterations
SCALES = np.array([1.0, 10.0, 100.0, 0.1])
SHIFTS = np.array([0.0, 5.0, -50.0, 1.0])
LABELS = np.array(["cat", "dog", "eel"])


def make_problem(n=240, d=4, k=3, seed=0):
    """Gaussian blobs with unscaled columns (standardisation matters); labels 0..k-1."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 2.0
    y = np.arange(n) % k
    X = (centres[y] + rng.standard_normal((n, d))) * SCALES[:d] + SHIFTS[:d]
    return X, y


def frame_of(X, y, labels=None):
    df = pd.DataFrame(X, columns=[f"f{j}" for j in range(X.shape[1])])
    df["label"] = labels[y] if labels is not None else y
    return df


def write_svmlight(path, X, y):
    with open(path, "w") as f:
        for row, label in zip(X, y):
            f.write(f"{label} " + " ".join(f"{j + 1}:{v:.17g}" for j, v in enumerate(row) if v != 0) + "\n")


def run(*args, ok=True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok and result.exit_code != 0:
        raise AssertionError(f"softxent {' '.join(map(str, args))} exited {result.exit_code}:\n"
                             f"{result.output}\n{result.exception!r}")
    return result


def flat(text: str) -> str:
    """Rich wraps lines at the terminal width; compare text with whitespace runs collapsed."""
    return " ".join(text.split())


def assert_user_error(result, *fragments):
    """Exit status 2, exactly one line on stderr starting with 'softxent: error:', no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("softxent: error: "), lines[0]
    assert "Traceback" not in result.output
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------------
# train -> predict round trips
# --------------------------------------------------------------------------------------------------
def test_train_csv_writes_model_report_and_predict_round_trips_string_labels(tmp_path):
    X, y = make_problem()
    frame_of(X, y, LABELS).to_csv(tmp_path / "train.csv", index=False)
    out = tmp_path / "run"
    res = run("train", tmp_path / "train.csv", "--target", "label", "--alpha", "1e-2", "--out", out, "-q")
    assert "held-out" in flat(res.stdout) and "accuracy" in flat(res.stdout)

    # files: model pair, self-contained report, PNGs (no Θ images: 4 features are not a square image)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "model.json", "report.html", "objective_curve.png", "confusion_matrix.png",
            "reliability_diagram.png"} <= names
    assert "class_weights.png" not in names
    assert not [n for n in names if n.endswith(".tmp")]
    for png in ("objective_curve.png", "confusion_matrix.png", "reliability_diagram.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3
    assert not re.search(r'(src|href)="(?!data:)', page), "the report must not reference external files"
    assert "<script" not in page

    meta = json.loads((out / "model.json").read_text())
    assert meta["format"] == "softxent-model" and meta["format_version"] == 2
    assert meta["softxent_version"] == __import__("softxent").__version__
    assert meta["classes"] == {"type": "str", "values": ["cat", "dog", "eel"]}
    assert meta["features"]["feature_names"] == ["f0", "f1", "f2", "f3"]
    assert meta["features"]["standardize"] is True
    assert meta["estimator"]["solver"] == "lbfgs" and meta["status"] == "complete"
    assert set(meta["metrics"]) == {"train", "held-out"}
    assert meta["metrics"]["held-out"]["n"] == 48 and meta["metrics"]["train"]["n"] == 192

    # standardisation was fitted on the training split only
    model = load_model(out)
    tr, te = train_test_indices(LABELS[y], 0.2, 0)
    np.testing.assert_allclose(model.preprocessing.mean, X[tr].mean(0), rtol=1e-12)
    np.testing.assert_allclose(model.preprocessing.scale, X[tr].std(0), rtol=1e-12)
    assert not np.allclose(model.preprocessing.mean, X.mean(0), rtol=1e-6)

    # the stored metrics are those of the stored model on the held-out rows
    Z = (X[te] - X[tr].mean(0)) / X[tr].std(0)
    logits = Z @ model.coef.T + model.intercept
    y_te = np.searchsorted(model.classes, LABELS[y][te])
    assert meta["metrics"]["held-out"]["log_loss"] == pytest.approx(float(cross_entropy(logits, y_te)), rel=1e-9)
    assert meta["metrics"]["held-out"]["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == y_te))

    # predict: original string labels, probability columns in class order, rows in input order
    frame_of(X[te], y[te]).drop(columns=["label"]).to_csv(tmp_path / "new.csv", index=False)
    run("predict", out, tmp_path / "new.csv", "-o", tmp_path / "pred.csv", "--proba")
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert list(pred.columns) == ["prediction", "proba_cat", "proba_dog", "proba_eel"]
    P = softmax(logits)
    np.testing.assert_allclose(pred[["proba_cat", "proba_dog", "proba_eel"]].to_numpy(), P, rtol=1e-9, atol=1e-15)
    assert pred["prediction"].tolist() == LABELS[P.argmax(1)].tolist()
    assert (pred["prediction"] == LABELS[y[te]]).mean() > 0.8  # blobs are well separated


@pytest.mark.parametrize("fmt", ["parquet", "npz", "svmlight"])
def test_each_format_trains_and_predicts_with_integer_labels(tmp_path, fmt):
    X, y = make_problem(seed=1)
    y = y * 10 + 3  # labels 3, 13, 23 must come back as these ints
    if fmt == "parquet":
        frame_of(X, y).to_parquet(tmp_path / "d.parquet")
        files, extra = [tmp_path / "d.parquet"], ["--target", "label"]
    elif fmt == "npz":
        np.savez(tmp_path / "d.npz", X=X, y=y)
        files, extra = [tmp_path / "d.npz"], []
    else:
        write_svmlight(tmp_path / "d.svm", X, y)
        files, extra = [tmp_path / "d.svm"], []
    out = tmp_path / "m"
    run("train", *files, *extra, "--out", out, *FAST)
    model = load_model(out)
    assert model.classes.dtype.kind == "i" and model.classes.tolist() == [3, 13, 23]
    assert model.n_features == 4
    res = run("predict", out, *files)  # CSV on stdout
    pred = pd.read_csv(__import__("io").StringIO(res.stdout))
    assert pred["prediction"].dtype.kind == "i" and len(pred) == len(y)
    assert set(pred["prediction"]) <= {3, 13, 23}
    assert (pred["prediction"].to_numpy() == y).mean() > 0.8
    if fmt == "svmlight":
        assert model.preprocessing.sparse and model.preprocessing.zero_based is False
        assert np.all(model.preprocessing.mean == 0)  # sparse data is scaled, not centred


def test_several_files_and_a_glob_are_one_data_set(tmp_path):
    X, y = make_problem(n=300, seed=2)
    for i, part in enumerate(np.array_split(np.arange(300), 3)):
        frame_of(X[part], y[part], LABELS).to_csv(tmp_path / f"part-{i}.csv", index=False)
    out = tmp_path / "glob"
    run("train", str(tmp_path / "part-*.csv"), "--target", "label", "--out", out, *FAST)
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["n_rows"] == 300 and len(meta["training"]["data"]) == 3
    out2 = tmp_path / "list"
    run("train", tmp_path / "part-0.csv", tmp_path / "part-1.csv", "--target", "label", "--out", out2, *FAST)
    assert json.loads((out2 / "model.json").read_text())["training"]["n_rows"] == 200
    # files of one data set must share columns
    frame_of(X[:10, :3], y[:10], LABELS).to_csv(tmp_path / "odd.csv", index=False)
    assert_user_error(run("train", tmp_path / "part-0.csv", tmp_path / "odd.csv", "--target", "label", ok=False),
                      "odd.csv", "missing 'f3'")


def test_default_data_is_bundled_digits_with_class_images_evaluate_info_export(tmp_path):
    out = tmp_path / "digits"
    res = run("train", "--out", out, "--alpha", "1e-2", "--max-iter", "40", "-q")
    assert "1797 rows, 64 features, 10 classes" in flat(res.stdout)
    assert (out / "class_weights.png").read_bytes()[:4] == b"\x89PNG"  # 8x8 images: rows of Θ drawn
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    model = load_model(out)
    assert model.preprocessing.image_shape == (8, 8) and model.coef.shape == (10, 64)
    assert model.meta["training"]["format"] == "digits"
    assert len(model.loss_curve) == model.meta["estimator"]["n_iter"] <= 40

    ev = run("evaluate", out, "--out", tmp_path / "ev")  # no DATA: the default digits again
    assert "1797" in flat(ev.stdout) and (tmp_path / "ev" / "report.html").exists()

    info = run("info", out)
    assert "complete" in flat(info.stdout) and "8×8" in flat(info.stdout) and "lbfgs" in flat(info.stdout)
    assert json.loads(run("info", out, "--json").stdout)["classes"]["values"] == list(range(10))

    exp = run("export", out, "--onnx", tmp_path / "digits.onnx")
    assert "labels match" in flat(exp.stdout)
    assert (tmp_path / "digits.onnx").stat().st_size > 1000


def test_evaluate_metrics_match_the_model(tmp_path):
    X, y = make_problem(seed=3)
    frame_of(X, y, LABELS).to_csv(tmp_path / "d.csv", index=False)
    run("train", tmp_path / "d.csv", "-t", "label", "--out", tmp_path / "m", *FAST)
    X2, y2 = make_problem(n=90, seed=4)
    frame_of(X2, y2, LABELS).to_csv(tmp_path / "test.csv", index=False)
    res = run("evaluate", tmp_path / "m", tmp_path / "test.csv", "--out", tmp_path / "ev")
    model = load_model(tmp_path / "m")
    Z = model.preprocessing.transform(pd.read_csv(tmp_path / "test.csv").drop(columns=["label"]))
    logits = Z @ model.coef.T + model.intercept
    acc = np.mean(model.classes[logits.argmax(1)] == LABELS[y2])
    assert f"{acc:.4f}" in flat(res.stdout)
    assert f"{float(cross_entropy(logits, y2)):.4f}" in flat(res.stdout)
    assert {p.name for p in (tmp_path / "ev").iterdir()} >= {"report.html", "confusion_matrix.png"}
    # a label the model never saw is a clear error
    bad = frame_of(X2[:5], y2[:5], LABELS)
    bad.loc[0, "label"] = "fox"
    bad.to_csv(tmp_path / "fox.csv", index=False)
    assert_user_error(run("evaluate", tmp_path / "m", tmp_path / "fox.csv", "--no-report", ok=False), "'fox'")


# --------------------------------------------------------------------------------------------------
# categorical, impute, and their errors
# --------------------------------------------------------------------------------------------------
def test_non_numeric_columns_are_named_and_categorical_one_hot_encodes_them(tmp_path):
    X, y = make_problem(seed=5)
    df = frame_of(X, y, LABELS)
    df["colour"] = np.where(y == 0, "red", np.where(y == 1, "green", "blue"))
    df["city"] = "Paris"
    df.to_csv(tmp_path / "d.csv", index=False)
    msg = assert_user_error(run("train", tmp_path / "d.csv", "-t", "label", *FAST, ok=False),
                            "'colour'", "'city'", "--categorical")
    assert "'f0'" not in msg
    out = tmp_path / "m"
    run("train", tmp_path / "d.csv", "-t", "label", "--categorical", "--out", out, *FAST)
    model = load_model(out)
    assert model.preprocessing.categorical == {"colour": ["blue", "green", "red"], "city": ["Paris"]}
    assert model.preprocessing.feature_names[-4:] == ["colour=blue", "colour=green", "colour=red", "city=Paris"]
    # an unseen category encodes as all zeros; predict still works
    new = df.drop(columns=["label"]).head(6).copy()
    new.loc[0, "colour"] = "purple"
    new.to_csv(tmp_path / "new.csv", index=False)
    pred = pd.read_csv(__import__("io").StringIO(run("predict", out, tmp_path / "new.csv").stdout))
    assert len(pred) == 6 and set(pred["prediction"]) <= set(LABELS)
    # a model feature column missing from the data
    new.drop(columns=["f2"]).to_csv(tmp_path / "nof2.csv", index=False)
    assert_user_error(run("predict", out, tmp_path / "nof2.csv", ok=False), "'f2'")


def test_nan_features_are_counted_by_column_and_impute_mean_fills_them(tmp_path):
    X, y = make_problem(seed=6)
    X[[3, 8, 9], 1] = np.nan
    X[5, 3] = np.nan
    frame_of(X, y, LABELS).to_csv(tmp_path / "d.csv", index=False)
    assert_user_error(run("train", tmp_path / "d.csv", "-t", "label", *FAST, ok=False),
                      "NaN", "4 value(s)", "'f1' (3)", "'f3' (1)", "--impute mean")
    out = tmp_path / "m"
    run("train", tmp_path / "d.csv", "-t", "label", "--impute", "mean", "--out", out, *FAST)
    model = load_model(out)
    tr, _ = train_test_indices(LABELS[y], 0.2, 0)
    np.testing.assert_allclose(model.preprocessing.impute_values, np.nanmean(X[tr], axis=0), rtol=1e-12)
    res = run("predict", out, tmp_path / "d.csv", "--proba")
    pred = pd.read_csv(__import__("io").StringIO(res.stdout))
    assert np.isfinite(pred.filter(like="proba_").to_numpy()).all()
    # a model trained without --impute refuses NaN at predict time, with the count
    Xc, yc = make_problem(seed=7)
    frame_of(Xc, yc, LABELS).to_csv(tmp_path / "clean.csv", index=False)
    run("train", tmp_path / "clean.csv", "-t", "label", "--out", tmp_path / "m2", *FAST)
    assert_user_error(run("predict", tmp_path / "m2", tmp_path / "d.csv", ok=False), "NaN", "without --impute")


# --------------------------------------------------------------------------------------------------
# the one-line errors
# --------------------------------------------------------------------------------------------------
def test_data_errors_are_one_line_with_exit_status_2(tmp_path):
    X, y = make_problem(n=60)
    frame_of(X, y, LABELS).to_csv(tmp_path / "d.csv", index=False)
    assert_user_error(run("train", tmp_path / "nope.csv", ok=False), "no such data file", "nope.csv")
    assert_user_error(run("train", str(tmp_path / "none-*.csv"), ok=False), "no file matches")
    (tmp_path / "d.xyz").write_text("1,2\n")
    assert_user_error(run("train", tmp_path / "d.xyz", ok=False), "unknown data format", "'.xyz'", "--format")
    assert_user_error(run("train", tmp_path / "d.csv", "--target", "lable", ok=False),
                      "unknown target column 'lable'", "'f0'", "'label'")
    assert_user_error(run("train", tmp_path / "d.csv", ok=False), "--target", "'label'")
    one = frame_of(X, np.zeros(60, dtype=int), LABELS)
    one.to_csv(tmp_path / "one.csv", index=False)
    assert_user_error(run("train", tmp_path / "one.csv", "-t", "label", ok=False), "only one class", "'cat'")
    df = frame_of(X, y)
    df["label"] = df["f0"]  # continuous target
    df.to_csv(tmp_path / "cont.csv", index=False)
    assert_user_error(run("train", tmp_path / "cont.csv", "-t", "label", ok=False), "continuous")
    np.savez(tmp_path / "obj.npz", X=np.array([[1, "a"]], dtype=object), y=np.array([0]))
    assert_user_error(run("train", tmp_path / "obj.npz", ok=False), "pickled")
    np.savez(tmp_path / "noy.npz", X=X)
    assert_user_error(run("train", tmp_path / "noy.npz", ok=False), "no labels", "'y'")
    (tmp_path / "empty.csv").write_text("")
    assert_user_error(run("train", tmp_path / "empty.csv", "-t", "label", ok=False), "empty")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    assert_user_error(run("train", tmp_path / "bad.parquet", "-t", "label", ok=False), "bad.parquet")
    assert_user_error(run("train", tmp_path / "d.csv", "-t", "label", "--test-size", "1.5", ok=False), "--test-size")
    # an estimator parameter the estimator rejects is a one-line error too
    assert_user_error(run("train", tmp_path / "d.csv", "-t", "label", "--solver", "magic", "-q", ok=False), "magic")


def test_debug_shows_the_traceback(tmp_path):
    res = run("train", tmp_path / "nope.csv", "--debug", ok=False)
    assert res.exit_code != 0 and isinstance(res.exception, ValueError) and "nope.csv" in str(res.exception)
    res = run("--debug", "info", tmp_path / "nope", ok=False)
    assert isinstance(res.exception, ValueError)


def test_out_folder_with_a_model_needs_resume_or_force(tmp_path):
    X, y = make_problem(n=90)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    run("train", tmp_path / "d.npz", "--out", tmp_path / "m", *FAST)
    assert_user_error(run("train", tmp_path / "d.npz", "--out", tmp_path / "m", *FAST, ok=False),
                      "already holds a model", "--resume", "--force")
    run("train", tmp_path / "d.npz", "--out", tmp_path / "m", "--force", *FAST)
    assert_user_error(run("train", tmp_path / "d.npz", "--out", tmp_path / "empty", "--resume", ok=False),
                      "no model to continue")
    assert_user_error(run("train", tmp_path / "d.npz", "--out", tmp_path / "m", "--resume", "--no-standardize",
                          ok=False), "--no-standardize", "--resume keeps")


# --------------------------------------------------------------------------------------------------
# corrupted model folders
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_npz_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    X, y = make_problem(n=120, seed=8)
    np.savez(d / "d.npz", X=X, y=y)
    run("train", d / "d.npz", "--out", d / "m", *FAST)
    return d


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src / "m", dst)
    return dst


def _rewrite(dst, tensors=None, meta_edit=None):
    """Rewrite the model pair by hand (tensors and/or model.json), keeping both checksums consistent: what a
    deliberate edit looks like, so that the checks behind the checksums are what is tested."""
    import hashlib

    from safetensors.numpy import load as st_load
    from safetensors.numpy import save as st_save

    from softxent.cli.model_schema import canonical_sha256

    meta = json.loads((dst / "model.json").read_text())
    if tensors is not None:
        t = st_load((dst / "model.safetensors").read_bytes())
        t.update(tensors)
        blob = st_save(t)
        (dst / "model.safetensors").write_bytes(blob)
        meta["tensors"].update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
    if meta_edit is not None:
        meta_edit(meta)
    meta["checksum"] = {"sha256": canonical_sha256(meta)}
    (dst / "model.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("case", ["json-garbage", "json-truncated", "tensors-truncated", "tensors-bitflip",
                                  "newer-version", "wrong-shape", "tensors-missing", "not-a-model", "nan-coef"])
def test_corrupt_models_are_refused_with_one_line(trained_npz_model, tmp_path, case):
    dst = _copy_model(trained_npz_model, tmp_path / "m")
    j, t = dst / "model.json", dst / "model.safetensors"
    expect = {
        "json-garbage": ("corrupt",), "json-truncated": ("corrupt or truncated",),
        "tensors-truncated": ("truncated",), "tensors-bitflip": ("corrupt", "SHA-256"),
        "newer-version": ("format version 99", "newer", "upgrade"), "wrong-shape": ("'coef'", "shape [3, 5]"),
        "tensors-missing": ("no model.safetensors",), "not-a-model": ("not a softxent model",),
        "nan-coef": ("NaN",),
    }[case]
    if case == "json-garbage":
        j.write_bytes(b"\x00\xff{{{ not json")
    elif case == "json-truncated":
        j.write_text(j.read_text()[:200])
    elif case == "tensors-truncated":
        t.write_bytes(t.read_bytes()[:-100])
    elif case == "tensors-bitflip":
        b = bytearray(t.read_bytes())
        b[-9] ^= 0x40
        t.write_bytes(bytes(b))
    elif case == "newer-version":
        _rewrite(dst, meta_edit=lambda m: m.update(format_version=99))
    elif case == "wrong-shape":
        _rewrite(dst, tensors={"coef": np.zeros((3, 5))})
    elif case == "tensors-missing":
        t.unlink()
    elif case == "not-a-model":
        j.write_text(json.dumps({"hello": "world"}))
    elif case == "nan-coef":
        _rewrite(dst, tensors={"coef": np.full((3, 4), np.nan)})
    for cmd in (["info", dst], ["predict", dst, trained_npz_model / "d.npz"], ["export", dst, "--onnx", tmp_path / "x.onnx"]):
        assert_user_error(run(*cmd, ok=False), *expect)
    assert not (tmp_path / "x.onnx").exists()


def test_model_argument_errors(tmp_path, trained_npz_model):
    assert_user_error(run("info", tmp_path / "nowhere", ok=False), "no such model folder")
    (tmp_path / "file.txt").write_text("x")
    assert_user_error(run("info", tmp_path / "file.txt", ok=False), "not a model folder")
    assert_user_error(run("info", tmp_path, ok=False), "holds no model.json")
    run("info", trained_npz_model / "m" / "model.json")  # the model.json path works as MODEL too
    X, _ = make_problem(n=5, d=3)
    np.savez(tmp_path / "d3.npz", X=X)
    assert_user_error(run("predict", trained_npz_model / "m", tmp_path / "d3.npz", ok=False),
                      "3 features", "expects 4")


# --------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float64", 1e-12)])
def test_onnx_probabilities_match_predict_proba(tmp_path, dtype, tol):
    ort = pytest.importorskip("onnxruntime")
    X, y = make_problem(n=150, seed=9)
    X[[2, 7], 0] = np.nan  # the graph imputes too
    frame_of(X, y, LABELS).to_csv(tmp_path / "d.csv", index=False)
    run("train", tmp_path / "d.csv", "-t", "label", "--impute", "mean", "--out", tmp_path / "m", *FAST)
    run("export", tmp_path / "m", "--onnx", tmp_path / "m.onnx", "--dtype", dtype)
    model = load_model(tmp_path / "m")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    labels, P_onnx = sess.run(None, {"X": X.astype(dtype)})
    P = model.estimator().predict_proba(model.preprocessing.transform(pd.read_csv(tmp_path / "d.csv").drop(columns="label")))
    assert np.max(np.abs(P_onnx - P)) <= tol
    assert [str(s) for s in labels] == model.classes[P.argmax(1)].tolist()
    assert P_onnx.dtype == np.dtype(dtype)


# --------------------------------------------------------------------------------------------------
# Ctrl-C and --resume (in-process: the interrupt is raised from inside the solver's iteration)
# --------------------------------------------------------------------------------------------------
def test_interrupt_keeps_the_last_iterate_and_resume_finishes(tmp_path, monkeypatch):
    X, y = make_problem(n=200, seed=10)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    out = tmp_path / "m"
    original = app_module._FitMonitor.__call__
    seen = []

    def interrupting(self, info):
        original(self, info)
        seen.append((info.objective, np.array(info.coef), np.array(info.intercept)))
        if info.iteration == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(app_module._FitMonitor, "__call__", interrupting)
    res = run("train", tmp_path / "d.npz", "--out", out, "--solver", "gd", "--alpha", "1e-2", "--tol", "0",
              "--max-iter", "500", "-q", ok=False)
    assert res.exit_code == 130, res.output
    assert "Interrupted after 6 iterations" in flat(res.stderr) and "--resume" in res.stderr
    assert "Traceback" not in res.output
    model = load_model(out)
    assert model.status == "interrupted" and model.meta["estimator"]["n_iter"] == 6
    np.testing.assert_allclose(model.coef, seen[-1][1], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(model.intercept, seen[-1][2], rtol=1e-12, atol=1e-15)
    # the saved iterate's objective (mean CE on the standardised training split + α/2‖Θ‖²) is the last logged one
    tr, _ = train_test_indices(y, 0.2, 0)
    Z = model.preprocessing.transform(X[tr])
    E = float(cross_entropy(Z @ model.coef.T + model.intercept, y[tr])) + 0.5e-2 * np.sum(model.coef ** 2)
    assert E == pytest.approx(seen[-1][0], rel=1e-9)
    assert model.loss_curve.tolist() == pytest.approx([s[0] for s in seen], rel=1e-12)

    monkeypatch.setattr(app_module._FitMonitor, "__call__", original)
    res = run("train", tmp_path / "d.npz", "--out", out, "--resume", "--solver", "lbfgs", "-q", "--no-report")
    assert "+6 before --resume" in flat(res.stdout)
    done = load_model(out)
    assert done.status == "complete"
    assert done.meta["estimator"]["n_iter"] == len(done.loss_curve) > 6
    assert done.loss_curve[:6].tolist() == pytest.approx(model.loss_curve.tolist(), rel=1e-12)
    assert done.meta["estimator"]["objective"] < model.loss_curve[-1]
    assert done.meta["training"]["n_train"] == len(tr)
    np.testing.assert_array_equal(done.preprocessing.mean, model.preprocessing.mean)  # kept, not refitted


def test_interrupt_before_the_first_iteration_saves_nothing(tmp_path, monkeypatch):
    X, y = make_problem(n=60)
    np.savez(tmp_path / "d.npz", X=X, y=y)

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    from softxent.estimator import SoftmaxRegression

    monkeypatch.setattr(SoftmaxRegression, "fit", boom)
    res = run("train", tmp_path / "d.npz", "--out", tmp_path / "m", "-q", ok=False)
    assert res.exit_code == 130 and "no model saved" in flat(res.stderr)
    assert not (tmp_path / "m" / "model.json").exists()

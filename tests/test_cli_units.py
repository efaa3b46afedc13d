"""The command line's parts, from arrays: preprocessing, labels, model files, atomic writes, metrics, ONNX."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("safetensors")
pytest.importorskip("sklearn")
from softxent.cli.data import (  # noqa: E402
    Preprocessing,
    load_data,
    normalize_labels,
    train_test_indices,
)
from softxent.cli.errors import DataError, ModelFileError  # noqa: E402
from softxent.cli.model_io import (  # noqa: E402
    SavedModel,
    atomic_write_bytes,
    classes_from_json,
    classes_to_json,
    load_model,
    save_model,
)
from softxent.cli.report import (  # noqa: E402
    ReportContent,
    compute_metrics,
    reliability_bins,
    render_html,
)
from softxent.loss import log_softmax, softmax  # noqa: E402


def random_model(k=3, d=5, classes=None, impute=False, standardize=True, seed=0):
    rng = np.random.default_rng(seed)
    names = [f"x{j}" for j in range(d)]
    pre = Preprocessing(input_columns=names, feature_names=names, standardize=standardize,
                        mean=rng.standard_normal(d) * 3 if standardize else np.zeros(d),
                        scale=rng.uniform(0.5, 4, d) if standardize else np.ones(d),
                        impute="mean" if impute else None, impute_values=rng.standard_normal(d) if impute else None)
    return SavedModel(classes=np.arange(k) if classes is None else np.asarray(classes),
                      coef=rng.standard_normal((k, d)), intercept=rng.standard_normal(k), preprocessing=pre,
                      loss_curve=np.linspace(1.0, 0.5, 7), target="y", meta={"estimator": {"n_iter": 7}})


# --------------------------------------------------------------------------------------------------
# labels and preprocessing
# --------------------------------------------------------------------------------------------------
def test_labels_keep_their_type():
    assert normalize_labels(np.array([1.0, 2.0, 1.0]), "y").dtype == np.int64
    assert normalize_labels(np.array([True, False]), "y").dtype == bool
    assert normalize_labels(np.array(["a", "b"], dtype=object), "y").tolist() == ["a", "b"]
    with pytest.raises(DataError, match="missing value"):
        normalize_labels(np.array(["a", None], dtype=object), "y")
    with pytest.raises(DataError, match="continuous"):
        normalize_labels(np.array([0.5, 1.0]), "y")
    for c in (np.array([3, 13, 23]), np.array(["cat", "dog"]), np.array([False, True])):
        back = classes_from_json(json.loads(json.dumps(classes_to_json(c))))
        assert back.dtype.kind == c.dtype.kind and back.tolist() == c.tolist()


def test_split_is_stratified_and_reproducible():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    tr, te = train_test_indices(y, 0.2, 3)
    assert len(te) == 20 and len(tr) == 80 and np.intersect1d(tr, te).size == 0
    assert np.bincount(y[te]).tolist() == [10, 6, 4]
    tr2, te2 = train_test_indices(y, 0.2, 3)
    assert np.array_equal(te, te2)
    assert len(train_test_indices(y, 0.0, 3)[1]) == 0


def test_sparse_data_is_scaled_not_centred_and_matches_dense_std():
    rng = np.random.default_rng(1)
    dense = rng.standard_normal((50, 6)) * (rng.random((50, 6)) < 0.3) * [1, 2, 3, 4, 5, 6]
    dense[:, 5] = 0.0  # a constant column gets scale 1
    pre = Preprocessing.fit(sp.csr_matrix(dense))
    assert pre.sparse and np.all(pre.mean == 0)
    expected = np.where(dense.std(0) > 0, dense.std(0), 1.0)
    np.testing.assert_allclose(pre.scale, expected, rtol=1e-12)
    Z = pre.transform(sp.csr_matrix(dense))
    assert sp.issparse(Z) and Z.nnz == np.count_nonzero(dense)
    np.testing.assert_allclose(Z.toarray(), dense / expected, rtol=1e-12)


def test_dense_standardisation_and_impute_use_the_given_rows_only():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((40, 3)) * [1, 10, 100] + [5, -5, 50]
    X[[1, 4], 2] = np.nan
    with pytest.raises(DataError, match=r"2 value\(s\) in column\(s\) 'x2' \(2\)"):
        Preprocessing.fit(X)
    pre = Preprocessing.fit(X, impute="mean")
    filled = np.where(np.isnan(X), np.nanmean(X, axis=0), X)
    np.testing.assert_allclose(pre.impute_values, np.nanmean(X, axis=0), rtol=1e-12)
    np.testing.assert_allclose(pre.mean, filled.mean(0), rtol=1e-12)
    np.testing.assert_allclose(pre.transform(X), (filled - filled.mean(0)) / filled.std(0), rtol=1e-12)
    X[0, 0] = np.inf
    with pytest.raises(DataError, match="infinite"):
        pre.transform(X)


def test_svmlight_index_base_is_detected_and_kept_for_prediction(tmp_path):
    (tmp_path / "zero.svm").write_text("1 0:1.5 2:2\n2 1:3\n")
    raw = load_data([str(tmp_path / "zero.svm")])
    assert raw.zero_based is True and raw.X.shape == (2, 3)
    np.testing.assert_array_equal(raw.X.toarray(), [[1.5, 0, 2], [0, 3, 0]])
    (tmp_path / "one.svm").write_text("1 1:1.5 3:2\n2 2:3\n")
    raw1 = load_data([str(tmp_path / "one.svm")])
    assert raw1.zero_based is False and raw1.feature_names == ["f1", "f2", "f3"]
    np.testing.assert_array_equal(raw1.X.toarray(), [[1.5, 0, 2], [0, 3, 0]])
    # a prediction file that happens not to use index 0 is read with the model's (0-based) convention
    (tmp_path / "later.svm").write_text("1 2:7\n")
    later = load_data([str(tmp_path / "later.svm")], n_features=3, zero_based=True)
    np.testing.assert_array_equal(later.X.toarray(), [[0, 0, 7]])
    (tmp_path / "wide.svm").write_text("1 9:7\n")
    with pytest.raises(DataError, match="more features"):
        load_data([str(tmp_path / "wide.svm")], n_features=3, zero_based=True)


# --------------------------------------------------------------------------------------------------
# model files
# --------------------------------------------------------------------------------------------------
def test_model_round_trip_is_exact(tmp_path):
    m = random_model(classes=["a<&>", "b", "c"], impute=True)
    save_model(tmp_path, m)
    back = load_model(tmp_path)
    for name in ("coef", "intercept", "loss_curve"):
        np.testing.assert_array_equal(getattr(back, name), getattr(m, name))
    np.testing.assert_array_equal(back.preprocessing.mean, m.preprocessing.mean)
    np.testing.assert_array_equal(back.preprocessing.impute_values, m.preprocessing.impute_values)
    assert back.classes.tolist() == ["a<&>", "b", "c"] and back.target == "y" and back.status == "complete"
    X = np.random.default_rng(3).standard_normal((4, 5))
    np.testing.assert_allclose(back.predict_proba(X), softmax(X @ m.coef.T + m.intercept), rtol=1e-15)


def test_extreme_numbers_the_writer_writes_load_back(tmp_path):
    """The loader's strict JSON accepts every number the writer can write (floats with 20-digit fractions,
    subnormals, int64's ends) — and refuses one past int64."""
    m = random_model()
    values = [1.2345678901234567e-4, 5e-324, -0.0, 1.7976931348623157e308, 2**63 - 1, -(2**63), 0.1 + 0.2]
    m.meta = {"estimator": {"n_iter": 2**63 - 1, "objective": 1.2345678901234567e-4}, "extreme": values}
    save_model(tmp_path, m)
    assert "0.00012345678901234567" in (tmp_path / "model.json").read_text()  # a 20-digit run, not an integer
    back = load_model(tmp_path)
    assert back.meta["extreme"] == values and back.meta["estimator"]["n_iter"] == 2**63 - 1
    m.meta["extreme"] = [2**63]
    with pytest.raises(ModelFileError, match="int64"):
        save_model(tmp_path, m)


def test_loader_reads_no_pickle_and_validates_the_header(tmp_path):
    save_model(tmp_path, random_model())
    t = tmp_path / "model.safetensors"
    blob = t.read_bytes()
    t.write_bytes(struct.pack("<Q", 2**40) + blob[8:])
    with pytest.raises(ModelFileError, match="implausible"):
        load_model(tmp_path)
    t.write_bytes(blob[:5])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(tmp_path)
    (n,) = struct.unpack("<Q", blob[:8])
    t.write_bytes(blob[:8] + b"x" * n + blob[8 + n:])
    with pytest.raises(ModelFileError, match="header is not valid JSON"):
        load_model(tmp_path)


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")
    atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new"
    mask = os.umask(0o022)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
    os.chmod(p, 0o640)
    atomic_write_bytes(p, b"new")
    assert p.stat().st_mode & 0o777 == 0o640  # an existing file keeps its mode

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"half")
    assert p.read_bytes() == b"new"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.bin"]  # no temporary file left behind


# --------------------------------------------------------------------------------------------------
# metrics and report
# --------------------------------------------------------------------------------------------------
def test_reliability_bins_and_ece_by_hand():
    conf = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, False, True, True])
    _, mean_conf, acc, counts = reliability_bins(conf, correct)
    assert counts[9] == 2 and counts[5] == 2 and counts.sum() == 4
    assert acc[9] == 0.5 and acc[5] == 1.0 and mean_conf[9] == pytest.approx(0.95)
    # two rows per class: row i predicts class 0 with the given confidence
    logp = np.log(np.array([[c, 1 - c] for c in conf]))
    m = compute_metrics(np.where(correct, 0, 1), logp)
    assert m.ece == pytest.approx((2 * 0.45 + 2 * 0.45) / 4)
    assert m.accuracy == 0.75


def test_metrics_against_direct_formulas():
    from sklearn.metrics import f1_score, log_loss

    rng = np.random.default_rng(4)
    z = rng.standard_normal((200, 4)) * 2
    y = rng.integers(0, 4, 200)
    m = compute_metrics(y, log_softmax(z))
    p = softmax(z)
    assert m.log_loss == pytest.approx(-np.mean(np.log(p[np.arange(200), y])), rel=1e-12)
    assert m.log_loss == pytest.approx(log_loss(y, p, labels=range(4)), rel=1e-9)
    assert m.macro_f1 == pytest.approx(f1_score(y, p.argmax(1), average="macro"), rel=1e-12)
    assert m.accuracy == np.mean(p.argmax(1) == y)


def test_report_html_escapes_user_text():
    from softxent.cli.report import Metrics

    page = render_html(ReportContent(title="<script>alert(1)</script>", summary=[("data", "a<b>.csv")],
                                     metrics={"x<y>": Metrics(3, 1.0, 0.1, 1.0, 0.0)},
                                     per_class=[("<img src=x>", 1.0, 1.0, 1.0, 3)]))
    assert "<script>" not in page and "<img src=x>" not in page and "&lt;script&gt;" in page


# --------------------------------------------------------------------------------------------------
# ONNX from arrays
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classes,impute,standardize", [
    (None, False, True), (["no", "yes"], True, True), ([5, 7, 9, 11], False, False)])
def test_onnx_graph_reproduces_the_model(classes, impute, standardize):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from softxent.cli.onnx_export import build_onnx_model, onnx_predict_proba

    k = 3 if classes is None else len(classes)
    m = random_model(k=k, classes=classes, impute=impute, standardize=standardize, seed=5)
    rng = np.random.default_rng(6)
    X = m.preprocessing.mean + m.preprocessing.scale * rng.standard_normal((64, 5))
    if impute:
        X[::7, 2] = np.nan
    Z = m.preprocessing.transform(X)
    P = m.predict_proba(Z)
    for dtype, tol in (("float32", 1e-5), ("float64", 1e-13)):
        labels, P_onnx = onnx_predict_proba(build_onnx_model(m, dtype=dtype).SerializeToString(), X)
        assert np.max(np.abs(P_onnx - P)) <= tol
        expected = m.classes[P.argmax(1)]
        got = [s.decode() if isinstance(s, bytes) else s for s in labels.tolist()]
        assert [str(v) for v in got] == [str(v) for v in expected.tolist()]

"""``softxent export --onnx``: the model as an ONNX graph built with ``onnx.helper`` (the ``onnx`` extra).

Input ``X`` is the N×D matrix of the model's features (``feature_names`` in the graph's metadata; for a
table with ``--categorical`` columns these are the one-hot columns ``col=value``).  The graph is the
model's prediction, step by step::

    X --[IsNaN / Where: x_j <- impute_j]--> (x - mean) / scale --MatMul Θᵀ--> + b = logits z (N×K)
      --Softmax(axis=-1)--> probabilities (N×K)        --ArgMax--> Gather(classes) --> label (N,)

(the impute step only when the model was trained with ``--impute mean``).  ``label`` holds the original
class labels: an int64 tensor for integer classes, a string tensor for string (and bool) classes.
Computation runs in float32 (the default) or float64 (``dtype="float64"``).
"""

from __future__ import annotations

import json

import numpy as np

from .model_io import SavedModel

__all__ = ["build_onnx_model", "export_onnx", "onnx_predict_proba"]

OPSET = 17
IR_VERSION = 8  # read by onnxruntime >= 1.11; opset 17 needs IR >= 8


def build_onnx_model(model: SavedModel, *, dtype: str = "float32"):
    """The ``onnx.ModelProto`` for ``model`` (checked with ``onnx.checker``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64'; got {dtype!r}")
    np_dtype = np.float32 if dtype == "float32" else np.float64
    elem = TensorProto.FLOAT if dtype == "float32" else TensorProto.DOUBLE
    pre = model.preprocessing
    k, d = model.coef.shape

    def const(name, value):
        return numpy_helper.from_array(np.asarray(value, dtype=np_dtype), name=name)

    inits, nodes = [], []
    x = "X"
    if pre.impute is not None:
        inits.append(const("impute_values", pre.impute_values.reshape(1, d)))
        nodes += [helper.make_node("IsNaN", [x], ["x_is_nan"], name="find_nan"),
                  helper.make_node("Where", ["x_is_nan", "impute_values", x], ["x_imputed"], name="impute_mean")]
        x = "x_imputed"
    if pre.standardize:
        inits += [const("feature_mean", pre.mean.reshape(1, d)), const("feature_scale", pre.scale.reshape(1, d))]
        nodes += [helper.make_node("Sub", [x, "feature_mean"], ["x_centred"], name="centre"),
                  helper.make_node("Div", ["x_centred", "feature_scale"], ["x_standardised"], name="scale")]
        x = "x_standardised"
    inits += [const("coef_T", model.coef.T), const("intercept", model.intercept.reshape(1, k))]
    nodes += [helper.make_node("MatMul", [x, "coef_T"], ["x_theta"], name="x_times_theta_T"),
              helper.make_node("Add", ["x_theta", "intercept"], ["logits"], name="add_intercept"),
              helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1, name="softmax"),
              helper.make_node("ArgMax", ["logits"], ["class_index"], axis=1, keepdims=0, name="argmax")]
    classes = model.classes
    if classes.dtype.kind in "iu":
        label_elem = TensorProto.INT64
        inits.append(numpy_helper.from_array(classes.astype(np.int64), name="classes"))
    else:
        label_elem = TensorProto.STRING
        inits.append(helper.make_tensor("classes", TensorProto.STRING, [k],
                                        [str(c).encode("utf-8") for c in classes]))
    nodes.append(helper.make_node("Gather", ["classes", "class_index"], ["label"], axis=0, name="class_label"))
    graph = helper.make_graph(
        nodes, "softxent_softmax_regression",
        inputs=[helper.make_tensor_value_info("X", elem, ["N", d])],
        outputs=[helper.make_tensor_value_info("label", label_elem, ["N"]),
                 helper.make_tensor_value_info("probabilities", elem, ["N", k])],
        initializer=inits,
    )
    from .. import __version__

    onnx_model = helper.make_model(graph, producer_name="softxent", producer_version=__version__,
                                   opset_imports=[helper.make_opsetid("", OPSET)])
    onnx_model.ir_version = IR_VERSION
    onnx_model.doc_string = ("softmax regression h(x) = softmax(Θ·standardise(x) + b); "
                             "input X: N×D features, outputs: label (N,), probabilities (N×K)")
    meta = {"feature_names": json.dumps(list(pre.feature_names)),
            "classes": json.dumps([c.item() if hasattr(c, "item") else c for c in classes]),
            "classes_type": classes.dtype.kind}
    for key, value in meta.items():
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(onnx_model)
    return onnx_model


def export_onnx(model: SavedModel, path, *, dtype: str = "float32") -> bytes:
    """Serialise the graph for ``model`` to ``path`` atomically; returns the bytes written."""
    from .model_io import atomic_write_bytes

    data = build_onnx_model(model, dtype=dtype).SerializeToString()
    atomic_write_bytes(path, data)
    return data


def onnx_predict_proba(onnx_bytes: bytes, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run the exported graph under onnxruntime: ``(labels, probabilities)`` for features X (N×D)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    elem = sess.get_inputs()[0].type
    x = np.ascontiguousarray(X, dtype=np.float64 if "double" in elem else np.float32)
    labels, proba = sess.run(["label", "probabilities"], {"X": x})
    return labels, proba

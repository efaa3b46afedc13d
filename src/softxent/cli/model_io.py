"""The model folder: ``model.safetensors`` (the numbers) + ``model.json`` (everything else).  No pickle.

``model.safetensors`` holds float64 tensors::

    coef            (K, D)   Θ, row k = class k           intercept   (K,)   b
    feature_mean    (D,)     standardisation centre       feature_scale (D,)  standardisation scale
    impute_values   (D,)     only with --impute mean      loss_curve  (T,)    objective per iteration

``model.json`` holds the format name and version, the softxent version, the classes (with their type, so
that ints stay ints and strings stay strings), the feature names and preprocessing, the estimator's
parameters, the solver, the objective, the metrics, the training data's description and the run's status
(``complete``, ``interrupted`` or ``checkpoint``), plus the SHA-256 and the shapes of the tensors.

Loading never executes code: JSON is parsed with :mod:`json`, the tensor file's header is validated by
hand (size, offsets, dtypes) before :mod:`safetensors` reads it, and every tensor's shape is checked
against ``model.json``.  A corrupt, truncated or mismatched file, or one written by a newer format version,
raises :class:`~softxent.cli.errors.ModelFileError` with a one-line reason.

Files are written atomically: a temporary file in the same folder, fsync, then ``os.replace``; the tensor
file is written first and ``model.json`` (which carries its checksum) last, so a folder whose
``model.json`` parses always points at the tensors it was written with.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import Preprocessing
from .errors import ModelFileError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MODEL_JSON",
    "MODEL_TENSORS",
    "SavedModel",
    "save_model",
    "load_model",
    "resolve_model_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "classes_to_json",
    "classes_from_json",
]

FORMAT_NAME = "softxent-model"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
MODEL_TENSORS = "model.safetensors"
_DTYPES = {"F64": 8, "F32": 4}
_MAX_HEADER = 100 * 2**20


# --------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode an ordinary open() would have
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(d: Path) -> None:
    try:  # makes the rename itself durable; not available on every platform
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# classes keep their type
# --------------------------------------------------------------------------------------------------
def classes_to_json(classes: np.ndarray) -> dict:
    c = np.asarray(classes)
    if c.dtype.kind == "b":
        return {"type": "bool", "values": [bool(v) for v in c]}
    if c.dtype.kind in "iu":
        return {"type": "int", "values": [int(v) for v in c]}
    if c.dtype.kind == "f":
        if np.all(c == np.round(c)):
            return {"type": "int", "values": [int(v) for v in c]}
        return {"type": "float", "values": [float(v) for v in c]}
    return {"type": "str", "values": [str(v) for v in c]}


def classes_from_json(obj: dict) -> np.ndarray:
    kind, values = obj["type"], obj["values"]
    if not isinstance(values, list):
        raise TypeError("classes.values must be a list")
    dtype = {"bool": bool, "int": np.int64, "float": np.float64, "str": str}.get(kind)
    if dtype is None:
        raise ValueError(f"unknown classes.type {kind!r}")
    if kind == "str" and not all(isinstance(v, str) for v in values):
        raise TypeError("classes.values must be strings")
    if kind in ("int", "float", "bool") and not all(isinstance(v, (int, float, bool)) for v in values):
        raise TypeError("classes.values must be numbers")
    return np.array(values, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------
@dataclass
class SavedModel:
    """What a model folder holds.  ``meta`` is the rest of model.json (estimator, training, metrics, ...)."""

    classes: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    preprocessing: Preprocessing
    loss_curve: np.ndarray = field(default_factory=lambda: np.zeros(0))
    target: str | None = None
    status: str = "complete"
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_features(self) -> int:
        return self.preprocessing.n_features

    def decision_function(self, X) -> np.ndarray:
        """Logits ``z = X Θᵀ + b`` (N×K) for already preprocessed features X."""
        return np.asarray(X @ self.coef.T) + self.intercept

    def predict_proba(self, X) -> np.ndarray:
        """``softmax(X Θᵀ + b)`` through :func:`softxent.loss.softmax` (the one home of the formula)."""
        from ..loss import softmax

        return softmax(self.decision_function(X))

    def estimator(self, **params):
        """A fitted :class:`softxent.SoftmaxRegression` carrying this model's Θ, b and classes.

        With ``warm_start=True`` in ``params`` its ``fit`` continues from them (``--resume``).
        """
        from ..estimator import SoftmaxRegression

        est = SoftmaxRegression(**params)
        est.classes_ = self.classes.copy()
        est.coef_ = self.coef.copy()
        est.intercept_ = self.intercept.copy()
        est.n_features_in_ = self.n_features
        return est


def save_model(directory: str | os.PathLike, model: SavedModel) -> Path:
    """Write ``model.safetensors`` then ``model.json`` into ``directory`` (created), atomically each."""
    from safetensors.numpy import save as st_save

    from .. import __version__

    d = Path(directory)
    k, dim = model.coef.shape
    tensors = {
        "coef": np.ascontiguousarray(model.coef, dtype=np.float64),
        "intercept": np.ascontiguousarray(model.intercept, dtype=np.float64),
        "loss_curve": np.ascontiguousarray(model.loss_curve, dtype=np.float64).reshape(-1),
        **{n: np.ascontiguousarray(v) for n, v in model.preprocessing.tensors().items()},
    }
    _check_shapes(tensors, k, dim, model.preprocessing.impute is not None, where="the model to save")
    blob = st_save(tensors, metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "softxent_version": __version__,
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "status": model.status,
        "classes": classes_to_json(model.classes),
        "target": model.target,
        "features": model.preprocessing.to_json(),
        **{key: v for key, v in model.meta.items() if key not in _RESERVED},
        "tensors": {
            "file": MODEL_TENSORS,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob),
            "shapes": {n: list(v.shape) for n, v in tensors.items()},
        },
    }
    text = _dumps(_jsonable(meta)) + "\n"
    atomic_write_bytes(d / MODEL_TENSORS, blob)
    atomic_write_text(d / MODEL_JSON, text)
    return d


_RESERVED = {"format", "format_version", "softxent_version", "written", "status", "classes", "target",
             "features", "tensors"}


def _jsonable(x):
    """JSON-safe copy: numpy scalars -> Python, non-finite floats -> None (model.json is strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if x is None or isinstance(x, (str, int)):
        return x
    return str(x)


def _dumps(obj, indent: int = 0) -> str:
    """Strict JSON, indented by 2, with lists of scalars (classes, feature names) kept on one line."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {_dumps(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + _dumps(v, indent + 2) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False, ensure_ascii=False)


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The model folder for MODEL: the folder itself, or the folder of a model.json / model.safetensors."""
    p = Path(path)
    if p.is_file() and p.name in (MODEL_JSON, MODEL_TENSORS):
        return p.parent
    if not p.exists():
        raise ModelFileError(f"no such model folder: {str(p)!r}")
    if not p.is_dir():
        raise ModelFileError(f"{str(p)!r} is not a model folder (give the folder that 'softxent train' wrote, "
                             f"holding {MODEL_JSON} and {MODEL_TENSORS})")
    return p


def load_model(path: str | os.PathLike) -> SavedModel:
    """Read and validate a model folder; every problem is a :class:`ModelFileError` with a one-line reason."""
    d = resolve_model_dir(path)
    jpath, tpath = d / MODEL_JSON, d / MODEL_TENSORS
    if not jpath.is_file():
        raise ModelFileError(f"{str(d)!r} holds no {MODEL_JSON}; is it a folder written by 'softxent train'?")
    try:
        meta = json.loads(jpath.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelFileError(f"{jpath} is corrupt (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{jpath} is corrupt or truncated (invalid JSON: {exc.msg} at line {exc.lineno}, "
                             f"column {exc.colno})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{jpath} is not a softxent model file (its 'format' is not {FORMAT_NAME!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFileError(f"{jpath} is corrupt: format_version must be a positive integer; got {version!r}")
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{jpath} has model format version {version}, newer than this softxent "
                             f"({meta.get('softxent_version', '?')} wrote it; this softxent reads up to version "
                             f"{FORMAT_VERSION}); upgrade softxent to load it")
    try:
        classes = classes_from_json(meta["classes"])
        feats = meta["features"]
        n_features = len(feats["feature_names"])
        tinfo = meta["tensors"]
        expected_sha = str(tinfo["sha256"])
        status = str(meta.get("status", "complete"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{jpath} is corrupt: missing or malformed entry ({type(exc).__name__}: {exc})") from None
    if len(classes) < 2:
        raise ModelFileError(f"{jpath} is corrupt: a model needs at least 2 classes; it lists {len(classes)}")
    if not tpath.is_file():
        raise ModelFileError(f"{str(d)!r} holds no {MODEL_TENSORS} (model.json is there); the model is incomplete")
    blob = tpath.read_bytes()
    _validate_safetensors(blob, tpath)
    actual_sha = hashlib.sha256(blob).hexdigest()
    if actual_sha != expected_sha:
        raise ModelFileError(f"{tpath} is corrupt: its SHA-256 does not match the one in {MODEL_JSON} "
                             "(the file was changed or damaged after it was written)")
    from safetensors.numpy import load as st_load

    try:
        raw = st_load(blob)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise ModelFileError(f"{tpath} is corrupt ({_first_line(exc)})") from None
    tensors = {n: np.asarray(v, dtype=np.float64) for n, v in raw.items()}
    impute = feats.get("impute")
    _check_shapes(tensors, len(classes), n_features, impute is not None, where=str(tpath))
    for name in ("coef", "intercept", "feature_mean", "feature_scale"):
        if not np.all(np.isfinite(tensors[name])):
            raise ModelFileError(f"{tpath} is corrupt: tensor {name!r} holds NaN or infinite values")
    if np.any(tensors["feature_scale"] <= 0):
        raise ModelFileError(f"{tpath} is corrupt: tensor 'feature_scale' has a value <= 0")
    try:
        pre = Preprocessing.from_json(feats, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{jpath} is corrupt: malformed 'features' ({type(exc).__name__}: {exc})") from None
    if pre.image_shape is not None and pre.image_shape[0] * pre.image_shape[1] != n_features:
        raise ModelFileError(f"{jpath} is corrupt: image_shape {list(pre.image_shape)} does not hold "
                             f"{n_features} features")
    rest = {k: v for k, v in meta.items() if k not in _RESERVED or k in ("softxent_version", "written")}
    return SavedModel(classes=classes, coef=tensors["coef"], intercept=tensors["intercept"], preprocessing=pre,
                      loss_curve=tensors.get("loss_curve", np.zeros(0)), target=meta.get("target"),
                      status=status, meta=rest, path=d)


def _check_shapes(tensors: dict, k: int, d: int, impute: bool, *, where: str) -> None:
    expected = {"coef": (k, d), "intercept": (k,), "feature_mean": (d,), "feature_scale": (d,)}
    if impute:
        expected["impute_values"] = (d,)
    for name, shape in expected.items():
        if name not in tensors:
            raise ModelFileError(f"{where} lacks the tensor {name!r}")
        got = tuple(np.shape(tensors[name]))
        if got != shape:
            raise ModelFileError(f"{where}: tensor {name!r} has shape {got} but model.json describes {k} classes "
                                 f"× {d} features (expected {shape})")
    if "loss_curve" in tensors and np.ndim(tensors["loss_curve"]) != 1:
        raise ModelFileError(f"{where}: tensor 'loss_curve' must be 1-D; got shape {np.shape(tensors['loss_curve'])}")


def _validate_safetensors(blob: bytes, path: Path) -> None:
    """Check the safetensors layout by hand: 8-byte header length, JSON header, in-bounds data offsets."""
    size = len(blob)
    if size < 8:
        raise ModelFileError(f"{path} is truncated ({size} bytes; a safetensors file starts with an 8-byte header "
                             "length)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > _MAX_HEADER:
        raise ModelFileError(f"{path} is corrupt (header length {n} bytes is implausible)")
    if 8 + n > size:
        raise ModelFileError(f"{path} is truncated (its header needs {8 + n} bytes; the file has {size})")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"{path} is corrupt (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} is corrupt (its header is not a JSON object)")
    data_len = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{path} is corrupt (tensor {name!r} has a malformed header entry)") from None
        if dtype not in _DTYPES:
            raise ModelFileError(f"{path}: tensor {name!r} has dtype {dtype}; a softxent model holds F64/F32")
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b) or b - a != count * _DTYPES[dtype]:
            raise ModelFileError(f"{path} is corrupt (tensor {name!r}: offsets {a}..{b} do not fit shape {shape})")
        end = max(end, b)
    if end > data_len:
        raise ModelFileError(f"{path} is truncated (its tensors need {end} data bytes; the file has {data_len})")


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0] if s else type(exc).__name__
